"""Unit tests of the steps-to-target, throughput and schedules claims on synthetic runs whose
truth is known: every quantity is computed per seed and the interval is over seeds (issue 19),
and each planted degenerate case (a censored arm, |tau| = 1 in every seed, a design constant,
an unconverged arm, an unmeasured memory half) comes out as the rule says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchlab.experiments.claims import check_document, claims_document


def _doc_ok(claims: list) -> None:
    doc = claims_document([c.to_json() for c in claims])
    import json

    from batchlab.experiments.claims import dumps
    assert check_document(json.loads(dumps(doc["claims"]))) == []


def _row(bs: int, lr: float, seed: int, steps: float | None, budget: int = 10_000,
         sps: float = 0.01) -> dict:
    return {"batch_size": bs, "lr": lr, "seed": seed, "status": "completed",
            "reached": steps is not None, "steps_to_target": steps, "budget_steps": budget,
            "seconds_per_step": sps}


def _grid(s_min: float = 100.0, b_crit: float = 256.0, seeds: int = 3,
          batches: tuple[int, ...] = (16, 64, 256, 1024)) -> list[dict]:
    """Steps on S(B) = S_min (1 + B_crit / B), +-3% per seed; the fastest lr doubles with B
    (the slower lr takes 1.5x the steps)."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(seeds):
        for i, b in enumerate(batches):
            st = s_min * (1 + b_crit / b) * math.exp(rng.normal(0, 0.03))
            best_lr = 0.01 * 2**i
            rows += [_row(b, best_lr, s, round(st)), _row(b, best_lr * 8, s, round(1.5 * st))]
    return rows


def _noise(seeds: int = 3, late: float = 256.0) -> dict[int, dict]:
    """B_simple ~ 1/loss along each seed's run, its late value near `late`."""
    out = {}
    for s in range(seeds):
        loss = np.geomspace(2.0, 0.05, 12)
        b = late * 0.05 / loss * (1 + 0.05 * s)
        out[s] = {"late": float(np.exp(np.mean(np.log(b[6:])))), "init": float(b[0]),
                  "batch_size": 16, "lr": 0.1, "series": list(zip(loss.tolist(), b.tolist()))}
    return out


def test_stt_claims_on_a_known_curve() -> None:
    from batchlab.experiments.steps_to_target_claims import stt_claims

    c = {x.id: x for x in stt_claims(_grid(), _noise())}
    _doc_ok(list(c.values()))
    assert c["model-fits"].verdict == "reproduced"
    assert c["model-fits"].interval.n == 3  # seeds, not seeds x batch sizes
    fits = c["model-fits"].evidence["fits"]
    assert all(100 < f["b_crit"] < 600 for f in fits.values())
    assert c["noise-grows"].verdict == "reproduced"
    assert c["noise-grows"].interval.n == 3
    # the per-seed tuned lr grows perfectly in every seed: |tau| = 1 with zero spread, yet
    # the interval is never of zero width (tau's null variance floors it)
    lr = c["lr-grows"]
    assert lr.interval.estimate == pytest.approx(1.0)
    assert lr.interval.lo < lr.interval.hi and lr.verdict != "untestable"
    assert c["noise-scale-predicts"].interval.n == 3


def test_degenerate_fit_does_not_crash_g2(monkeypatch) -> None:
    """A fit with E_min ~ 1e-300 (no gain from the batch size at all) has a B_crit whose ratio
    to B_simple underflows to 0: G2's log ratio must stay finite and the claims be written
    (this crashed a quick preset on mnist-5k)."""
    import batchlab.experiments.steps_to_target_claims as stc

    real = stc.fit_scaling

    def degenerate(b, s):  # the fitted curve, with B_crit at the bottom of the float range
        return {**real(b, s), "e_min": 1e-320, "b_crit": 1e-322}

    monkeypatch.setattr(stc, "fit_scaling", degenerate)
    c = {x.id: x for x in stc.stt_claims(_grid(), _noise())}
    _doc_ok(list(c.values()))
    g2 = c["noise-scale-predicts"]
    assert g2.interval.n == 3 and g2.verdict != "reproduced"
    assert all(math.isfinite(v) for v in g2.interval.replicates)


