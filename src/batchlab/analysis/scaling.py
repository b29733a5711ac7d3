"""Steps to a target vs batch size: per-run outcomes, the best lr per batch size, and
McCandlish et al.'s trade-off fitted to them.

To reach a given loss, S(B) = S_min (1 + B_crit/B) steps and E(B) = B S(B) = E_min (1 + B/B_crit)
examples, i.e. (S / S_min - 1)(E / E_min - 1) = 1  <=>  S(B) = S_min + E_min / B, with
B_crit = E_min / S_min. `fit_scaling` fits that curve to measured (B, S) points; `steps_anchored`
predicts S(B) from one measured run and a B_crit estimate (the noise scale), as `recommend` does.
This is the analysis layer: the steps-to-target experiment, `recommend` and the accuracy
benchmark all use these functions; none of them knows how the runs were obtained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchlab.engine.result import TrainResult


@dataclass
class Outcome:
    """Steps to target of one run, or (not reached) its budget and best value."""

    reached: bool
    steps: int | None
    examples: int | None
    best: float | None
    budget_steps: int


def outcome(res: TrainResult) -> Outcome:
    """Steps to the run's target: the `target_step` probe's first crossing (checked several
    times an epoch) or, without it, the epoch at which the engine stopped."""
    cfg = res.config
    lower = (cfg.target_metric or "").endswith("loss")
    probe_steps = [e.get("target_step") for e in res.epochs]
    probe_steps = [int(s) for s in probe_steps if isinstance(s, (int, float)) and math.isfinite(s)]
    candidates = probe_steps[:1]
    if res.final.get("target_steps") is not None:
        candidates.append(int(res.final["target_steps"]))
    vals = [e.get(cfg.target_metric) for e in res.epochs] + [e.get("target_best") for e in res.epochs]
    vals = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    best = (min(vals) if lower else max(vals)) if vals else None
    budget = int(res.epochs[-1].get("steps", 0)) if res.epochs else 0
    if res.status != "completed" or not candidates:
        return Outcome(False, None, None, best, budget)
    s = min(candidates)
    return Outcome(True, s, s * cfg.batch_size, best, budget)


def fit_scaling(batch_sizes: list[float], steps: list[float]) -> dict[str, float]:
    """Fit S(B) = S_min + E_min / B to (B, S) points by least squares on log S.

    Returns s_min, e_min, b_crit = E_min/S_min and the rms log residual. Needs 2+ points."""
    from scipy.optimize import least_squares

    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.size < 2:
        raise ValueError("fitting S_min and E_min needs at least two batch sizes")

    def resid(theta: np.ndarray) -> np.ndarray:
        return np.log(np.exp(theta[0]) + np.exp(theta[1]) / b) - np.log(s)

    x0 = np.log([max(s.min() / 2, 1e-9), max((b * s).min() / 2, 1e-9)])
    sol = least_squares(resid, x0, method="lm")
    s_min, e_min = float(np.exp(sol.x[0])), float(np.exp(sol.x[1]))
    return {"s_min": s_min, "e_min": e_min, "b_crit": e_min / s_min,
            "rms_log_residual": float(np.sqrt(np.mean(sol.fun**2)))}


def predicted_steps(fit: dict[str, float], batch_size: float) -> float:
    """S(B) on a fitted curve."""
    return fit["s_min"] + fit["e_min"] / batch_size


def steps_anchored(b_crit: float, s0: float, b0: float, batch: float) -> float:
    """S(B) through one measured point: a run needed S0 steps at batch B0, so
    S(B) = S0 (1 + B_crit/B) / (1 + B_crit/B0)."""
    return s0 * (1 + b_crit / batch) / (1 + b_crit / b0)


def best_per_batch(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: the lr with the fewest mean steps to target over seeds (all seeds must
    reach it); if no lr reaches it, the lr with the best value, marked not reached."""
    by: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        by.setdefault((r["batch_size"], r["lr"]), []).append(r)
    best: dict[int, dict[str, Any]] = {}
    for (bs, lr), rs in sorted(by.items()):
        reached = all(r["reached"] for r in rs)
        steps = float(np.mean([r["steps_to_target"] for r in rs])) if reached else math.inf
        vals = [r["best_value"] for r in rs if r["best_value"] is not None]
        cand = {"batch_size": bs, "lr": lr, "reached": reached,
                "steps_to_target": steps if reached else None,
                "examples_to_target": steps * bs if reached else None,
                "best_value": float(np.mean(vals)) if vals else None,
                "budget_steps": max(r["budget_steps"] for r in rs), "seeds": len(rs)}
        cur = best.get(bs)
        if cur is None or _better(cand, cur):
            best[bs] = cand
    return [best[b] for b in sorted(best)]


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["reached"] != b["reached"]:
        return a["reached"]
    if a["reached"]:
        return a["steps_to_target"] < b["steps_to_target"]
    return (a["best_value"] or -math.inf) > (b["best_value"] or -math.inf)


