"""The MNIST study's five experiments end to end on a tiny setting (digits, hidden 16-16, 2
epochs, 3 seeds): output files, a schema-valid claims.json whose every verdict follows from its
interval, a known-direction verdict per experiment where the effect is large (batch 8 vs 1024
at lr 0.01), the study's numbers measured, shared runs trained once, schedules wired in, bad
options rejected, and the report leading with every finding's verdict."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from batchlab.errors import ConfigError
from batchlab.experiments import Context, findings, run_experiment
from batchlab.experiments.claims import check_document
from batchlab.experiments.study import mean_sd, pm
from batchlab.experiments.verdicts import REPRODUCED, UNTESTABLE
from batchlab.report import write_report
from batchlab.runs.store import Store

SEEDS = 3
TINY = {"epochs": 2, "hidden": [16, 16], "dataset": "digits"}
FIVE = ("batch-size", "learning-rate", "switch", "distance", "adam-vs-sgd")
OPTIONS = {
    "batch-size": {"batch_sizes": [8, 1024]},
    "learning-rate": {"batch_sizes": [8, 1024]},
    "switch": {"batch_sizes": [8, 1024]},
    "distance": {"batch_sizes": [8, 128], "lrs": [0.01, 0.1]},
    "adam-vs-sgd": {"batch_size": 8},
}
FILES = {
    "batch-size": ["accuracy_curves.png", "accuracy_curves_zoom.png"],
    "learning-rate": ["accuracy_curves.png"],
    "switch": ["accuracy_last_epochs.png", "accuracy_full.png"],
    "distance": ["wba_heatmap.png", "distance_curves.png"],
    "adam-vs-sgd": ["distance_curves.png", "layer_geometry.png", "accuracy_curves.png"],
}
# a verdict each experiment must reach on this setting, where the effect is large: batch 8
# trains for 360 steps, batch 1024 for 4 (near chance, still climbing: accuracy claims about
# where the arms end up are untestable at this budget); Adam moves every weight by ~lr a step
KNOWN = {
    "batch-size": ("bs-test-acc", UNTESTABLE),
    "learning-rate": ("lr-recovers", UNTESTABLE),
    "switch": ("switch-control", UNTESTABLE),
    "distance": ("large-batch-travels-less", REPRODUCED),
    "adam-vs-sgd": ("adam-farther-from-init", REPRODUCED),
}
FINDING_IDS = {"batch-size": {"S1"}, "learning-rate": {"S2"}, "switch": {"S3"},
               "distance": {"S9", "S10", "S11"}, "adam-vs-sgd": {"S12", "S13", "S14"}}


def _ctx(tmp_path: Path, store: Store, options: dict, seeds: int = SEEDS) -> Context:
    return Context(preset="quick", seeds=seeds, out_dir=tmp_path / "out", store=store,
                   options={**TINY, **options})


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
def test_experiment_writes_valid_claims_and_a_known_verdict(five, name):
    out, outputs, _, _ = five
    d = out / name
    for f in ["results.csv", "summary.md", "claims.json", "curves.csv", "study_numbers.csv",
              *FILES[name]]:
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    doc = json.loads((d / "claims.json").read_text())
    assert check_document(doc) == []  # schema, lo < hi, every verdict follows from ci + region
    claims = doc["claims"]
    assert len(claims) == len(outputs[name].claims)
    assert {f for c in claims for f in c["finding"].split(",")} == FINDING_IDS[name]
    for fid in FINDING_IDS[name]:  # every finding has a claim its verdict rests on
        mine = [c for c in claims if fid in c["finding"].split(",")]
        assert any(c.get("primary") is not False for c in mine), fid
    summary = (d / "summary.md").read_text()
    assert all(c["id"] in summary for c in claims)
    assert "rule:" in summary and "digits" in summary and "E = **2** epochs" in summary
    cid, verdict = KNOWN[name]
    got = next(c for c in claims if c["id"] == cid)
    assert got["verdict"] == verdict, got
    if verdict == UNTESTABLE:  # after 2 epochs no arm's train accuracy has plateaued
        assert got["reason"]["code"] == "regime" and "converged" in got["reason"]["text"], got
    for c in claims:  # n = training seeds, whatever the claim summarises inside a seed
        assert c["n"] in (0, SEEDS) and len(c["replicates"]) == c["n"], c["id"]


@pytest.mark.parametrize("name", FIVE)
def test_study_numbers_are_measured(five, name):
    out, outputs, _, _ = five
    numbers = outputs[name].study_numbers
    measured = [n for n in numbers if n.measured is not None]
    assert measured and all(n.match_note for n in numbers)
    assert all(findings.key(n) in {findings.key(r) for r in findings.STUDY_NUMBERS} for n in measured)
    rows = list(csv.DictReader((out / name / "study_numbers.csv").open()))
    assert len(rows) == len(findings.STUDY_NUMBERS)
    ours = [r for r in rows if r["measured"]]
    assert len(ours) == len({findings.key(n) for n in measured})
    assert all("quick preset, digits" in r["match_note"] for r in ours)
    assert all(float(r["ci_lo"]) <= float(r["measured"]) <= float(r["ci_hi"]) for r in ours
               if r["ci_lo"] and r["ci_hi"])


def test_study_numbers_cover_every_quoted_number_of_the_curve_findings(five):
    _, outputs, _, _ = five
    got = {findings.key(n) for o in outputs.values() for n in o.study_numbers}
    want = {findings.key(n) for n in findings.STUDY_NUMBERS
            if n.finding in {"S1", "S2", "S3", "S9", "S10", "S12", "S13"}}
    assert want <= got, sorted(want - got)


def test_s1_bs2_row_is_blank_when_batch_2_was_not_run(five):
    out, outputs, _, _ = five
    row = next(r for r in csv.DictReader((out / "batch-size" / "study_numbers.csv").open())
               if r["finding"] == "S1" and "bs 2 " in r["setting"])
    assert row["measured"] == row["ci_lo"] == row["ci_hi"] == ""
    assert "batch size 2 was not run" in row["match_note"]


def test_accuracy_by_batch_csv_feeds_the_report(five):
    out, _, _, _ = five
    rows = list(csv.DictReader((out / "batch-size" / "accuracy_by_batch.csv").open()))
    assert list(rows[0]) == ["batch_size", "metric", "estimate", "lo", "hi"]
    assert {(r["batch_size"], r["metric"]) for r in rows} == {
        (b, m) for b in ("8", "1024") for m in ("test_acc", "gap")}
    for r in rows:
        assert float(r["lo"]) < float(r["estimate"]) < float(r["hi"])
    acc = {r["batch_size"]: float(r["estimate"]) for r in rows if r["metric"] == "test_acc"}
    assert acc["8"] > acc["1024"] + 0.1  # 360 steps against 4


def test_claims_rest_on_every_seed(five):
    _, outputs, _, _ = five
    out = outputs["batch-size"]
    by_id = {c.id: c for c in out.claims}
    assert by_id["bs-test-acc"].interval.n == SEEDS
    assert by_id["bs-test-acc-trend"].interval.n == SEEDS  # one slope per seed
    assert sorted({r["seed"] for r in out.rows}) == list(range(SEEDS))


def test_shared_reference_runs_are_trained_once(five):
    _, _, counts, _ = five
    # batch-size: 8, 1024; learning-rate adds only 1024 @ 0.1; switch adds b..e (a is shared);
    # distance adds 8 @ 0.1, 128 at both lrs and the long run; adam adds Adam (x 3 seeds)
    assert counts == {"batch-size": 6, "learning-rate": 9, "switch": 21, "distance": 33,
                      "adam-vs-sgd": 36}


def test_distance_table_and_long_run(five):
    out, outputs, _, _ = five
    summary = (out / "distance" / "summary.md").read_text()
    assert "| batch size | lr 0.01 | lr 0.1 |" in summary
    rows = outputs["distance"].rows
    long = [r for r in rows if r["epochs"] == 32]  # (128 / 8) x 2 epochs
    assert len(long) == SEEDS and {r["batch_size"] for r in long} == {128}
    short8 = next(r for r in rows if r["batch_size"] == 8 and r["lr"] == 0.01)
    assert long[0]["steps"] == 32 * math.ceil(1437 / 128)
    assert short8["steps"] == 2 * math.ceil(1437 / 8)


def _kind(cfg: dict) -> str:
    if cfg["schedule"]:
        return "c" if cfg["schedule"][0]["epochs"] == 1 else "d"
    if cfg["lr_multipliers"]:
        return "e"
    return "a" if cfg["batch_size"] == 8 else "b"


def test_switch_runs_follow_their_schedules(five):
    with Store(five[3]) as st:
        curves = {_kind(r.config): st.epochs(r.run_id)[1:] for r in st.runs(label="switch")}
    sizes = {k: [e["batch_size"] for e in v] for k, v in curves.items()}
    # (a) was trained by batch-size (same config, stored once under that label)
    assert sizes == {"b": [1024] * 4, "c": [1024, 8, 8], "d": [1024, 1024, 8, 8],
                     "e": [1024] * 4}
    assert [e["lr"] for e in curves["e"]] == pytest.approx([0.01, 0.01, 0.1, 0.1])


def test_report_leads_with_every_finding(five):
    out, _, _, _ = five
    page = write_report(out, list(FIVE)).read_text()
    top = page[:page.index("All claims")]
    for fid in findings.FINDINGS:
        assert f"<td>{fid}</td>" in top
    assert "not run" in top and "href='#distance'" in top and "study-numbers" in top
    assert "src='http" not in page and "<link" not in page  # self-contained


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


def test_one_seed_decides_nothing_that_needs_seed_variance(tmp_path):
    """With one training seed there is no seed variance (and no pooled one: every arm has the
    same single seed), so no claim is decided; every document still passes the checker."""
    with Store(tmp_path / "runs.db") as st:
        for name in ("batch-size", "adam-vs-sgd"):
            _, path = run_experiment(name, _ctx(tmp_path, st, OPTIONS[name], seeds=1))
            doc = json.loads((path / "claims.json").read_text())
            assert check_document(doc) == []
            for c in doc["claims"]:
                assert c["n"] <= 1, c["id"]
                assert c["verdict"] in ("inconclusive", "untestable"), (c["id"], c["verdict"])


def test_longer_runs_continue_the_shorter_ones(five):
    """Switch's (b), (d), (e) continue batch-size's run of the large batch, distance's long run
    continues its grid's run of the large batch (`runs.continuation`); (c) has no prefix."""
    with Store(five[3]) as st:
        kinds = {_kind(r.config): bool(r.env.get("continued_from"))
                 for r in st.runs(label="switch")}
        long = [r for r in st.runs(label="distance") if r.config["epochs"] == 32]
    assert kinds == {"b": True, "c": False, "d": True, "e": True}
    assert long and all(r.env.get("continued_from") for r in long)