def test_right_censored_arms_are_excluded_and_counted() -> None:
    from batchlab.experiments.steps_to_target_claims import per_seed_steps, stt_claims

    rows = _grid()
    # batch 1024 reaches the target at 95% of its budget in seed 0, never in seed 1
    for r in rows:
        if r["batch_size"] == 1024 and r["seed"] == 0:
            r["budget_steps"] = math.ceil(r["steps_to_target"] / 0.95)
        if r["batch_size"] == 1024 and r["seed"] == 1:
            r.update(reached=False, steps_to_target=None)
    steps = per_seed_steps(rows)
    assert 1024 not in steps[0] and 1024 not in steps[1] and 1024 in steps[2]
    c = {x.id: x for x in stt_claims(rows, _noise())}
    assert c["model-fits"].evidence["censored"]["excluded"] == 2
    assert c["perfect-scaling"].evidence["batch_sizes"] == [16, 64, 256]
    _doc_ok(list(c.values()))
    # every seed censored at all but two batch sizes: nothing to fit -> unmeasured, not decided
    few = [r for r in rows if r["batch_size"] in (16, 64)]
    c = {x.id: x for x in stt_claims(few, {})}
    assert c["model-fits"].verdict == "untestable"
    assert c["model-fits"].reason["code"] == "unmeasured"
    assert c["noise-grows"].reason["code"] == "unmeasured"
    _doc_ok(list(c.values()))


def test_one_seed_decides_nothing() -> None:
    from batchlab.experiments.steps_to_target_claims import stt_claims

    c = {x.id: x for x in stt_claims(_grid(seeds=1), _noise(seeds=1))}
    for k in ("model-fits", "noise-grows", "noise-scale-predicts"):
        assert c[k].interval.n == 1 and c[k].verdict == "inconclusive", k


def _timings(seeds: int = 3, mem_method: str | None = None, mem: bool = True,
             sizes: tuple[int, ...] = (16, 64, 256, 1024, 4096)) -> dict[int, list[dict]]:
    """One timing pass per seed: s/step = 1 ms + b x 10 us (+-2% per seed and size)."""
    from batchlab.analysis.throughput import MEMORY_RSS

    rng = np.random.default_rng(1)
    out = {}
    for s in range(seeds):
        rows = []
        for b in sizes:
            sps = (1e-3 + 1e-5 * b) * math.exp(rng.normal(0, 0.02))
            rows.append({"batch_size": b, "status": "ok", "seconds_per_step": sps,
                         "samples_per_s": b / sps, "peak_memory_mb": 0.01 * b if mem else 0.0,
                         "memory_method": mem_method or MEMORY_RSS})
        out[s] = rows
    return out


def _pow2(faster_256: float, faster_1024: float, seeds: int = 3) -> dict[int, list[dict]]:
    rng = np.random.default_rng(2)
    out = {}
    for s in range(seeds):
        rows = []
        for p, f in ((256, faster_256), (1024, faster_1024)):
            for b in (p - 1, p, p + 1):
                per = 1e-5 * (1.0 if b == p else f) * math.exp(rng.normal(0, 0.01))
                rows.append({"batch_size": b, "status": "ok", "seconds_per_step": per * b})
        out[s] = rows
    return out


def test_throughput_claims_per_timing_pass() -> None:
    from batchlab.experiments.steps_to_target_claims import per_seed_best
    from batchlab.experiments.throughput import throughput_claims

    best = per_seed_best(_grid(batches=(16, 64, 256, 1024, 4096)))
    c = {x.id: x for x in throughput_claims(_timings(), _pow2(1.3, 1.3), best)}
    _doc_ok(list(c.values()))
    # samples/s rise monotonically in every pass: tau = 1 in every seed, never zero width
    tg = c["throughput-grows"]
    assert tg.interval.estimate == pytest.approx(1.0) and tg.interval.n == 3
    assert tg.interval.lo < 1.0 and tg.verdict != "untestable"
    assert c["memory-grows"].interval.n == 3
    assert c["cost-linear-in-m"].interval.n == 3
    assert c["powers-of-two-faster"].verdict == "reproduced"
    # S(B) = 100 (1 + 256/B) steps x (1 ms + B x 10 us): fastest at B = 256, inside the grid
    # (0.7 s against 2.0 s at B = 16 and 4.4 s at B = 4096)
    assert c["time-optimum-interior"].interval.n == 3
    assert c["time-optimum-interior"].verdict == "reproduced"
    assert 0.3 < c["time-optimum-interior"].interval.estimate < 0.45


