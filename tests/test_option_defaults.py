"""Declared option defaults (`experiments/option_defaults.py`): `Options.resolve` fills what
the user left unset from the declaration, and `describe` renders that same declaration."""

from __future__ import annotations

import pytest

from batchlab.errors import ConfigError
from batchlab.experiments.options import GC_BATCH_SIZES, GC_MODES, OPTIONS, describe, validate


def test_resolve_fills_unset_fields_per_preset_and_keeps_the_users() -> None:
    quick = validate("sharpness", {}).resolve("quick")
    paper = validate("sharpness", {"trace_rtol": 0.2}).resolve("paper")
    assert (quick.epochs, quick.large_epochs, quick.curvature_samples) == (8, 24, 1000)
    assert (paper.epochs, paper.large_epochs, paper.trace_rtol) == (30, 90, 0.2)
    assert quick.hidden is None and quick.max_train is None  # unset / no default: stays None


def test_derived_defaults_follow_the_resolved_options() -> None:
    o = validate("sharpness", {"epochs": 5}).resolve("paper")
    assert o.large_epochs == 15
    lbf = validate("large-batch-fixes", {"trust": 0.01}).resolve("quick")
    assert lbf.lars_lr == pytest.approx(1.0)


def test_every_option_resolves_valid_in_both_presets() -> None:
    for model in OPTIONS.values():
        for p in ("quick", "paper"):
            model().resolve(p)  # a declared default that fails its own field's check raises


def test_describe_shows_the_declared_default() -> None:
    rows = {r["option"]: r for r in describe("sharpness")}
    assert rows["epochs"]["default"] == "8 quick, 30 paper"
    assert rows["large_epochs"]["default"] == "3 x epochs"
    assert rows["lr"]["default"] == "0.01"
    assert "default" not in rows["epochs"]["meaning"]


def test_a_bad_user_value_is_still_a_config_error() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        validate("sharpness", {"epochs": 0})


def test_gradient_competition_constants_match_the_analysis() -> None:
    from batchlab.analysis import gradcomp as gc

    assert list(gc.BATCH_SIZES) == GC_BATCH_SIZES
    assert list(gc.MODES) == GC_MODES


def test_no_meaning_carries_a_prose_default() -> None:
    """A default written into the description could drift from the declared one again."""
    for name in OPTIONS:
        for row in describe(name):
            assert "default" not in row["meaning"].lower(), (name, row)


def test_prepared_context_carries_the_users_options_and_the_resolved_ones() -> None:
    from batchlab.experiments import Context, prepared

    ctx = prepared("sharpness", Context(preset="paper", options={"epochs": 4}))
    assert ctx.options == {"epochs": 4}
    assert (ctx.opts.epochs, ctx.opts.large_epochs, ctx.opts.k7_steps) == (4, 12, 50)
    quick = prepared("sharpness", Context())
    assert quick.options == {"hidden": [256, 256]} and quick.opts.hidden == [256, 256]
