"""Planted cases for the curvature and step experiments' claims (sharpness, step-lengths,
large-batch-fixes) on the v3 verdict engine: n is the number of training seeds, an
undertrained or non-comparable arm makes K1-K3 untestable, identities and sampling-theory
facts are construction checks, K7 without its lr sweep is unmeasured (the sweep's planted
cases are in test_k7.py), and every claim rechecks."""

from __future__ import annotations

import json

import numpy as np

from batchlab.experiments.claims import check_document, claims_document
from batchlab.experiments.large_batch_fixes import fix_claims
from batchlab.experiments.sharpness import ALPHAS, sharpness_claims
from batchlab.experiments.step_lengths import step_claims

SEEDS = (0, 1, 2)


def _line() -> list[dict]:
    loss = {0.0: 0.1, -0.5: 0.1, 1.0: 0.2, 1.5: 0.5}
    return [{"alpha": a, "train_loss": loss.get(round(a, 3), 1.0)} for a in ALPHAS]


def _rows(train_large: float, plateau_large: float, rise_large: float = 0.8) -> list[dict]:
    """Three seeds x (small, large, switch); the large batch is sharper and worse on test."""
    out = []
    for s in SEEDS:
        for reg, tr, te, lam, pl in (("small", 0.99, 0.95, 5.0, 0.001),
                                     ("large", train_large, 0.90, 20.0, plateau_large),
                                     ("switch", 0.99, 0.93, 8.0, 0.001)):
            out.append({"seed": s, "regime": reg, "train_acc": tr + (0.001 if reg == "small" else 0.003) * s,
                        "test_acc": te + 0.002 * s, "lambda_max": lam * (1 + (0.11 if reg == "large" else 0.05) * s),
                        "plateau": pl, "correct": None,
                        "rise": (rise_large if reg == "large" else 0.85) + 0.001 * s,
                        **{k: lam for k in ("sharp_full_0.001", "sharp_full_0.0005",
                                            "sharp_sub4_0.001", "sharp_sub4_0.0005")}})
    return out


def _clean(claims: list) -> dict:
    doc = json.loads(json.dumps(claims_document([c.to_json() for c in claims])))
    assert check_document(doc) == []
    return {c["id"]: c for c in doc["claims"]}


def test_flat_but_untrained_large_batch_is_not_converged() -> None:
    """A large batch that never trained (train accuracy flat near chance) has a zero plateau
    change; the learned gate keeps it from passing as converged."""
    interp = {s: _line() for s in SEEDS}
    c = _clean(sharpness_claims(_rows(0.12, 0.0, rise_large=0.01), interp, 4, 1000))
    gap = c["generalization-gap"]
    assert gap["verdict"] == "untestable" and "large has learned" in gap["reason"]["text"]
    assert "large converged" not in gap["reason"]["text"]


def test_undertrained_large_batch_makes_k1_k3_untestable() -> None:
    """A large batch stopped early (train accuracy still rising, 5 points below the small
    batch): its gap and curvature are not Keskar's claims, so they come out untestable."""
    interp = {s: _line() for s in SEEDS}
    c = _clean(sharpness_claims(_rows(0.94, 0.03), interp, 4, 1000))
    for cid in ("generalization-gap", "larger-top-eigenvalue", "sharpness-vs-gap"):
        assert c[cid]["verdict"] == "untestable" and c[cid]["reason"]["code"] == "regime"
        assert "large converged" in c[cid]["reason"]["text"]
    assert {g["name"] for g in c["larger-top-eigenvalue"]["gates"]} == {
        "small converged", "large converged", "small has learned", "large has learned"}
    # the premise is itself a primary part of K1 and is decided as such
    assert c["comparable-train-accuracy"]["primary"] is True
    assert c["comparable-train-accuracy"]["verdict"] == "not_reproduced"


def test_converged_comparable_arms_are_decided_with_n_seeds() -> None:
    c = _clean(sharpness_claims(_rows(0.99, 0.001), {s: _line() for s in SEEDS}, 4, 1000))
    assert c["generalization-gap"]["verdict"] == "reproduced"
    assert c["larger-top-eigenvalue"]["verdict"] == "reproduced"
    assert all(c[k]["n"] == 3 for k in ("generalization-gap", "larger-top-eigenvalue",
                                        "sharpness-vs-gap", "large-basin-steeper",
                                        "noise-flattens"))
    # K7 without its lr sweep: unmeasured, never "reproduced"
    assert c["curvature-bounds-lr"]["verdict"] == "untestable"
    assert c["curvature-bounds-lr"]["reason"]["code"] == "unmeasured"
    assert "lr sweep" in c["curvature-bounds-lr"]["reason"]["text"]