def test_powers_of_two_needs_both_pairs() -> None:
    """One pair faster by 30%, the other not at all: not pooled into one average that would
    pass - the weaker pair decides, and it lies below the 5% threshold."""
    from batchlab.experiments.throughput import powers_of_two_claim

    c = powers_of_two_claim(_pow2(1.3, 1.0))
    assert c.verdict == "not_reproduced"
    assert c.interval.estimate == pytest.approx(1.0, abs=0.03)
    assert sorted(c.evidence["log_ratios"]) == [256, 1024]


@pytest.mark.parametrize("kind", ["lifetime", "zeros"])
def test_memory_half_unmeasured_says_why(kind: str) -> None:
    from batchlab.analysis.throughput import MEMORY_LIFETIME
    from batchlab.experiments.throughput import throughput_claims

    tp = _timings(mem_method=MEMORY_LIFETIME) if kind == "lifetime" else _timings(mem=False)
    c = {x.id: x for x in throughput_claims(tp, {}, {})}
    m = c["memory-grows"]
    assert m.verdict == "untestable" and m.reason["code"] == "unmeasured"
    assert ("cannot be reset" if kind == "lifetime" else "0 MB") in m.reason["text"]
    _doc_ok(list(c.values()))


def _arms() -> dict:
    from batchlab.experiments.options import Schedules
    from batchlab.experiments.schedules_exp import arm_fields

    s = Schedules(base_batch=32, large_batch=256, lr=0.1, epochs=10, decay_epochs=[5],
                  decay_factor=0.1, warmup_epochs=1.0, gbn=False).resolve("quick")
    return arm_fields(s, 4096)


def _bits(p: float, n: int, seed: int, base: np.ndarray | None = None, flip: int = 0) -> np.ndarray:
    """Per-example correctness: `base` with `flip` examples changed, or fresh at rate p."""
    rng = np.random.default_rng(seed)
    if base is None:
        return (rng.random(n) < p).astype(float)
    out = base.copy()
    idx = rng.choice(n, size=flip, replace=False)
    out[idx] = 1 - out[idx]
    return out


def _schedules(seeds: int = 3, unconverged: str | None = None, gap: float = 0.0,
               n_test: int = 2000, large_train: float = 0.99) -> list:
    """Every arm scores like `small` (+-3 examples per seed), `large` `gap` below it; all
    arms plateaued, except `unconverged` (its train accuracy still rising by 3 points)."""
    from batchlab.experiments.schedules_exp import schedule_claims

    arms = _arms()
    acc, correct, plateau, steps, train = {}, {}, {}, {}, {}
    for i, a in enumerate(arms):
        acc[a], correct[a], plateau[a], steps[a], train[a] = [], [], [], [], []
        for s in range(seeds):
            base = _bits(0.95, n_test, 100 + s)
            c = _bits(0, n_test, 10 * i + s, base=base, flip=3)
            if a == "large" and gap:
                ones = np.flatnonzero(c)[: int(gap * n_test)]
                c[ones] = 0.0
            correct[a].append(c)
            acc[a].append(float(c.mean()))
            plateau[a].append(0.03 + 0.001 * s if a == unconverged else 0.0005 * (s - 1))
            steps[a].append(1000 if a != "smith" else 400)
            train[a].append((large_train if a == "large" else 0.99) + 0.001 * s)
    return schedule_claims(acc, steps, arms, 0.01, n_test, 32, correct=correct, plateau=plateau,
                           train_acc=train)


