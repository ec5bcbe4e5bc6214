"""README benchmark tables are generated from benchmarks/results/*.json: a stale README fails here."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def results(tmp_path, report, monkeypatch):
    """A private copy of benchmarks/results that a test may edit."""
    dst = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", dst, ignore=shutil.ignore_patterns("*.png"))
    monkeypatch.setattr(report, "RESULTS", dst)
    return dst


def test_readme_blocks_equal_report_output(report):
    """Every marker block in README.md and benchmarks/README.md is exactly what report.py renders now."""
    readme = report.blocks((ROOT / "README.md").read_text())
    assert {"datamodels", "valuation", "influence", "dynamics", "rho_speedup"} <= set(readme)
    bench = report.blocks((ROOT / "benchmarks" / "README.md").read_text())
    assert "index" in bench
    for doc, found in (("README.md", readme), ("benchmarks/README.md", bench)):
        for name, body in found.items():
            assert report.UNRENDERABLE not in body, body
            assert body == report.render(name).strip("\n"), (
                f"{doc} block {name!r} is stale: run `python benchmarks/report.py --write`")
    assert report.main(["--check"]) == 0


def test_changed_number_changes_the_table(report, results):
    before = report.render("datamodels")
    d = json.loads((results / "datamodels_regression.json").read_text())
    case = d["cases"]["full_path"]
    assert report.goal_ge(case["speedup"], 20.0) in before  # the committed JSON's like-for-like full path
    case["ours_cpu_s"]["median"] = case["sklearn_cpu_s"]["median"] / 25.0
    case["speedup"] = 25.0
    (results / "datamodels_regression.json").write_text(json.dumps(d))
    after = report.render("datamodels")
    assert after != before
    assert "goal 20x: 25.0x — met" in after


def test_extrapolated_numbers_are_marked(report, results):
    d = json.loads((results / "valuation_scale.json").read_text())
    d["cases"]["data_oob"].update(extrapolated=True, extrapolated_from="8 of 200 bags")
    (results / "valuation_scale.json").write_text(json.dumps(d))
    assert "(extrapolated from 8 of 200 bags)" in report.render("valuation_scale")
    d["cases"]["data_oob"]["extrapolated"] = False
    (results / "valuation_scale.json").write_text(json.dumps(d))
    assert "extrapolated" not in report.render("valuation_scale")


def test_write_and_check_on_a_stale_doc(report, results, tmp_path, monkeypatch):
    doc = tmp_path / "README.md"
    doc.write_text("intro\n\n<!-- report:influence -->\n| old | table |\n<!-- /report:influence -->\n\noutro\n")
    monkeypatch.setattr(report, "DOCS", (doc,))
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.main(["--check"]) == 1
    assert report.main(["--write"]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n\n<!-- report:influence -->\n")
    assert text.endswith("<!-- /report:influence -->\n\noutro\n")
    assert "| old | table |" not in text and "goal 3x:" in text  # the Direct / Arnoldi goal, met or missed
    assert report.main(["--check"]) == 0


def test_unknown_layout_is_flagged_not_fatal(report, results):
    (results / "influence_vs_pydvl.json").write_text(json.dumps({"results": ["direct"]}))
    assert report.render("influence").startswith("_Could not render influence: TypeError")
    assert "goal 20x" in report.render("datamodels")  # the other blocks still render


def test_missing_file_and_unknown_marker(report, results):
    (results / "influence_vs_pydvl.json").unlink()
    assert "No results yet" in report.render("influence")
    with pytest.raises(KeyError, match="unknown report marker 'nope'"):
        report.render("nope")


def test_formatting(report):
    assert report.sig(151.58722987899964) == "152" and report.sig(0.42997) == "0.430"
    assert report.sig(4214.355) == "4,214" and report.ratio(float("nan")) == "n/a"
    assert report.goal_ge(8.4949, 20) == "**goal 20x: 8.49x — missed**"
    assert report.goal_le(18.6, 60, unit=" s") == "goal 60 s: 18.6 s — met"


def test_protocol_gaps(report, results):
    assert report.protocol_gaps("datamodels_regression.json", comparative=True) == "none"
    (results / "bare.json").write_text(json.dumps({"seconds": [1.0, 2.0]}))
    assert report.protocol_gaps("bare.json", comparative=True) == "machine, threads, repetitions, min, median, speedup"
    assert report.protocol_gaps("bare.json", comparative=False) == "machine, threads, repetitions, min, median"
    (results / "bare.json").write_text(json.dumps({"machine": {"cpus": 2}, "threads": 1, "reps": 3,
                                                   "sides": {"a": {"min_s": 1, "median_s": 2}}, "speedup": 2.0}))
    assert report.protocol_gaps("bare.json", comparative=True) == "none"


def test_rho_speedup_summary_layout_uses_its_own_renderer(report, results):
    """rho_speedup.py's merged layout ("summary") is rendered by benchmarks/rho_speedup_table.py, goals in the index."""
    row = {"baseline": "uniform", "label": "reducible_loss", "reached": 5, "seeds": 5, "final_acc": 0.61,
           "corrupted_frac": 0.01, "overhead": 0.3}
    for k, v in (("sp_steps", 2.5), ("sp_secs", 1.2), ("sp_secs_il", 1.1), ("sp_cpu_il", 1.0)):
        row.update({k: v, k + "_lo": v - 0.2, k + "_hi": v + 0.2})
    d = {"summary": {"mnist1d:uniform:0.1": [row]}, "setup": {"n_B": 320}, "reps": 5,
         "goals": {"rho_steps_speedup_mnist1d_10pct >= 3": {"measured": 2.5, "met": False}}}
    (results / "rho_speedup.json").write_text(json.dumps(d))
    md = report.render("rho_speedup")
    assert md == report._rho_table_module().markdown(d) and "2.50 [2.30, 2.70]" in md
    assert "rho_steps_speedup_mnist1d_10pct >= 3: **missed**" in report.render_index()


def test_attribution_renders_only_attribution_job_results(report, results):
    for f in results.glob("attribution*.json"):
        f.unlink()
    assert "No results yet" in report.render("attribution")
    (results / "attribution_refs.json").write_text(json.dumps({"models": {"logistic": {"rows": [{"method": "x"}]}}}))
    assert "No results yet" in report.render("attribution")  # another layout (no LDS rows): not an attribution table


def test_workers_status_quotes_the_recorded_load(report, results):
    """The index says under which load 2 workers were timed (read from the JSON, not a fixed label)."""
    d = json.loads((results / "valuation_overhead.json").read_text())
    w = d["cases"]["workers"]
    for r in w["serial"]["runs"] + w["two_workers_reused_pool"]["runs"]:
        r["load_average_1min"] = 4.2
    (results / "valuation_overhead.json").write_text(json.dumps(d))
    index = report.render("index")
    assert "2 workers goal 1x: 1.75x — met (load average 4.2-4.2 on 2 cores)" in index
    assert "loaded machine" not in index
    assert "load average 4.2-4.2 on 2 cores" in report.render("valuation_scale")
