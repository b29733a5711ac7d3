"""The one interval rule (verdicts.py), claims.json (claims.py) and the report's finding-level
rule, on synthetic inputs whose truth is known. Noise may only ever push a verdict toward
"inconclusive": a large-noise case of every estimator must come out inconclusive, and widening
an interval never decides or flips a verdict (hypothesis)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchlab.experiments import verdicts as V
from batchlab.experiments.claims import Claim, check_document, claims_document
from batchlab.experiments.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from batchlab.report.answers import MIXED, NOT_RUN, combine, finding_verdicts

rng = np.random.default_rng(0)


@pytest.mark.parametrize(("lo", "hi", "region", "verdict"), [
    (0.1, 0.2, V.above(0.0), REPRODUCED),
    (0.0, 0.2, V.above(0.0), REPRODUCED),  # closed region
    (-0.2, -0.1, V.above(0.0), NOT_REPRODUCED),
    (-0.1, 0.1, V.above(0.0), INCONCLUSIVE),
    (-0.005, 0.004, V.within(0.01), REPRODUCED),
    (-0.02, -0.012, V.within(0.01), NOT_REPRODUCED),
    (-0.02, 0.0, V.within(0.01), INCONCLUSIVE),
    (0.5, 0.9, V.below(0.4), NOT_REPRODUCED),
    (math.nan, 1.0, V.above(0.0), INCONCLUSIVE),
    (-math.inf, math.inf, V.above(0.0), INCONCLUSIVE),
])
def test_decide(lo, hi, region, verdict):
    assert V.decide(lo, hi, region) == verdict


def test_one_seed_accuracy_gets_a_finite_interval_only_with_the_test_set_size():
    iv = V.mean_interval([0.97], n_test=10_000)
    half = 1.96 * math.sqrt(0.97 * 0.03 / 10_000)
    assert iv.lo == pytest.approx(0.97 - half, rel=1e-3) and iv.hi == pytest.approx(0.97 + half, rel=1e-3)
    assert V.mean_interval([0.97]).lo == -math.inf  # no sampling model: unbounded
    assert Claim("x", "S1", "c", V.mean_interval([0.97]), V.above(0.5), "q").verdict == INCONCLUSIVE


def test_difference_known_direction_and_equivalence():
    big = [0.98, 0.981, 0.979]
    small = [0.95, 0.951, 0.949]
    assert Claim("d", "S1", "c", V.difference(big, small, 10_000), V.above(0), "q").verdict == REPRODUCED
    assert Claim("d", "S1", "c", V.difference(small, big, 10_000), V.above(0), "q").verdict == NOT_REPRODUCED
    same = V.difference([0.98, 0.981, 0.979], [0.9805, 0.9795, 0.98], 10_000)
    assert V.decide(same.lo, same.hi, V.within(0.01)) == REPRODUCED
    # a 1.5-point shortfall is not within 1 point: with one seed not_reproduced ...
    short = V.difference([0.965], [0.98], 10_000)
    assert V.decide(short.lo, short.hi, V.within(0.01)) == NOT_REPRODUCED
    # ... and with two noisy seeds never reproduced (noise widens toward inconclusive)
    noisy = V.difference([0.94, 0.99], [0.98, 0.98], 10_000)
    assert V.decide(noisy.lo, noisy.hi, V.within(0.01)) == INCONCLUSIVE


def _noise(n: int, sd: float, mean: float = 0.0) -> list[float]:
    return list(mean + sd * rng.standard_normal(n))


@pytest.mark.parametrize(("iv", "region"), [
    (V.mean_interval(_noise(3, 5.0, 1.0)), V.above(0.0)),
    (V.difference(_noise(3, 0.3, 0.9), _noise(3, 0.3, 0.8), n_test=1000), V.above(0.0)),
    (V.difference(_noise(3, 0.3, 0.9), _noise(3, 0.3, 0.9), n_test=1000), V.within(0.01)),
    (V.ratio([1.0, 9.0, 0.2], [1.0, 0.3, 5.0]), V.above(2.0)),
    (V.correlation([1, 2, 3, 4, 5], [2.0, 1.0, 4.0, 3.0, 5.0]), V.above(0.5)),
    (V.slope([1, 2, 3, 4], [1.0, 4.0, 0.0, 5.0]), V.below(1.0)),
    (V.bootstrap(_noise(6, 10.0, 1.0), np.mean), V.above(0.0)),
    (V.proportion(3, 6), V.above(0.5)),
])
def test_large_noise_is_inconclusive(iv, region):
    verdict = Claim("n", "S1", "noisy", iv, region, "q").verdict
    assert verdict == INCONCLUSIVE, (iv, region)


def test_estimators_recover_known_truths():
    x = np.arange(1, 30)
    assert V.decide(*_lohi(V.correlation(x, -x + 0.1 * rng.standard_normal(29))), V.below(-0.5)) == REPRODUCED
    sub = V.slope(np.log(x), 0.5 * np.log(x) + 0.01 * rng.standard_normal(29))
    assert V.decide(*_lohi(sub), V.below(1.0)) == REPRODUCED
    lin = V.slope(np.log(x), np.log(x) + 0.01 * rng.standard_normal(29))
    assert V.decide(*_lohi(lin), V.below(0.8)) == NOT_REPRODUCED
    r = V.ratio([10.0, 11.0, 9.5], [2.0, 2.1, 1.9])
    assert r.estimate == pytest.approx(5.0, rel=0.05) and V.decide(r.lo, r.hi, V.above(2)) == REPRODUCED
    both = V.all_of([V.difference([1.0, 1.1, 0.9], [0.0, 0.1, -0.1]),
                     V.difference([1.0, 1.1, 0.9], [0.9, 1.0, 1.1])])
    assert V.decide(both.lo, both.hi, V.above(0)) != REPRODUCED  # the weak part decides


def _lohi(iv: V.Interval) -> tuple[float, float]:
    return iv.lo, iv.hi


bounds = st.floats(-10, 10, allow_nan=False)


@given(lo=bounds, width=st.floats(0, 10), wl=st.floats(0, 5), wh=st.floats(0, 5),
       a=bounds, b=bounds, kind=st.sampled_from(["above", "below", "between"]))
def test_widening_never_decides_or_flips(lo, width, wl, wh, a, b, kind):
    hi = lo + width
    if kind == "between" and a == b:
        return
    region = {"above": V.above(a), "below": V.below(a),
              "between": V.between(min(a, b), max(a, b)) if a != b else None}[kind]
    narrow = V.decide(lo, hi, region)
    wide = V.decide(lo - wl, hi + wh, region)
    if narrow == INCONCLUSIVE:
        assert wide == INCONCLUSIVE
    assert {narrow, wide} != {REPRODUCED, NOT_REPRODUCED}


def _doc() -> dict:
    claims = [Claim("a", "S1", "x beats y", V.difference([0.98, 0.981], [0.9, 0.91], 1000),
                    V.above(0), "difference", {"x": [0.98]}, primary=True).to_json(),
              Claim("b", "S1,S9", "z", V.mean_interval([0.5]), V.below(1), "q").to_json()]
    return claims_document(claims)


def test_claims_document_validates_and_rechecks():
    doc = _doc()
    assert check_document(doc) == []
    forged = copy.deepcopy(doc)
    forged["claims"][1]["verdict"] = REPRODUCED  # an unbounded interval cannot reproduce
    assert any("does not follow" in p for p in check_document(forged))
    bad = copy.deepcopy(doc)
    bad["claims"][0]["finding"] = "S1 and S9"
    assert check_document(bad)


@pytest.mark.parametrize(("verdicts", "want"), [
    ([REPRODUCED, REPRODUCED], REPRODUCED),
    ([NOT_REPRODUCED], NOT_REPRODUCED),
    ([REPRODUCED, NOT_REPRODUCED], MIXED),
    ([REPRODUCED, INCONCLUSIVE], INCONCLUSIVE),
    ([], NOT_RUN),
])
def test_finding_rule(verdicts, want):
    assert combine(verdicts) == want


def test_finding_rests_on_primary_claims():
    claims = [{"id": "p", "finding": "S2", "verdict": REPRODUCED, "primary": True},
              {"id": "s", "finding": "S2", "verdict": NOT_REPRODUCED, "primary": False},
              {"id": "u", "finding": "S3,S9", "verdict": NOT_REPRODUCED},
              {"id": "v", "finding": "S3", "verdict": INCONCLUSIVE}]
    fv = finding_verdicts(claims)
    assert fv["S2"].verdict == REPRODUCED and fv["S2"].others == 1
    assert fv["S3"].verdict == INCONCLUSIVE and fv["S9"].verdict == NOT_REPRODUCED
    assert fv["K1"].verdict == NOT_RUN and len(fv) == 41
