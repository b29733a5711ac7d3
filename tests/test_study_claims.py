"""Planted cases for the MNIST study's claims (issue 19): runs are built by hand, so the truth
is known, and each case must come out as the issue says - a one-seed accuracy difference is
not decided, an arm still climbing makes an end-point claim untestable (and converged arms let
it be decided), |tau| = 1 in every seed at n = 4 is never a zero-width decision, and n counts
seeds, not epochs or grid cells. Every document must pass `check_document`."""

from __future__ import annotations

import base64
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np

from batchlab.experiments import claims as C
from batchlab.experiments.adam_vs_sgd import _claims as adam_claims
from batchlab.experiments.batch_size import accuracy_by_batch, s1_claims
from batchlab.experiments.distance import MIN_TAU, cell
from batchlab.experiments.distance import _claims as distance_claims
from batchlab.experiments.study import Group, acc_difference
from batchlab.experiments.study_geometry import growth_slope
from batchlab.experiments.verdicts import INCONCLUSIVE, REPRODUCED, UNTESTABLE

N_TEST = 400


def bits(acc: float, seed: int) -> str:
    """A packed per-example correctness record with accuracy `acc` (examples shuffled per
    seed, so two arms agree on most but not all examples)."""
    k = round(acc * N_TEST)
    arr = np.zeros(N_TEST, dtype=np.uint8)
    arr[np.random.default_rng(seed).permutation(N_TEST)[:k]] = 1
    return base64.b64encode(np.packbits(arr).tobytes()).decode()


def run(seed: int, train: list[float], test: float, lr: float = 0.01, steps_per_epoch: int = 10,
        dist: float = 5.0, alpha: float = 0.5, **final: float) -> Any:
    """A fake completed run: epochs 0..E with the train curve `train` (epochs 1..E), a final
    test accuracy, distance from init growing like epoch^alpha, and flat other metrics."""
    epochs = [{"epoch": 0, "steps": 0, "train_acc": 0.1, "test_acc": 0.1, "dist_init_w": 0.0}]
    E = len(train)
    for e, tr in enumerate(train, 1):
        epochs.append({"epoch": e, "steps": e * steps_per_epoch, "train_acc": tr,
                       "test_acc": test if e == E else tr - 0.02,
                       "dist_init_w": dist * (e / E) ** alpha, **final})
    return SimpleNamespace(epochs=epochs, status="completed", run_id=f"r{seed}",
                           config=SimpleNamespace(seed=seed, lr=lr),
                           final={"test_acc": test, "test_correct_bits": bits(test, seed)})


FLAT = [0.90, 0.95, 0.97, 0.980, 0.980]  # plateaued: 0 change over the last fifth
CLIMBING = [0.30, 0.40, 0.50, 0.60, 0.70]  # +10 points over the last fifth


def group(name: str, seeds: int, train: list[float], test: float, spread: float = 0.004,
          **kw: Any) -> Group:
    g = Group(name, {})
    for s in range(seeds):
        jitter = spread * (s - (seeds - 1) / 2)
        g.runs.append(run(s, [t + (jitter / 10 if i == len(train) - 1 else 0)
                              for i, t in enumerate(train)], test + jitter, **kw))
    return g


def clean(claims: list[C.Claim]) -> None:
    doc = json.loads(C.dumps([c.to_json() for c in claims]))
    assert C.check_document(doc) == []


def by_id(claims: list[C.Claim]) -> dict[str, C.Claim]:
    return {c.id: c for c in claims}


def test_one_seed_accuracy_difference_is_not_decided() -> None:
    small, large = group("bs 64", 1, FLAT, 0.97), group("bs 1024", 1, FLAT, 0.60)
    iv = acc_difference(small, large, N_TEST)
    assert iv.n == 1 and iv.lo == -math.inf and iv.hi == math.inf  # no seed variance
    claim = C.Claim("d", "S1", "one seed", iv, C.Region(lower=0.0), "difference")
    assert claim.verdict == INCONCLUSIVE
    # the study's S1 claims with one seed: the convergence gate has no interval either
    out = s1_claims([64, 1024], [small, large], 64, 1024, small, large, 5000, N_TEST)
    assert all(c.verdict in (INCONCLUSIVE, UNTESTABLE) for c in out)
    clean(out)


def test_undertrained_arm_makes_s1_untestable_and_converged_arms_decide() -> None:
    small = group("bs 64", 3, FLAT, 0.97)
    climbing = group("bs 1024", 3, CLIMBING, 0.60)
    out = by_id(s1_claims([64, 1024], [small, climbing], 64, 1024, small, climbing, 5000,
                          N_TEST))
    for cid in ("bs-test-acc", "bs-train-acc", "bs-test-acc-trend"):
        assert out[cid].verdict == UNTESTABLE, cid
        assert out[cid].reason["code"] == "regime"
        assert "bs 1024 converged" in out[cid].reason["text"]
        assert "bs 64 converged" not in out[cid].reason["text"]
    clean(list(out.values()))
    # the same gap between two converged arms is decided (the gate is not a blanket veto)
    done = group("bs 1024", 3, [t - 0.1 for t in FLAT], 0.60)
    out = by_id(s1_claims([64, 1024], [small, done], 64, 1024, small, done, 5000, N_TEST))
    assert out["bs-test-acc"].verdict == REPRODUCED
    assert out["bs-test-acc"].interval.n == 3
    assert out["bs-test-acc-trend"].interval.n == 3  # one slope per seed, not sizes x seeds
    clean(list(out.values()))


