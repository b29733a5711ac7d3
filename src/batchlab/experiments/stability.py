"""K7 (Keskar et al.: the safe learning rate is limited by the curvature of the loss) as a test
that can fail: per training seed, the top Hessian eigenvalue at the seed's initial weights
against the largest lr that full-batch gradient descent survives from those same weights.

Per seed (the replicate; lrs and steps are summarised inside it):
1. lambda_max of the mean loss over a fixed training subset at the initial weights (Lanczos,
   `measure.curvature`);
2. full-batch GD without momentum on that subset from those weights, for a fixed number of
   steps, at each lr of a log grid (`measure.stability.log_grid`, 2^(1/4) apart) covering
   GRID_LOW..GRID_HIGH x 2 / lambda_max, upward until the first run diverges (the rule is in
   `measure.stability`: loss non-finite, or above BLOWUP x its start at any step);
3. lr_max = the largest lr below the first diverging one; the seed's value is
   lr_max x lambda_max / 2, its ratio to the quadratic stability limit.

The claim puts the geometric mean over seeds (t interval on the logs) in K7_BAND. A seed whose
bracket is open (the smallest lr already diverged, or none did up to GRID_HIGH) has no value:
the claim is then untestable (a regime gate), never decided on the other seeds.

Known physics the verdict may show: with cross-entropy, GD from initialization can survive lrs
above 2 / lambda_max by lowering the sharpness on its way (the catapult phase, Lewkowycz et al.
2020; edge of stability, Cohen et al. 2021), so the ratio can come out above the band.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchlab.experiments import intervals as I
from batchlab.experiments import verdicts as V
from batchlab.experiments.claims import Claim, Gate
from batchlab.measure import curvature as C
from batchlab.measure import stability as S

K7_BAND = (0.5, 2.0)
"""Where K7 puts lr_max x lambda_max / 2: within a factor 2 of the quadratic limit either way
(log-symmetric around 1). K7 says the limit is *set by* the curvature, not that it equals
2 / lambda_max: the band allows the grid's resolution (a factor 2^(1/4)) and the distance
between the local quadratic model and a short GD run, and still fails an lr limit that is off
the curvature's by more than 2x."""

GRID_LOW, GRID_HIGH = 0.25, 8.0
"""The sweep's lr range in units of 2 / lambda_max: from well below the quadratic limit (a
seed whose smallest lr already diverges is censored) to well above it (catapult behaviour
survives a few times the limit; a seed that survives all of it is censored)."""

PER_OCTAVE = 4
"""Grid lrs per factor 2 (2^(1/4) apart): lr_max is resolved to within 19%, far inside K7_BAND."""

BLOWUP = 2.0
"""A run diverges when its loss exceeds this x its initial loss (or is non-finite): at the
initial weights the loss is about chance level, so twice that is worse than an untrained
network - no progress is left (see `measure.stability`)."""

RULE = (f"diverged = loss (or gradient) non-finite, or loss > {BLOWUP:g} x the initial loss, at "
        f"any step; lr_max = the largest grid lr below the first diverging one")


