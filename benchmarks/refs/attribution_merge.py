"""Merge attribution results of several runs into the files under ``benchmarks/results/``.

The job writes one ``attribution.json`` per run; when the models of one experiment were run separately (here: the digits
MLP with a smaller protocol than the logistic model, sharing its ground-truth store), this puts them in one file: the
first run's ``protocol``, every run's models, and each model's own protocol under ``protocol_by_model``. The same for
``attribution_refs.py`` outputs (rows per model). Nothing is recomputed or edited besides the added ``note``.

    python benchmarks/refs/attribution_merge.py job OUT.json RUN1/attribution.json RUN2/attribution.json \\
        --note ... [--plot OUT.png]
    python benchmarks/refs/attribution_merge.py refs OUT.json A.json B.json --note ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge_job(paths: list[Path], note: str) -> dict:
    recs = [json.loads(p.read_text()) for p in paths]
    out = {"protocol": {**recs[0]["protocol"], "note": note}, "models": {}, "protocol_by_model": {}, "sources": []}
    for p, r in zip(paths, recs):
        for label, m in r["models"].items():
            out["models"][label] = m
            out["protocol_by_model"][label] = r["protocol"]
        out["sources"].append(str(p))
    return out


def merge_refs(paths: list[Path], note: str) -> dict:
    recs = [json.loads(p.read_text()) for p in paths]
    out = {**recs[0], "models": {}, "runs": []}
    out["protocol"] = {**recs[0]["protocol"], "note": note}
    for p, r in zip(paths, recs):
        for label, m in r["models"].items():
            if label in out["models"]:  # a second run on the same model adds rows (e.g. another TRAK form)
                out["models"][label]["rows"] += m["rows"]
            else:
                out["models"][label] = m
        out["runs"].append({"source": str(p), "protocol": r["protocol"], "machine": r.get("machine")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["job", "refs"])
    ap.add_argument("out", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+")
    ap.add_argument("--note", default="")
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    rec = (merge_job if a.kind == "job" else merge_refs)(a.inputs, a.note)
    a.out.write_text(json.dumps(rec, indent=1) + "\n")
    if a.plot is not None:
        from datamatters.evaluation.attribution import tables_from_results

        tables_from_results(a.out, plot=a.plot)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