def test_accuracy_by_batch_rows() -> None:
    small, large = group("bs 64", 3, FLAT, 0.97), group("bs 1024", 3, CLIMBING, 0.60)
    rows = accuracy_by_batch([64, 1024], [small, large], N_TEST)
    got = {(r["batch_size"], r["metric"]): r for r in rows}
    assert set(got) == {(b, m) for b in (64, 1024) for m in ("test_acc", "gap")}
    assert math.isclose(got[(1024, "gap")]["estimate"], 0.70 - 0.60, abs_tol=1e-9)
    for r in rows:
        assert r["lo"] < r["estimate"] < r["hi"]


def _distance_groups(seeds: int) -> tuple[dict[str, Group], list[int], list[float]]:
    """A 2 x 2 grid whose W and test accuracy are perfectly concordant in every seed."""
    bss, lrs = [8, 64], [0.01, 0.1]
    groups = {}
    for i, (b, lr) in enumerate((b, lr) for b in bss for lr in lrs):
        groups[cell(b, lr)] = group(cell(b, lr), seeds, FLAT, 0.80 + 0.04 * i, lr=lr,
                                    dist=2.0 + i, steps_per_epoch=80 // b * 8)
    groups["long"] = group("long", seeds, FLAT * 8, 0.95, dist=4.0, steps_per_epoch=10)
    return groups, bss, lrs


def test_perfect_rank_correlation_at_n4_is_not_a_zero_width_decision() -> None:
    for seeds in (1, 4):
        groups, bss, lrs = _distance_groups(seeds)
        out = by_id(distance_claims(groups, bss, lrs, groups[cell(8, 0.01)],
                                    groups[cell(64, 0.01)], groups["long"],
                                    groups[cell(64, 0.1)], N_TEST))
        c = out["farther-is-better"]
        assert c.interval.replicates == (1.0,) * seeds  # |tau| = 1 in every seed
        assert c.interval.n == seeds
        assert not c.interval.zero_width and c.interval.lo < MIN_TAU
        assert c.verdict == INCONCLUSIVE
        clean(list(out.values()))


def test_growth_exponent_has_one_replicate_per_seed() -> None:
    g = group("adam", 3, FLAT, 0.95, alpha=1.0)
    iv = growth_slope(g)
    assert iv.n == 3 and math.isclose(iv.estimate, 1.0, rel_tol=1e-9)
    assert len(iv.replicates) == 3  # not 3 seeds x 5 epochs


def test_adam_claims_are_primary_and_gated() -> None:
    sgd = group("SGD", 3, CLIMBING, 0.90, norm_w=44.5, cos_init_layer1=0.99,
                cos_init_layer2=0.995, cos_init_layer3=0.95)
    adam = group("Adam", 3, FLAT, 0.93, alpha=1.0, dist=200.0, norm_w=250.0,
                 cos_init_layer1=0.2, cos_init_layer2=0.3, cos_init_layer3=0.2)
    for g in (sgd, adam):
        for s, r in enumerate(g.runs):
            r.epochs[0].update(norm_w=44.0)
            r.epochs[-1]["norm_w"] += s  # seeds differ: no zero-width interval
    out = by_id(adam_claims(sgd, adam, N_TEST))
    assert out["adam-linear-growth"].primary is True
    worse = out["adam-generalizes-worse"]  # SGD still climbing: Adam "wins" for the wrong reason
    assert worse.verdict == UNTESTABLE and "SGD converged" in worse.reason["text"]
    assert out["adam-larger-weights"].verdict == REPRODUCED
    clean(list(out.values()))


def test_sphere_band_is_a_check_when_the_distance_cannot_leave_it() -> None:
    def pair(dist: float, norm_end: float) -> dict[str, C.Claim]:
        sgd = group("SGD", 3, FLAT, 0.95, dist=dist, norm_w=norm_end, cos_init_layer1=0.99,
                    cos_init_layer2=0.995, cos_init_layer3=0.95)
        adam = group("Adam", 3, FLAT, 0.93, dist=200.0, norm_w=250.0, cos_init_layer1=0.2,
                     cos_init_layer2=0.3, cos_init_layer3=0.2)
        for g in (sgd, adam):
            for s, r in enumerate(g.runs):
                r.epochs[0].update(norm_w=44.0)
                r.epochs[-1]["norm_w"] += 0.01 * s
                r.epochs[-1]["dist_init_w"] += 0.01 * s
        out = by_id(adam_claims(sgd, adam, N_TEST))
        clean(list(out.values()))
        return out

    short = pair(dist=2.0, norm_end=44.05)  # d / |w0| = 0.045: the 10% band cannot be left
    assert short["sgd-on-sphere"].verdict == UNTESTABLE
    assert short["sgd-on-sphere"].reason["code"] == "construction"
    assert short["sgd-along-sphere"].verdict == REPRODUCED  # radial share ~0.03
    far = pair(dist=10.0, norm_end=53.0)  # straight out: 9 of the 10 went into the radius
    assert far["sgd-on-sphere"].verdict == "not_reproduced"  # +20%: decided, not a check
    assert far["sgd-along-sphere"].verdict == "not_reproduced"