def scaling_efficiency(best: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Between consecutive reached batch sizes: (S1/S2) / (B2/B1); 1 = perfect scaling."""
    pts = [(r["batch_size"], r["steps_to_target"]) for r in best if r["reached"]]
    return [{"from": b1, "to": b2, "efficiency": (s1 / s2) / (b2 / b1)}
            for (b1, s1), (b2, s2) in zip(pts, pts[1:])]


# -- successive halving over the lr grid --------------------------------------------------------
def halving_rounds(n_lrs: int, max_epochs: int, eta: int = 3) -> list[tuple[int, int]]:
    """(lrs run, epochs each) per round of a successive-halving search: every lr at
    max_epochs / eta^K epochs first, then the best 1/eta of them at eta times the budget, ...,
    the last one at max_epochs (K = ceil(log_eta n_lrs)). The worst case (no lr reaches the
    target before the last round) costs sum n_k e_k epochs: 2.3 E against the grid's 6 E for
    6 lrs and eta = 3, 2.6 E against 10 E for 10 lrs."""
    k_max = 0
    while eta**k_max < n_lrs:
        k_max += 1
    out, alive = [], n_lrs
    for k in range(k_max + 1):
        out.append((alive, max(1, math.ceil(max_epochs / eta ** (k_max - k)))))
        alive = max(1, math.ceil(alive / eta))
    return out


@dataclass
class HalvingSearch:
    """The lr with the fewest steps to the target at one (batch size, seed), found by
    successive halving on the lr grid instead of training every lr for the whole budget.

    Why it finds the grid's answer: a run stops at the target, so a run that reached the target
    within a round's budget has its exact step count, and an lr that did not reach it by then
    needs more steps than that budget - it can no longer be the fastest. So as soon as any lr
    reaches the target the search ends, with the same winner as the full grid. Only while no lr
    has reached it are lrs dropped by a proxy (the best target metric so far; the best 1/eta
    survive), the one place it can differ from the grid: on a unimodal response the proxy ranks
    lrs near the optimum first, which is what `tests/test_scaling_claims.py` checks on a
    fixture. Drive it with `next_round()` -> [(lr, epochs)], then `report(rows)`."""

    lrs: list[float]
    max_epochs: int
    lower_is_better: bool = False
    eta: int = 3
    round: int = 0
    alive: list[float] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def __post_init__(self) -> None:
        self.alive = sorted(self.lrs)
        self.schedule = halving_rounds(len(self.lrs), self.max_epochs, self.eta)

    def next_round(self) -> list[tuple[float, int]]:
        if self.done:
            return []
        return [(lr, self.schedule[self.round][1]) for lr in self.alive]

    def report(self, rows: list[dict[str, Any]]) -> None:
        """This round's rows ({"lr", "reached", "steps_to_target", "best_value"}): end the
        search if any reached the target, else keep the best 1/eta for a longer budget."""
        self.rows += [{**r, "round": self.round} for r in rows]
        if any(r["reached"] for r in rows) or self.round + 1 >= len(self.schedule):
            self.done = True
            return
        keep = self.schedule[self.round + 1][0]
        sign = 1.0 if self.lower_is_better else -1.0
        ranked = sorted(rows, key=lambda r: (r["best_value"] is None,
                                             sign * (r["best_value"] or 0.0)))
        self.alive = sorted(r["lr"] for r in ranked[:keep])
        self.round += 1

    @property
    def winner(self) -> dict[str, Any] | None:
        """The fastest reached row, else (none reached) the last round's best by value."""
        hit = [r for r in self.rows if r["reached"]]
        if hit:
            return min(hit, key=lambda r: r["steps_to_target"])
        last = [r for r in self.rows if r["round"] == self.round]
        sign = 1.0 if self.lower_is_better else -1.0
        ok = [r for r in last if r["best_value"] is not None]
        return min(ok, key=lambda r: sign * r["best_value"]) if ok else None
