"""GLUE single-sentence and sentence-pair classification tasks (CoLA, SST-2, ...) from a local copy, tokenized by a
local tokenizer. Nothing touches the Hugging Face hub (``HF_HUB_OFFLINE=1``, ``local_files_only``).

Expected layout (``path`` overrides ``<data_dir>/glue/<task>``), either of:

* a ``datasets.DatasetDict`` saved with ``save_to_disk`` (has ``dataset_dict.json``, splits ``train`` and
  ``validation``), e.g. ``datasets.load_dataset("nyu-mll/glue", "sst2").save_to_disk(...)`` on a machine with internet;
* the hub's parquet files: ``train-*.parquet`` and ``validation-*.parquet`` (``nyu-mll/glue`` repo, ``<task>/`` folder).

``tokenizer_path`` is a folder written by ``save_pretrained`` (any fast or slow HF tokenizer).

Every sentence is tokenized once at set-up (truncated to ``max_seq_length``, padded to the longest sequence) and kept
as one integer tensor ``(n, k, L)``: rows ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
makes them). A single tensor, unlike a dict, can be indexed by the selection step like any image batch;
``models.text.HFClassifier`` unpacks it. Splits as the reference: target-train = even indices of GLUE train,
holdout = odd indices minus a seeded ``val_fraction`` carve-out (validation), test = GLUE validation (GLUE's test
labels are hidden).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from datamatters.data.base import IndexedDataModule
from datamatters.data.cifar import even_odd_splits
from datamatters.data.indexed import TensorBase
from datamatters.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = {  # task: (text fields, number of classes)
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
    "mnli": (("premise", "hypothesis"), 3),
}


def load_glue_columns(path: Path, split: str, fields: tuple[str, ...]) -> dict[str, list]:
    """The text ``fields`` and ``label`` of one split of a local GLUE copy (save_to_disk folder or parquet files)."""
    if (path / "dataset_dict.json").is_file():
        import datasets

        dd = datasets.load_from_disk(str(path))
        if split not in dd:
            raise UserError(f"{path} has splits {list(dd)}, no {split!r}")
        table = dd[split]
        cols = set(table.column_names)
        get = lambda c: table[c]  # noqa: E731
    else:
        import pyarrow.parquet as pq

        files = sorted(path.glob(f"{split}-*.parquet")) or sorted(path.glob(f"{split}.parquet"))
        if not files:
            raise UserError(f"{path} has no dataset_dict.json and no {split}-*.parquet files")
        tables = [pq.read_table(f) for f in files]
        cols = set(tables[0].column_names)
        get = lambda c: [v for t in tables for v in t.column(c).to_pylist()]  # noqa: E731
    missing = [c for c in (*fields, "label") if c not in cols]
    if missing:
        raise UserError(f"{path} split {split!r} lacks columns {missing} (has {sorted(cols)})")
    return {c: list(get(c)) for c in (*fields, "label")}


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer not found at {path}: save one there with tokenizer.save_pretrained({str(path)!r}) "
                        f"on a machine with internet (or point data.tokenizer_path at a local tokenizer folder)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, columns: dict[str, list], fields: tuple[str, ...], max_seq_length: int) -> torch.Tensor:
    """``(n, k, L)`` int tensor of input_ids, attention_mask (and token_type_ids), padded to the longest sequence."""
    texts = [columns[f] for f in fields]
    enc = tokenizer(*texts, truncation=True, max_length=int(max_seq_length), padding=True,
                    return_attention_mask=True, return_tensors="np")
    rows = [enc["input_ids"], enc["attention_mask"]] + ([enc["token_type_ids"]] if "token_type_ids" in enc else [])
    return torch.from_numpy(np.stack(rows, axis=1).astype(np.int32))


def pad_to(X: torch.Tensor, length: int, pad_id: int) -> torch.Tensor:
    """Right-pad an ``(n, k, L)`` token tensor to ``length``: ``pad_id`` for input ids, 0 for the mask/type rows."""
    extra = length - X.shape[-1]
    if extra <= 0:
        return X
    pad = torch.zeros((*X.shape[:-1], extra), dtype=X.dtype)
    pad[:, 0] = pad_id
    return torch.cat([X, pad], dim=-1)


class GLUEDataModule(IndexedDataModule):
    input_shape = (2, 128)

    def __init__(self, task: str = "sst2", path: str | None = None, tokenizer_path: str | None = None,
                 max_seq_length: int = 128, test_split: str = "validation", holdout: bool = True, **kw):
        super().__init__(**kw)
        if task not in TASKS:
            raise UserError(f"unknown GLUE task {task!r}; choose one of {sorted(TASKS)}")
        self.task, self.name = task, task
        self.fields, self.num_classes = TASKS[task]
        self.path = Path(path) if path else self.data_dir / "glue" / task
        self.tokenizer_path = tokenizer_path
        self.max_seq_length, self.test_split, self.use_holdout = int(max_seq_length), test_split, bool(holdout)

    def load_sources(self):
        if not self.path.exists():
            raise self.missing(self.path, f"Save GLUE {self.task} there with datasets' save_to_disk, or copy the "
                                          f"hub's {self.task}/*.parquet files (train-*, validation-*) there")
        if self.tokenizer_path is None:
            raise UserError("data.tokenizer_path is not set: point it at a local tokenizer folder (save_pretrained)")
        tok = load_tokenizer(self.tokenizer_path)
        encoded = {}
        for source, split in (("train", "train"), ("test", self.test_split)):
            cols = load_glue_columns(self.path, split, self.fields)
            y = np.asarray(cols["label"], dtype=np.int64)
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise UserError(f"{self.path} split {split!r} has labels outside 0..{self.num_classes - 1} "
                                f"(GLUE's test split has hidden labels: use the validation split as the test set)")
            encoded[source] = (tokenize(tok, cols, self.fields, self.max_seq_length), y)
        length = max(X.shape[-1] for X, _ in encoded.values())
        pad_id = int(tok.pad_token_id or 0)
        out = {s: (TensorBase(pad_to(X, length, pad_id), torch.from_numpy(y)), y) for s, (X, y) in encoded.items()}
        self.input_shape = tuple(out["train"][0].X.shape[1:])
        return out

    def make_splits(self):
        return even_odd_splits(len(self.clean_targets["train"]), len(self.clean_targets["test"]), self.val_fraction,
                               self.seed, self.use_holdout)
