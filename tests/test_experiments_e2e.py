"""End to end on tiny settings: the experiments beyond the MNIST study's five (sharpness,
step-lengths, large-batch-fixes, steps-to-target, throughput, schedules).

Each run checks: the files, a verdict for every claim that follows from its interval and
region (`check_document`), the findings it must cover, and at least one verdict whose
direction is known on a setting where the effect is large or exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchlab.experiments import Context, run_experiment
from batchlab.experiments.claims import check_document
from batchlab.runs.store import Store

TINY = {"hidden": [16], "dataset": "digits"}


def _run(tmp_path: Path, name: str, seeds: int = 2, **opts: object) -> dict[str, dict]:
    with Store(tmp_path / "runs.db") as st:
        ctx = Context(preset="quick", seeds=seeds, out_dir=tmp_path / "out", store=st,
                      options={**TINY, **opts})
        output, path = run_experiment(name, ctx)
    doc = json.loads((path / "claims.json").read_text())
    assert check_document(doc) == []
    assert {"results.csv", "summary.md", "claims.json"} <= {p.name for p in path.iterdir()}
    assert len(doc["claims"]) == len(output.claims) > 0
    return {c["id"]: c for c in doc["claims"]}


def _findings(claims: dict[str, dict]) -> set[str]:
    return {f for c in claims.values() for f in c["finding"].split(",")}


def test_step_lengths(tmp_path: Path) -> None:
    claims = _run(tmp_path, "step-lengths", batch_sizes=[8, 64], epochs=1)
    assert {"C1", "P4", "K6", "C6", "P6"} <= _findings(claims)
    # exact: a batch of one normalizes every value to zero - an identity, never evidence
    assert claims["batchnorm-batch-1"]["verdict"] == "untestable"
    # sampling theory: the minibatch error's log-log slope is -1/2 - a check, not evidence
    assert claims["error-sqrt-m"]["reason"]["code"] == "construction"
    assert claims["error-sqrt-m"]["n"] == 2  # one slope per training seed, not per draw
    assert -0.7 < claims["error-sqrt-m"]["estimate"] < -0.3


def test_sharpness(tmp_path: Path) -> None:
    claims = _run(tmp_path, "sharpness", epochs=1, large_epochs=2, curvature_samples=200,
                  trace_rtol=0.5, slq_steps=5, subspace_dim=5, k7_samples=256, k7_steps=10)
    assert {"K1", "K2", "K3", "K4", "K5", "K7"} <= _findings(claims)
    # K7 is measured: one lr sweep per seed from its initial weights, bracketing 2 / lambda_max
    # (or censored, then untestable by its gate) - never "unmeasured"
    k7 = claims["curvature-bounds-lr"]
    assert (k7.get("reason") or {}).get("code") != "unmeasured"
    for s in k7["evidence"]["per_seed"]:
        assert s["lambda_max"] > 0 and s["runs"]
        assert s["censored"] or s["lr_max"] < 2 / s["lambda_max"] * 8 and s["ratio"] > 0
    # two epochs of a large batch on digits: not converged / not comparable -> K1 untestable
    assert {g["name"] for g in claims["generalization-gap"]["gates"]} == {
        "small converged", "large converged", "small has learned", "large has learned",
        "comparable train accuracy"}
    assert claims["generalization-gap"]["n"] == 2
    assert "paired per-example" in claims["generalization-gap"]["method"]
    assert sum(c.get("primary") is True for c in claims.values() if c["finding"] == "K2") == 1


def test_schedules(tmp_path: Path) -> None:
    claims = _run(tmp_path, "schedules", epochs=2, decay_epochs=[1], base_batch=32,
                  large_batch=256, gbn=False)
    assert {"R1", "R2", "R3"} <= _findings(claims)
    # Smith's schedule multiplies the batch at each decay: fewer updates by design, a constant
    # of the design that no seed can change - untestable, not evidence
    assert claims["smith-fewer-updates"]["verdict"] == "untestable"
    assert claims["smith-fewer-updates"]["reason"]["code"] == "construction"
    # accuracies paired on the shared test set with the runs' per-example correctness, and
    # "matches the small batch" gated on both arms having converged
    goyal = claims["goyal-closes-gap"]
    assert "paired per-example" in goyal["method"]
    assert {g["name"] for g in goyal["gates"]} == {"goyal converged", "small converged",
                                                   "goyal has learned", "small has learned"}


def test_large_batch_fixes(tmp_path: Path) -> None:
    # discarding 90% of every batch throws most of the signal away: it cannot help
    claims = _run(tmp_path, "large-batch-fixes", batch_size=256, epochs=2, discard=0.9)
    assert {"C2", "C3", "C4", "C5", "C7"} <= _findings(claims)
    assert claims["discarding-helps"]["verdict"] in ("not_reproduced", "inconclusive")
    assert claims["discarding-helps"]["estimate"] < 0
    # paired by seed on the shared test set, with the runs' per-example correctness
    assert "paired per-example" in claims["discarding-helps"]["method"]


@pytest.mark.parametrize("name", ["steps-to-target", "throughput"])
def test_steps_and_throughput(tmp_path: Path, name: str) -> None:
    from batchlab.runs.tasks import threads

    sizes = [16, 64, 256] if name == "steps-to-target" else [1, 16, 256]
    # one intra-op thread: on a loaded 2-core machine, OpenMP threads of a batch-256 step can
    # stall behind other processes (CI saw it 30x slower), while batch 1 never goes parallel
    with threads(1):
        claims = _run(tmp_path, name, batch_sizes=sizes, lrs=[0.3, 1.0], max_epochs=4,
                      target_value=0.8)
    want = {"G1", "G3", "P3"} if name == "steps-to-target" else {"P1", "P5"}
    assert want <= _findings(claims)
    if name == "steps-to-target":
        # batch 1 on a 16-wide MLP: per-step overhead dominates, so its time to target is far
        # longer than the grid's fastest (its lower bound too, if it missed the target)
        assert claims["tiny-batch-slow"]["estimate"] > 1
        assert claims["tiny-batch-slow"]["verdict"] != "not_reproduced"
    if name == "throughput":
        # 1 -> 256 samples per step on a 16-wide MLP: per-step overhead dominates, so samples/s
        # grow by two orders of magnitude, far beyond the timing noise of a loaded machine
        # in every seed's own timing pass (the grid is timed once per seed)
        for rows in claims["throughput-grows"]["evidence"]["grid"].values():
            grid = dict(rows)
            assert grid[256] > 2 * grid[1]
        assert claims["throughput-grows"]["n"] == 2
        assert claims["throughput-grows"]["estimate"] > 0
        # P1's memory half is measured (a peak that can be reset) or says why not
        mem = claims["memory-grows"]
        assert mem["verdict"] != "untestable" or mem["reason"]["code"] == "unmeasured"


def test_findings_registry_matches_the_checklist() -> None:
    """Every id of ../shared/study/FINDINGS.md is in the registry the report lists, and back."""
    import re

    from batchlab.experiments.findings import FINDINGS, STUDY_NUMBERS

    path = Path(__file__).resolve().parents[1].parent / "shared" / "study" / "FINDINGS.md"
    if not path.exists():
        pytest.skip("../shared/study/FINDINGS.md is not beside this checkout")
    ids = set(re.findall(r"^- `([SKCPGR]\d+)`", path.read_text(), flags=re.M))
    assert ids == set(FINDINGS)
    assert {n.finding for n in STUDY_NUMBERS} <= ids


def test_reproduce_cli_end_to_end(tmp_path: Path) -> None:
    """`reproduce` through the real CLI on tiny settings: one JSON object on stdout, a valid
    claims document, study_numbers.csv with every registry row, and the report."""
    import csv
    import subprocess
    import sys

    from batchlab.experiments.findings import STUDY_NUMBERS

    cmd = [sys.executable, "-m", "batchlab", "reproduce", "--only", "schedules", "--only",
           "step-lengths", "--seeds", "2", "--set", "dataset=digits", "--set", "hidden=[16]",
           "--set", "epochs=1", "--set", "schedules.decay_epochs=[1]", "--set",
           "schedules.gbn=false", "--set", "step-lengths.batch_sizes=[8,64]",
           "--out", str(tmp_path / "out"), "--store", str(tmp_path / "s.db"), "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # exactly one JSON object
    assert {c["experiment"] for c in doc["claims"]} == {"schedules", "step-lengths"}
    file_doc = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert check_document(file_doc) == []
    rows = list(csv.DictReader((tmp_path / "out" / "study_numbers.csv").open()))
    assert len(rows) == len(STUDY_NUMBERS)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "step-lengths" in html and "schedules" in html
    bad = subprocess.run([*cmd[:4], "--set", "nosuchkey=1", "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nosuchkey" in bad.stderr and "Traceback" not in bad.stderr


def _stt_row(bs: int, lr: float, seed: int, steps: int | None, sps: float, budget: int = 1000) -> dict:
    return {"batch_size": bs, "lr": lr, "seed": seed, "status": "completed",
            "reached": steps is not None, "steps_to_target": steps, "budget_steps": budget,
            "seconds_per_step": sps}


def test_tiny_batch_claims_truth_and_lower_bounds() -> None:
    """P3 on synthetic runs whose truth is known: the tiny batch takes 10x the grid's best
    time -> reproduced; when it misses the target in a seed its time is only a lower bound, so
    the interval is open above and can never say not_reproduced."""
    from batchlab.experiments.steps_to_target_claims import tiny_batch_claims

    grid = [_stt_row(16, lr, s, 100 + s, 0.01) for lr in (0.1, 0.3) for s in range(3)]
    slow = [_stt_row(1, 0.1, s, 1000 + 37 * s, 0.01) for s in range(3)]
    c = {x.id: x for x in tiny_batch_claims(grid, slow)}
    assert c["tiny-batch-slow"].verdict == "reproduced"
    assert 9 < c["tiny-batch-slow"].interval.estimate < 11
    # as fast as the grid in two seeds, a missed target (budget 50 steps) in the third: the
    # ratios straddle 1 and the open upper end keeps the verdict inconclusive
    fast = [_stt_row(1, 0.1, s, 100 + s, 0.01) for s in range(2)] + [_stt_row(1, 0.1, 2, None, 0.01, budget=50)]
    c = {x.id: x for x in tiny_batch_claims(grid, fast)}
    assert c["tiny-batch-slow"].interval.hi == float("inf")
    assert c["tiny-batch-slow"].to_json()["ci"][1] is None
    assert c["tiny-batch-slow"].verdict == "inconclusive"
    # instability: both grid lrs reach the target at batch 16, one of two at batch 1 in every
    # seed: the same fraction in every seed is a zero-width interval, which cannot decide
    half = [_stt_row(1, 0.1, s, 1000, 0.01) for s in range(3)] + [_stt_row(1, 0.3, s, None, 0.01) for s in range(3)]
    c = {x.id: x for x in tiny_batch_claims(grid, half)}
    assert c["tiny-batch-unstable"].interval.estimate == pytest.approx(0.5)
    assert c["tiny-batch-unstable"].verdict == "untestable"
    assert c["tiny-batch-unstable"].reason["code"] == "zero-width"


def test_k4_basin_claim_uses_every_seed() -> None:
    """K4's quantity is defined for every seed, also when the small-batch end is not at its
    minimum (its side falls): a seed is never dropped, and the direction is known here."""
    from batchlab.experiments.sharpness import ALPHAS, sharpness_claims

    def line(rise_large: float, rise_small: float) -> list[dict]:
        loss = {0.0: 0.1, -0.5: 0.1 + rise_small, 1.0: 0.2, 1.5: 0.2 + rise_large}
        return [{"alpha": a, "train_loss": loss.get(round(a, 3), 1.0)} for a in ALPHAS]

    ok = [{"seed": 0, "regime": r, "test_acc": 0.9, "train_acc": 0.95, "lambda_max": 1.0 + i,
           "sharp_full_0.001": 1.0, "sharp_full_0.0005": 1.0, "sharp_sub4_0.001": 1.0,
           "sharp_sub4_0.0005": 1.0} for i, r in enumerate(("small", "large", "switch"))]
    steep = {s: line(0.3 + 0.01 * s, -0.02) for s in range(3)}
    c = {x.id: x for x in sharpness_claims(ok, steep, 4, 1000)}["large-basin-steeper"]
    assert c.interval.n == 3 and c.verdict == "reproduced"
    flat = {s: line(0.01 + 0.01 * s, 0.3) for s in range(3)}
    c = {x.id: x for x in sharpness_claims(ok, flat, 4, 1000)}["large-basin-steeper"]
    assert c.verdict == "not_reproduced"


def test_quick_options_sit_under_the_users_options() -> None:
    """The quick preset's smaller MLP for the non-study experiments: only in quick, only for
    the built-in MLP, and a user's --set always wins."""
    from batchlab.experiments import get
    from batchlab.experiments.base import QUICK_HIDDEN

    for name in ("sharpness", "steps-to-target", "throughput", "schedules", "large-batch-fixes"):
        exp = get(name)
        assert exp.options_for(Context()) == {"hidden": QUICK_HIDDEN}
        assert exp.options_for(Context(preset="paper")) == {}
        assert exp.options_for(Context(options={"hidden": [64]})) == {"hidden": [64]}
        assert exp.options_for(Context(model="cnn")) == {}
    assert get("batch-size").options_for(Context()) == {}  # the study keeps its own MLP
