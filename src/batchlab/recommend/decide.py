"""The decision: from a critical batch size, one measured run and this device's step times to a
batch size and lr. Pure functions of their inputs (no training, no timing), so each rule is
tested on synthetic numbers whose answer is known.

Model (McCandlish et al.): to reach a given loss, S(B) = S_min (1 + B_crit/B) steps and
E(B) = E_min (1 + B/B_crit) examples. The measurement run needed S0 steps at B0, so
S(B) = S0 (1 + B_crit/B) / (1 + B_crit/B0) predicts the steps to reach its end point at batch B.
Time to that point = S(B) x seconds/step(B); the batch size for time minimizes it over the timed
grid; the batch size for compute is the largest whose examples-to-target stay within 10% of
E_min (B <= 0.1 B_crit), i.e. the most parallel choice that wastes almost no computation. The lr
follows the rule the measurements support: from tuned lrs when there are any (the nearest of
linear, square-root or constant scaling to the fitted slope), else the paper's
eps(B) proportional to 1/(1 + B_crit/B) (linear below B_crit, constant above) anchored at the
best lr at B0 (the lr search; S0 is then that lr's steps). For Adam and AdamW the untuned rule
is the square root of that one, eps(B) proportional to sqrt(1/(1 + B_crit/B)): square-root
scaling below B_crit (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive
Gradient Algorithms": an adaptive method's update is normalised by the gradient's second
moment, so the noise, not the step, scales with 1/B), constant above it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.analysis.scaling import steps_anchored
from batchlab.errors import BatchlabError


def critical_batch(fit: dict[str, float] | None, b_simple: float | None,
                   largest: int) -> tuple[float, str]:
    """B_crit and where it came from: a steps-to-target fit if there is one, else B_simple;
    if neither is a positive number (noise swamps the gradient), the largest timed batch."""
    if fit and math.isfinite(fit.get("b_crit", math.nan)) and fit["b_crit"] > 0:
        return float(fit["b_crit"]), "steps-to-target fit"
    if b_simple is not None and math.isfinite(b_simple) and b_simple > 0:
        return float(b_simple), "B_simple over the second half of the measurement run"
    return float(largest), "B_simple not resolved (noise dominates): largest batch"


def lr_rule_from_sweep(best: list[dict[str, Any]], b_crit: float) -> tuple[str, float, float, int]:
    """(rule, fitted slope, anchor lr, anchor batch) from tuned lrs at batch sizes <= B_crit
    (all reached ones if fewer than two lie below)."""
    pts = [(r["batch_size"], r["lr"]) for r in best if r["reached"]]
    below = [p for p in pts if p[0] <= b_crit] if b_crit else pts
    use = below if len(below) >= 2 else pts
    if len(use) < 2:
        b, lr = use[0] if use else (pts[0] if pts else (0, math.nan))
        return "constant (one tuned point)", 0.0, lr, b
    slope = float(np.polyfit(np.log([p[0] for p in use]), np.log([p[1] for p in use]), 1)[0])
    rule = min((("linear", 1.0), ("square-root", 0.5), ("constant", 0.0)),
               key=lambda r: abs(r[1] - slope))[0]
    b, lr = use[-1]
    return rule, slope, lr, b


def scale_lr(rule: str, lr: float, b_from: float, b_to: float) -> float:
    """lr moved from batch b_from to b_to by a named scaling rule (constant if unknown)."""
    return lr * {"linear": b_to / b_from, "square-root": math.sqrt(b_to / b_from)}.get(rule, 1.0)


def noise_lr(base_lr: float, b0: float, b: float, b_crit: float) -> float:
    """McCandlish et al. eq. 2.7: eps(B) = eps_max / (1 + B_noise/B), anchored at (b0, base_lr)."""
    return base_lr * (1 + b_crit / b0) / (1 + b_crit / b)


def adaptive_lr(base_lr: float, b0: float, b: float, b_crit: float) -> float:
    """Adam/AdamW: the square root of eq. 2.7's ratio, anchored at (b0, base_lr): square-root
    scaling below B_crit, constant above."""
    return base_lr * math.sqrt((1 + b_crit / b0) / (1 + b_crit / b))


ADAPTIVE = ("adam", "adamw")


def decide(throughput: list[dict[str, Any]], *, b_crit: float, s0: float, b0: int,
           base_lr: float, tuned: list[dict[str, Any]] | None = None,
           optimizer: str = "sgd") -> dict[str, Any]:
    """The recommendation. `throughput` rows need batch_size, status and seconds_per_step; the
    ok ones get predicted_steps, predicted_seconds and examples_overhead (E(B)/E_min - 1).
    `optimizer`: the untuned lr rule is McCandlish's for SGD, its square root for Adam/AdamW."""
    if not (math.isfinite(b_crit) and b_crit > 0 and s0 > 0 and b0 > 0 and base_lr > 0):
        raise BatchlabError(f"cannot recommend from B_crit={b_crit}, S0={s0}, B0={b0}, lr={base_lr}")
    ok = [r for r in throughput if r.get("status") == "ok"]
    if not ok:
        raise BatchlabError("no batch size could be timed on this device (all out of memory)")
    for r in ok:
        r["predicted_steps"] = steps_anchored(b_crit, s0, b0, r["batch_size"])
        r["predicted_seconds"] = r["predicted_steps"] * r["seconds_per_step"]
        r["examples_overhead"] = r["batch_size"] / b_crit
    best = min(ok, key=lambda r: r["predicted_seconds"])
    compute = [r["batch_size"] for r in ok if r["batch_size"] <= 0.1 * b_crit]
    b_compute = max(compute) if compute else min(r["batch_size"] for r in ok)
    if tuned and any(r["reached"] for r in tuned):
        rule, slope, lr_a, b_a = lr_rule_from_sweep(tuned, b_crit)
        lr = scale_lr(rule, lr_a, b_a, best["batch_size"])
        lr_rule = (f"{rule} scaling (tuned-lr slope {slope:.2f} on log-log) from lr {lr_a:g} at "
                   f"batch {b_a}")
    elif optimizer in ADAPTIVE:
        lr = adaptive_lr(base_lr, b0, best["batch_size"], b_crit)
        lr_rule = (f"lr(B) = {base_lr:g} x sqrt((1 + B_crit/{b0}) / (1 + B_crit/B)): "
                   f"square-root scaling below B_crit, constant above (the rule for "
                   f"{optimizer}, Malladi et al. 2022), anchored at the lr {base_lr:g} found "
                   f"best at batch {b0}")
    else:
        lr = noise_lr(base_lr, b0, best["batch_size"], b_crit)
        lr_rule = (f"lr(B) = {base_lr:g} x (1 + B_crit/{b0}) / (1 + B_crit/B): linear below "
                   f"B_crit, constant above (McCandlish et al. eq. 2.7), anchored at the lr "
                   f"{base_lr:g} found best at batch {b0}")
    return {"recommended_batch_size": best["batch_size"],
            "recommended_batch_size_compute": b_compute,
            "recommended_lr": lr, "lr_rule": lr_rule,
            "predicted_steps": best["predicted_steps"],
            "predicted_seconds": best["predicted_seconds"]}