def test_k7_sweeps_enter_the_sharpness_claims() -> None:
    """The per-seed sweeps given to sharpness_claims decide K7 (n = seeds), beside K1-K5."""
    sweeps = [{"seed": s, "lambda_max": 5.0 + s, "lr_max": 0.3, "lr_diverged": 0.36,
               "censored": None, "ratio": 0.3 * (5.0 + s) / 2, "runs": []} for s in SEEDS]
    c = _clean(sharpness_claims(_rows(0.99, 0.001), {s: _line() for s in SEEDS}, 4, 1000,
                                sweeps))["curvature-bounds-lr"]
    assert c["verdict"] == "reproduced" and c["n"] == 3 and c["region"] == {"between": [0.5, 2.0]}
    assert [p["ratio"] for p in c["evidence"]["per_seed"]] == [s["ratio"] for s in sweeps]


def _quality(seeds: tuple[int, ...] = SEEDS) -> dict:
    rng = np.random.default_rng(0)
    sizes = [1, 4, 16, 64]
    per_seed = {s: {"cos": {b: 1 - 1 / (1 + b) for b in sizes},
                    "dev": {b: float(b ** -0.5 * (1 + 0.02 * rng.standard_normal()))
                            for b in sizes},
                    "secant": [1.0, 2.0, 3.0], "lam": [1.0, 3.0 + s, 2.0 + 2 * s]}
                for s in seeds}
    # 16 draws per size and seed pooled: the pseudo-replicated n the old code counted
    return {"cos": {b: [0.5] * 16 * len(seeds) for b in sizes},
            "dev": {b: [b ** -0.5] * 16 * len(seeds) for b in sizes},
            "secant": [], "lam": [], "per_seed": per_seed, "bn_signal_1": 0.0,
            "bn_signal_64": 1.0}


def test_step_claims_count_seeds_not_draws_and_mark_construction() -> None:
    per_run = [{"batch_size": b, "seed": s, "step_grad_norm": 1.0 / b ** 0.5 * (1 + 0.1 * s),
                "step_update_norm": 1.0, "step_loss_update": -0.01 * b ** 0.3}
               for s in SEEDS for b in (8, 32, 128, 512)]
    c = _clean(step_claims(per_run, _quality()))
    for cid in ("grad-norm-decreases", "loss-update-grows", "direction-improves",
                "error-sqrt-m", "lars-secant-tracks-curvature"):
        assert c[cid]["n"] == 3, cid
    assert c["grad-norm-decreases"]["verdict"] == "reproduced"
    assert c["loss-update-grows"]["primary"] is True
    for cid in ("direction-improves", "error-sqrt-m", "batchnorm-batch-1"):
        assert c[cid]["verdict"] == "untestable" and c[cid]["reason"]["code"] == "construction"
    assert c["error-sqrt-m"]["reason"]["check"] == "holds"


def test_fix_claims_pair_by_seed_and_c7_per_seed() -> None:
    acc = {"sgd+scaling+warmup": [0.90, 0.92, 0.88], "discard-small-loss": [0.85, 0.87, None],
           "batch-size-schedule": [0.91, 0.93, 0.89], "cblr": [0.90, 0.92, 0.88],
           "mclr": [0.90, 0.92, 0.88], "lars": [0.90, 0.92, 0.881]}
    dists = {"sgd+scaling+warmup": [[0.0, 1.0, 1.5, 1.7, 1.8, 1.85]] * 2
             + [[0.0, 2.0, 2.6, 2.9, 3.0, 3.05]]}
    c = _clean(fix_claims(lambda m: acc[m], dists, 1000))
    assert c["discarding-helps"]["n"] == 2  # the failed run's seed is dropped from the pair
    assert c["batch-schedule-helps"]["n"] == 3
    assert c["weights-settle"]["n"] == 3  # seeds, not seeds x epochs
    assert c["weights-settle"]["estimate"] == -1.0
