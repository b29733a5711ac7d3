"""Verdict rules on synthetic numbers: each verdict value is reachable, and noise widens the
band (several seeds) while one seed uses the stated minimum effect alone."""

from __future__ import annotations

import math

import pytest

from batchlab.experiments.verdicts_legacy import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    close_to,
    combine,
    correlated,
    greater,
    monotone,
    noise_margin,
    within,
)

NAN = float("nan")


@pytest.mark.parametrize(("a", "b", "verdict"), [
    ([0.98], [0.95], REPRODUCED),
    ([0.95], [0.98], NOT_REPRODUCED),
    ([0.952], [0.95], INCONCLUSIVE),
    ([0.97, 0.98, 0.99], [0.95, 0.95, 0.95], REPRODUCED),
    ([0.90, 0.98, 1.06], [0.95, 0.95, 0.96], INCONCLUSIVE),  # same means, huge spread
    ([NAN], [0.5], INCONCLUSIVE),
])
def test_greater(a, b, verdict):
    v, ev, rule = greater(a, b, 0.005, "x")
    assert v == verdict
    assert "margin" in rule and ev["n_a"] == sum(math.isfinite(x) for x in a)


def test_noise_margin_needs_two_seeds_each():
    assert noise_margin([1.0], [2.0, 3.0]) == 0.0
    assert noise_margin([1.0, 3.0], [2.0, 2.0]) == pytest.approx(2 * math.sqrt(2 / 2))


@pytest.mark.parametrize(("a", "b", "verdict"), [
    ([0.979], [0.98], REPRODUCED),
    ([0.99], [0.98], REPRODUCED),  # exceeding the target counts as reaching it
    ([0.96], [0.98], NOT_REPRODUCED),
    ([0.972], [0.98], INCONCLUSIVE),
    ([NAN], [0.98], INCONCLUSIVE),
])
def test_close_to(a, b, verdict):
    assert close_to(a, b, 0.005)[0] == verdict


@pytest.mark.parametrize(("ys", "verdict"), [
    ([0.98, 0.97, 0.96], REPRODUCED),
    ([0.96, 0.97, 0.98], NOT_REPRODUCED),
    ([0.98, 0.99, 0.979], INCONCLUSIVE),  # tiny change
    ([0.98, 0.99, 0.96, 0.97], INCONCLUSIVE),  # right direction, not monotone enough
])
def test_monotone_decreasing(ys, verdict):
    assert monotone(list(range(len(ys))), ys, increasing=False, min_effect=0.005)[0] == verdict


def test_monotone_sorts_by_x():
    v, ev, _ = monotone([1024, 64, 256], [0.90, 0.98, 0.95], increasing=False, min_effect=0.01)
    assert v == REPRODUCED and ev["x"] == [64, 256, 1024]


@pytest.mark.parametrize(("a", "verdict"), [
    ([1.05], REPRODUCED),
    ([0.93, 0.95, 0.97], REPRODUCED),
    ([1.4], NOT_REPRODUCED),
    ([0.7], NOT_REPRODUCED),
    ([1.15], INCONCLUSIVE),
    ([NAN], INCONCLUSIVE),
])
def test_within(a, verdict):
    assert within(a, 1.0, 0.1)[0] == verdict


def test_within_noise_widens_the_band():
    # mean 1.15 is outside 0.1 with one seed but inside 0.1 + 2 SE with a wide spread
    assert within([1.15], 1.0, 0.1)[0] == INCONCLUSIVE
    assert within([0.95, 1.35], 1.0, 0.1)[0] == REPRODUCED


def test_correlated():
    xs = list(range(10))
    assert correlated(xs, [x * 2 + 1 for x in xs])[0] == REPRODUCED
    assert correlated(xs, [-x for x in xs])[0] == NOT_REPRODUCED
    assert correlated(xs, [-x for x in xs], positive=False)[0] == REPRODUCED
    weak = [0, 2, 1, 4, 3, 3.5, 1.5, 6, 0.5, 5]  # positive but noisy: rho ~ 0.45
    assert correlated(xs, weak)[0] == INCONCLUSIVE
    v, ev, _ = correlated([1, 2, NAN, 4], [1, 2, 3, NAN])  # too few finite points
    assert v == INCONCLUSIVE and ev["n_points"] == 2


def test_combine():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, NOT_REPRODUCED]) == NOT_REPRODUCED
    assert combine([]) == INCONCLUSIVE