def test_schedules_paired_and_gated() -> None:
    c = {x.id: x for x in _schedules()}
    _doc_ok(list(c.values()))
    # the arms share the test set and differ on ~6 of 2,000 examples: paired, the interval
    # sits well inside +-1%, where two independent binomial errors would not
    g = c["goyal-closes-gap"]
    assert g.verdict == "reproduced", g.to_json()
    assert g.interval.hi - g.interval.lo < 0.01
    assert [x.name for x in g.gates] == ["goyal converged", "small converged"]
    # Smith's fewer updates: a design constant, shown as a check, never evidence
    f = c["smith-fewer-updates"]
    assert f.verdict == "untestable" and f.reason["code"] == "construction"
    assert f.reason["check"] == "holds"


def test_unconverged_arm_is_untestable_not_matched() -> None:
    c = {x.id: x for x in _schedules(unconverged="smith")}
    s = c["smith-closes-gap"]
    assert s.verdict == "untestable" and s.reason["code"] == "regime"
    assert "smith converged" in s.reason["text"]
    assert c["goyal-closes-gap"].verdict == "reproduced"
    _doc_ok(list(c.values()))


def test_one_seed_accuracy_difference_decides_nothing() -> None:
    c = {x.id: x for x in _schedules(seeds=1, gap=0.05)}
    assert c["gap"].interval.n == 1
    assert c["gap"].interval.hi == math.inf  # a 5-point gap, but no seed variance
    # and no premise can be shown with one seed either: untestable, never decided
    assert c["gap"].verdict == "untestable" and c["gap"].reason["code"] == "regime"
    assert c["goyal-closes-gap"].verdict == "untestable"
    _doc_ok(list(c.values()))
    # with three seeds the same 5-point gap is decided
    assert {x.id: x for x in _schedules(gap=0.05)}["gap"].verdict == "reproduced"


def test_gap_needs_comparable_train_accuracy() -> None:
    """K1's gap is at comparable train accuracy: a large batch still 5 points behind in train
    accuracy (undertrained) makes the gap untestable, whatever its test accuracy says."""
    c = {x.id: x for x in _schedules(gap=0.05, large_train=0.94)}
    g = c["gap"]
    assert g.verdict == "untestable" and g.reason["code"] == "regime"
    assert "comparable train accuracy" in g.reason["text"]
    _doc_ok(list(c.values()))


# -- issue 21: successive halving instead of the full lr grid ------------------------------------
def _fixture_run(lr: float, epochs: int, opt_lr: float, noise: float, rng) -> dict:
    """A synthetic run: T(lr) = 200 steps x exp(1.5 (log10 lr - log10 opt)^2) to the target
    (10 steps an epoch), +-noise; test accuracy 0.95 x (1 - exp(-3 t / T)) after t steps."""
    t_hit = 200 * math.exp(1.5 * (math.log10(lr) - math.log10(opt_lr)) ** 2)
    t_hit *= math.exp(rng.normal(0, noise))
    budget = 10 * epochs
    target = 0.95 * (1 - math.exp(-3))
    reached = t_hit <= budget
    return {"lr": lr, "reached": reached, "steps_to_target": round(t_hit) if reached else None,
            "best_value": target if reached else 0.95 * (1 - math.exp(-3 * budget / t_hit))}


@pytest.mark.parametrize("max_epochs", [60, 200])
def test_halving_finds_the_grids_lr_within_a_grid_step(max_epochs: int) -> None:
    """On 200 fixtures (optimum anywhere in the grid's range, 10% noise per run) the
    successive-halving search picks the full grid's fastest lr or its neighbour, at most
    2.4/6 of the grid's epochs."""
    from batchlab.analysis.scaling import HalvingSearch

    lrs = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    rng = np.random.default_rng(7)
    far, cost, grid_cost = 0, 0, 0
    for _ in range(200):
        opt = 10 ** rng.uniform(-2, 0.5)
        seed = int(rng.integers(1 << 30))
        # the same seed -> the same run whatever searches it (a run is a function of its config)

        def run(lr: float, epochs: int, opt: float = opt, seed: int = seed) -> dict:
            r = np.random.default_rng([seed, int(lr * 1e4)])
            return _fixture_run(lr, epochs, opt, 0.1, r)

        grid = [run(lr, max_epochs) for lr in lrs]
        grid_cost += len(lrs) * max_epochs
        hit = [g for g in grid if g["reached"]]
        best_grid = min(hit, key=lambda g: g["steps_to_target"])["lr"] if hit else None
        h = HalvingSearch(lrs, max_epochs)
        while todo := h.next_round():
            cost += sum(ep for _, ep in todo)
            h.report([run(lr, ep) for lr, ep in todo])
        w = h.winner
        if best_grid is None:
            assert w is None or not w["reached"]
            continue
        assert w is not None and w["reached"]
        far += abs(lrs.index(w["lr"]) - lrs.index(best_grid)) > 1
    assert far == 0
    assert cost <= 2.4 / 6 * grid_cost


