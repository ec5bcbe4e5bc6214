"""What a datamodel store holds: ``num_models`` rows of a ``schema`` {key: {shape, dtype}}, plus metadata.

The JSON form is the reference's ``spec.json`` (``{"num_models": N, "schema": {...}}``) with an optional ``meta``
record (dataset, split, alpha, seed, target checksum...) that must match whenever a worker opens the store, so a
worker configured for another dataset or alpha cannot write into it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from datamatters.errors import UserError

COMPLETED = "_completed"
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
STANDARD_OUTPUTS = ("masks", "margins", "logits", "loss")


@dataclass(frozen=True)
class DatamodelSpec:
    num_models: int
    schema: Mapping[str, Mapping[str, Any]]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "schema", {k: _field(k, v) for k, v in dict(self.schema).items()})
        object.__setattr__(self, "meta", json.loads(json.dumps(dict(self.meta), sort_keys=True, default=str)))
        if int(self.num_models) < 1:
            raise UserError(f"a datamodel spec needs num_models >= 1, got {self.num_models}")
        object.__setattr__(self, "num_models", int(self.num_models))
        if not self.schema:
            raise UserError("a datamodel spec needs at least one key in its schema")

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"num_models": self.num_models, "schema": {k: dict(v) for k, v in self.schema.items()},
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatamodelSpec":
        if not isinstance(d, Mapping) or "num_models" not in d or "schema" not in d:
            raise UserError("a datamodel spec must have 'num_models' and 'schema' ({key: {shape, dtype}})")
        return cls(int(d["num_models"]), dict(d["schema"]), dict(d.get("meta") or {}))

    @classmethod
    def from_json(cls, path: str | Path) -> "DatamodelSpec":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise UserError(f"spec file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"spec file {path} is not valid JSON ({exc})") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ---- facts ----------------------------------------------------------------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.schema[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self.schema[key]["dtype"])

    def differences(self, other: "DatamodelSpec") -> list[str]:
        """Human-readable list of what differs (empty when the specs agree)."""
        out = []
        if self.num_models != other.num_models:
            out.append(f"num_models {self.num_models} vs {other.num_models}")
        for k in sorted(set(self.schema) | set(other.schema)):
            a, b = self.schema.get(k), other.schema.get(k)
            if a != b:
                out.append(f"key {k!r}: {a} vs {b}")
        for k in sorted(set(self.meta) | set(other.meta)):
            if self.meta.get(k) != other.meta.get(k):
                out.append(f"meta {k!r}: {self.meta.get(k)!r} vs {other.meta.get(k)!r}")
        return out

    def check_values(self, values: Mapping[str, Any], rows: int) -> dict[str, np.ndarray]:
        """Validate a block of ``rows`` rows per key (shape, dtype kind, finite) and return them cast to the
        store's dtypes. Raises ``UserError`` before anything is written."""
        missing = set(self.schema) - set(values)
        extra = set(values) - set(self.schema)
        if missing or extra:
            raise UserError(f"worker returned keys {sorted(values)}, the spec wants {sorted(self.schema)} "
                            f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        out = {}
        for k, v in values.items():
            a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
            want = (rows, *self.shape(k))
            if a.shape != want:
                raise UserError(f"worker output {k!r} has shape {a.shape}, the spec wants {want}")
            dt = self.dtype(k)
            if not np.can_cast(a.dtype, dt, casting="same_kind"):
                raise UserError(f"worker output {k!r} has dtype {a.dtype}, which cannot be stored as {dt}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = a.astype(dt, copy=False)
            if dt.kind in "fc" and not np.isfinite(cast).all():
                raise UserError(f"worker output {k!r} has NaN or infinite values (after casting to {dt}); "
                                "nothing was written for these rows")
            out[k] = cast
        return out


def _field(key: str, v: Mapping[str, Any]) -> dict:
    if key == COMPLETED or not _KEY.match(str(key)):
        raise UserError(f"invalid schema key {key!r}: use letters, digits, '_' or '-', not {COMPLETED!r}")
    if not isinstance(v, Mapping) or "shape" not in v or "dtype" not in v:
        raise UserError(f"schema entry {key!r} needs 'shape' and 'dtype', got {v!r}")
    try:
        dt = np.dtype(str(v["dtype"]))
    except TypeError as exc:
        raise UserError(f"schema entry {key!r}: unknown dtype {v['dtype']!r}") from exc
    if dt.kind not in "biuf":
        raise UserError(f"schema entry {key!r}: dtype {dt} is not a bool, integer or float type")
    shape = v["shape"]
    shape = [shape] if isinstance(shape, int) else list(shape)
    if not all(isinstance(s, (int, np.integer)) and int(s) >= 0 for s in shape):
        raise UserError(f"schema entry {key!r}: shape must be a list of non-negative ints, got {v['shape']!r}")
    return {"shape": [int(s) for s in shape], "dtype": dt.name}


def standard_spec(num_models: int, n_train: int, n_targets: int, outputs: Iterable[str] = ("masks", "margins"),
                  num_classes: int | None = None, extra: Mapping[str, Mapping] | None = None,
                  meta: Mapping[str, Any] | None = None) -> DatamodelSpec:
    """The usual schema: ``masks`` (n_train,) bool, ``margins``/``loss`` (n_targets,) float32, ``logits``
    (n_targets, C) float32, plus any user-declared ``extra`` keys."""
    outputs = list(outputs)
    bad = [o for o in outputs if o not in STANDARD_OUTPUTS]
    if bad:
        raise UserError(f"unknown outputs {bad}; standard outputs are {STANDARD_OUTPUTS} (declare others in extra)")
    if "masks" not in outputs:
        outputs.insert(0, "masks")
    schema: dict[str, dict] = {}
    for o in outputs:
        if o == "masks":
            schema[o] = {"shape": [n_train], "dtype": "bool"}
        elif o == "logits":
            if not num_classes:
                raise UserError("the 'logits' output needs num_classes")
            schema[o] = {"shape": [n_targets, int(num_classes)], "dtype": "float32"}
        else:
            schema[o] = {"shape": [n_targets], "dtype": "float32"}
    schema.update({k: dict(v) for k, v in (extra or {}).items()})
    return DatamodelSpec(num_models, schema, dict(meta or {}))