def sweep(model: nn.Module, data: tuple[torch.Tensor, ...], seed: int, steps: int,
          low: float = GRID_LOW, high: float = GRID_HIGH, per_octave: int = PER_OCTAVE,
          blowup: float = BLOWUP, criterion: S.Criterion | None = None) -> dict[str, Any]:
    """One seed's measurement (a stored unit's body: deterministic in its arguments): lambda_max
    at `model`'s weights on `data`, the lr sweep from the same weights, its bracket and ratio.
    `criterion`: the mean loss (default NLL of log-probabilities, as the curvature code)."""
    xy = (data[0], data[1])
    eig = C.hessian_eigenvalues(model, xy, k=1, tol=1e-3, max_iter=100, seed=seed,
                                criterion=criterion)
    lam = float(eig.top)
    out: dict[str, Any] = {"lambda_max": _num(lam), "lambda_converged": bool(eig.converged),
                           "steps": steps, "blowup": blowup, "n_examples": int(xy[0].shape[0])}
    if not (math.isfinite(lam) and lam > 0):
        return {**out, "grid": [], "runs": [], "lr_max": None, "lr_diverged": None,
                "censored": "lambda_max not positive", "ratio": None}
    limit = 2.0 / lam
    grid = S.log_grid(low * limit, high * limit, per_octave)
    runs = S.lr_sweep(model, xy, grid, steps, blowup, criterion)
    b = S.bracket(runs)
    return {**out, "limit_2_over_lambda": limit, "grid": grid,
            "runs": [{"lr": r.lr, "diverged": r.diverged, "steps_run": r.steps_run,
                      "max_loss_ratio": _num(r.max_loss_ratio),
                      "final_loss_ratio": _num(r.final_loss_ratio)} for r in runs],
            "lr_max": b.lr_max, "lr_diverged": b.lr_diverged, "censored": b.censored,
            "ratio": None if b.censored else b.lr_max * lam / 2}


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def k7_claim(sweeps: Sequence[dict[str, Any]] | None, where: str = "") -> Claim:
    """K7 from one `sweep` per training seed (n = seeds). `where` says where the sweep started
    and on what data (for the quantity's text)."""
    quantity = ("largest stable lr x lambda_max / 2 (full-batch GD without momentum"
                f"{', ' + where if where else ''}), geometric mean over seeds")
    claim = ("the largest stable lr is set by the curvature: full-batch GD diverges near "
             "2 / lambda_max")
    reading = ("an lr sweep to divergence from the seed's initial weights against the top "
               "Hessian eigenvalue there")
    if not sweeps:
        return Claim("curvature-bounds-lr", "K7", claim,
                     I.nan_interval("no lr sweep was run"), V.between(*K7_BAND), quantity,
                     reading=reading, primary=True)
    censored = [1.0 if s.get("censored") else 0.0 for s in sweeps]
    ratios = [s["ratio"] for s in sweeps if not s.get("censored")]
    gate = Gate("lr sweep bracketed", "share of seeds whose lr sweep is censored (the smallest "
                f"lr diverged, or none did up to {GRID_HIGH:g} x 2 / lambda_max), 1 = censored",
                I.replicate_mean(censored, what="censored indicators"), V.below(0.0))
    evidence = {"rule": RULE, "band": list(K7_BAND),
                "grid": f"2^(j/{PER_OCTAVE}) in [{GRID_LOW:g}, {GRID_HIGH:g}] x 2 / lambda_max",
                "per_seed": [{k: s.get(k) for k in ("seed", "lambda_max", "lambda_converged",
                                                    "limit_2_over_lambda", "grid", "runs",
                                                    "lr_max", "lr_diverged", "censored",
                                                    "ratio", "steps", "n_examples")}
                             for s in sweeps]}
    return Claim("curvature-bounds-lr", "K7", claim,
                 I.log_mean(ratios, what="log(lr_max x lambda_max / 2)"),
                 V.between(*K7_BAND), quantity, evidence, reading=reading, primary=True,
                 gates=[gate])


def summary(sweeps: Sequence[dict[str, Any]], n_examples: int, steps: int) -> str:
    """The K7 paragraph of the experiment's summary: the protocol and one line per seed."""
    head = (f"K7 (lr sweep to divergence): per seed, lambda_max (Lanczos) at the initial weights "
            f"on the first {n_examples} training examples, then full-batch GD without momentum "
            f"from those weights for {steps} steps at lrs 2^(j/{PER_OCTAVE}) from {GRID_LOW:g} to "
            f"{GRID_HIGH:g} x 2 / lambda_max, upward until the first run diverges ({RULE}). "
            f"Ratio = lr_max x lambda_max / 2; K7 claims it in [{K7_BAND[0]:g}, {K7_BAND[1]:g}]."
            "\n\n| seed | lambda_max | 2 / lambda_max | lr_max | first diverged | ratio | "
            "censored |\n|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {s.get('seed')} | {_fmt(s.get('lambda_max'))} | {_fmt(s.get('limit_2_over_lambda'))} "
        f"| {_fmt(s.get('lr_max'))} | {_fmt(s.get('lr_diverged'))} | {_fmt(s.get('ratio'))} | "
        f"{s.get('censored') or 'no'} |" for s in sweeps)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"