def test_halving_stops_once_an_lr_reaches_the_target() -> None:
    """An lr that reached the target in the first round ends the search: every other lr needed
    more steps than that round's budget, so none can be faster - the grid's winner exactly."""
    from batchlab.analysis.scaling import HalvingSearch, halving_rounds

    assert halving_rounds(6, 60) == [(6, 7), (2, 20), (1, 60)]
    h = HalvingSearch([0.1, 0.3, 1.0], 60)
    first = h.next_round()
    assert [ep for _, ep in first] == [20, 20, 20]
    h.report([{"lr": 0.1, "reached": False, "steps_to_target": None, "best_value": 0.5},
              {"lr": 0.3, "reached": True, "steps_to_target": 150, "best_value": 0.9},
              {"lr": 1.0, "reached": True, "steps_to_target": 120, "best_value": 0.9}])
    assert h.done and h.next_round() == [] and h.winner["lr"] == 1.0


def test_halving_plan_projects_less_than_the_grid(tmp_path) -> None:
    """`--plan` records a halving search's worst case (every round, no early stop): fewer
    FLOPs than the grid, by the rounds' arithmetic."""
    from batchlab.experiments import Context
    from batchlab.experiments.plan import make_plan
    from batchlab.runs.store import Store

    opts = {"hidden": [16], "dataset": "digits", "batch_sizes": [16, 64], "lrs": [0.03, 0.1, 0.3],
            "max_epochs": 9, "tiny_epochs": 1}
    flops = {}
    with Store(tmp_path / "runs.db") as st:
        for mode in ("grid", "halving"):
            ctx = Context(preset="quick", seeds=2, out_dir=tmp_path / mode, store=st,
                          options={**opts, "lr_search": mode})
            flops[mode] = make_plan([("steps-to-target", ctx)], 0.01).to_json()["flops"]
    # per (batch, seed): grid 3 x 9 epochs; halving 3 x 3 + 1 x 9 (+ the tiny batch's runs)
    assert flops["halving"] < 0.75 * flops["grid"]


def test_halving_end_to_end(tmp_path) -> None:
    """The experiment with `lr_search=halving` on a tiny setting: its claims are clean, and each
    (batch size, seed) trained its lrs first at the short budget."""
    import csv
    import json

    from batchlab.experiments import Context, run_experiment
    from batchlab.runs.store import Store
    from batchlab.runs.tasks import threads

    opts = {"hidden": [16], "dataset": "digits", "batch_sizes": [16, 64, 256],
            "lrs": [0.3, 1.0], "max_epochs": 4, "target_value": 0.8, "tiny_epochs": 1,
            "lr_search": "halving"}
    with threads(1), Store(tmp_path / "runs.db") as st:
        ctx = Context(preset="quick", seeds=2, out_dir=tmp_path / "out", store=st, options=opts)
        output, path = run_experiment("steps-to-target", ctx)
    doc = json.loads((path / "claims.json").read_text())
    assert check_document(doc) == []
    rows = list(csv.DictReader((path / "results.csv").open()))
    first = [r for r in rows if r.get("round") == "0"]
    assert len(first) == 3 * 2 * 2  # batch sizes x seeds x lrs, all at the first budget
    assert {r["ran_epochs"] for r in first} == {"2"}
    assert {"G1", "G2", "G3", "P3"} <= {c["finding"] for c in doc["claims"]}
