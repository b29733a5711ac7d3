"""The MNIST study's five experiments end to end on a tiny setting (digits, one hidden layer of
32, 2 epochs): output files, a verdict for every claim, shared runs trained once, seeds
aggregated, schedules wired in, bad options rejected."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from batchlab.errors import ConfigError
from batchlab.experiments import Context, run_experiment
from batchlab.experiments.study import mean_sd, pm
from batchlab.experiments.verdicts_legacy import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from batchlab.runs.store import Store

TINY = {"epochs": 2, "hidden": [32], "dataset": "digits"}
FIVE = ("batch-size", "learning-rate", "switch", "distance", "adam-vs-sgd")
OPTIONS = {
    "batch-size": {"batch_sizes": [64, 256]},
    "learning-rate": {"batch_sizes": [64, 256]},
    "switch": {"batch_sizes": [64, 256]},
    "distance": {"batch_sizes": [64, 256], "lrs": [0.01, 0.1]},
    "adam-vs-sgd": {},
}
FILES = {
    "batch-size": ["accuracy_curves.png", "accuracy_curves_zoom.png"],
    "learning-rate": ["accuracy_curves.png"],
    "switch": ["accuracy_last_epochs.png", "accuracy_full.png"],
    "distance": ["wba_heatmap.png", "distance_curves.png"],
    "adam-vs-sgd": ["distance_curves.png", "layer_geometry.png", "accuracy_curves.png"],
}


def _ctx(tmp_path: Path, store: Store, options: dict, seeds: int = 1) -> Context:
    return Context(preset="quick", seeds=seeds, out_dir=tmp_path / "out", store=store,
                   console=Console(file=io.StringIO()), options={**TINY, **options})


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, Path]:
    """Run all five experiments once into one store (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("study")
    outputs, counts = {}, {}
    with Store(tmp / "runs.db") as st:
        for name in FIVE:
            outputs[name], _ = run_experiment(name, _ctx(tmp, st, OPTIONS[name]))
            counts[name] = len(st.runs())
    return tmp / "out", outputs, counts, tmp / "runs.db"


@pytest.mark.parametrize("name", FIVE)
def test_experiment_writes_outputs_and_a_verdict_for_every_claim(five, name):
    out, outputs, _, _ = five
    d = out / name
    for f in ["results.csv", "summary.md", "claims.json", "curves.csv", *FILES[name]]:
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    claims = json.loads((d / "claims.json").read_text())["claims"]
    assert claims and len(claims) == len(outputs[name].claims)
    summary = (d / "summary.md").read_text()
    for c in claims:
        assert c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
        assert c["evidence"] and c["id"] in summary
    assert "rule:" in summary and "digits" in summary and "E = **2** epochs" in summary


def test_shared_reference_runs_are_trained_once(five):
    _, _, counts, _ = five
    # batch-size: 64, 256; learning-rate adds only 256 @ 0.1; switch adds b..e (a is shared);
    # distance adds 64 @ 0.1 and the long run (the other cells are shared); adam adds Adam
    assert counts == {"batch-size": 2, "learning-rate": 3, "switch": 7, "distance": 9,
                      "adam-vs-sgd": 10}


def test_distance_table_and_long_run(five):
    out, outputs, _, _ = five
    summary = (out / "distance" / "summary.md").read_text()
    assert "| batch size | lr 0.01 | lr 0.1 |" in summary
    rows = outputs["distance"].rows
    long = [r for r in rows if r["epochs"] == 8]  # (256 / 64) x 2 epochs
    assert len(long) == 1 and long[0]["batch_size"] == 256
    short64 = next(r for r in rows if r["batch_size"] == 64 and r["lr"] == 0.01)
    assert long[0]["steps"] == 8 * math.ceil(1437 / 256)
    assert short64["steps"] == 2 * math.ceil(1437 / 64)


def _kind(cfg: dict) -> str:
    if cfg["schedule"]:
        return "c" if cfg["schedule"][0]["epochs"] == 1 else "d"
    if cfg["lr_multipliers"]:
        return "e"
    return "a" if cfg["batch_size"] == 64 else "b"


def test_switch_runs_follow_their_schedules(five):
    with Store(five[3]) as st:
        curves = {_kind(r.config): st.epochs(r.run_id)[1:] for r in st.runs(label="switch")}
    sizes = {k: [e["batch_size"] for e in v] for k, v in curves.items()}
    # (a) was trained by batch-size (same config, stored once under that label)
    assert sizes == {"b": [256] * 4, "c": [256, 64, 64],
                     "d": [256, 256, 64, 64], "e": [256] * 4}
    assert [e["lr"] for e in curves["e"]] == pytest.approx([0.01, 0.01, 0.1, 0.1])


def test_seeds_are_aggregated(five, tmp_path):
    with Store(five[3]) as st:  # seed 0 is in the store already; only seed 1 trains
        output, d = run_experiment("batch-size", _ctx(tmp_path, st, OPTIONS["batch-size"], 2))
    assert " ± " in (d / "summary.md").read_text()
    assert all(c.evidence.get("n_a", 2) == 2 for c in output.claims)
    assert sorted({r["seed"] for r in output.rows}) == [0, 1]


@pytest.mark.parametrize(("name", "options"), [
    ("batch-size", {"epoch": 3}),  # typo'd key
    ("distance", {"lrs": "fast"}),
    ("switch", {"batch_sizes": [64, 128, 256]}),
    ("learning-rate", {"epochs": 0}),
])
def test_bad_options_are_config_errors(tmp_path, name, options):
    with Store(tmp_path / "runs.db") as st, pytest.raises(ConfigError):
        run_experiment(name, _ctx(tmp_path, st, options))


def test_mean_and_spread_formatting():
    assert pm([0.9, 0.92], 100) == f"91.00 ± {math.sqrt(2) :.2f}"
    assert pm([0.9], 100) == "90.00"
    assert pm([float("nan")]) == "n/a"
    assert pm([0.9, float("nan")], 100) == "90.00 (1 missing)"
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
