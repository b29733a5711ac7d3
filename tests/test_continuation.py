"""A run continued from a stored shorter run (its prefix) records exactly what training it from
scratch records, timing fields aside: rows, final metrics, per-example test correctness and
weights, on every engine (`engine.continuation`, `runs.continuation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY

from batchlab.config import Phase, TrainConfig, make_config
from batchlab.engine.continuation import TIMING_FIELDS, prefix_reason
from batchlab.runs.store import Store
from batchlab.runs.training import train_many

N_DIGITS = 1437  # training examples of `digits` (for the schedules' steps per epoch)


def cfg(**kw: Any) -> TrainConfig:
    return make_config(**{**TINY, "probes": ["geometry"], **kw})


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in TIMING_FIELDS}


def record(store: Store, c: TrainConfig) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    [res] = train_many([c], store)  # cached: the stored record, as a later reader sees it
    assert res.cached
    rows = [_clean(r) for r in res.epochs]
    weights = res.checkpoint(c.epochs) if c.epochs in c.checkpoint_epochs else {}
    return rows, _clean(res.final), weights


def both_ways(tmp_path: Path, shorts: list[TrainConfig], longs: list[TrainConfig],
              same_call: bool = False) -> list[Any]:
    """Train `longs` from scratch in one store and after `shorts` in another; assert the
    records are identical and that the second store continued them. Returns the continued
    results."""
    with Store(tmp_path / "scratch.db") as a:
        train_many(longs, a)
        want = [record(a, c) for c in longs]
    with Store(tmp_path / "continued.db") as b:
        if same_call:
            got_res = train_many(shorts + longs, b)[len(shorts):]
        else:
            train_many(shorts, b, keep_state=True)
            got_res = train_many(longs, b)
        assert all(r.env.get("continued_from") for r in got_res)
        got = [record(b, c) for c in longs]
    for (w_rows, w_final, w_weights), (g_rows, g_final, g_weights) in zip(want, got):
        assert g_rows == w_rows
        assert g_final == w_final
        assert g_weights.keys() == w_weights.keys()
        for k in w_weights:
            assert torch.equal(g_weights[k], w_weights[k]), k
    return got_res


@pytest.mark.parametrize("engine", ["fused", "autograd"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_continued_equals_scratch(tmp_path: Path, engine: str, momentum: float) -> None:
    short = cfg(engine=engine, momentum=momentum, epochs=2)
    long = cfg(engine=engine, momentum=momentum, epochs=5, eval_every=2, checkpoint_epochs=[2, 5])
    both_ways(tmp_path, [short], [long])


def test_adam_and_the_target_step_probe(tmp_path: Path) -> None:
    """Adam's moments and step counts, and a probe with state (the target not reached)."""
    kw = dict(optimizer="adam", lr=0.001, target_metric="test_acc", target_value=0.9999,
              probes=["geometry", "target_step"])
    both_ways(tmp_path, [cfg(epochs=1, **kw)], [cfg(epochs=3, checkpoint_epochs=[3], **kw)])


def test_vectorized_group(tmp_path: Path) -> None:
    """Two lrs stacked in one fused pass, continued stacked from their prefixes."""
    shorts = [cfg(lr=lr, epochs=2, momentum=0.5) for lr in (0.05, 0.1)]
    longs = [cfg(lr=lr, epochs=4, momentum=0.5, checkpoint_epochs=[4]) for lr in (0.05, 0.1)]
    res = both_ways(tmp_path, shorts, longs)
    assert all(r.final.get("vectorized_k") == 2 for r in res)


def test_a_schedule_continues_a_plain_run_in_the_same_call(tmp_path: Path) -> None:
    """A switch of batch size after the plain run's epochs; the plain run is trained first
    in the same call and keeps its state."""
    short = cfg(epochs=2)
    long = cfg(schedule=[Phase(epochs=2, batch_size=32), Phase(epochs=2, batch_size=64)],
               checkpoint_epochs=[4])
    both_ways(tmp_path, [short], [long], same_call=True)


def test_what_is_not_a_prefix() -> None:
    base = cfg(epochs=2)
    assert prefix_reason(base, cfg(epochs=4), N_DIGITS) is None
    assert "cosine" not in (prefix_reason(cfg(epochs=2, decay="cosine"),
                                          cfg(epochs=4, decay="cosine"), N_DIGITS) or "cosine")
    assert prefix_reason(cfg(epochs=2, decay="cosine"), cfg(epochs=4, decay="cosine"),
                         N_DIGITS).startswith("lr differs")
    assert prefix_reason(base, cfg(epochs=4, seed=1), N_DIGITS) is not None
    assert prefix_reason(base, cfg(epochs=4, batch_size=64), N_DIGITS).startswith("batch size")
    assert prefix_reason(cfg(epochs=4, eval_every=4), cfg(epochs=8, eval_every=2),
                         N_DIGITS).startswith("epoch 2 is evaluated")
    assert prefix_reason(base, cfg(epochs=4, optimizer="lars"), N_DIGITS) is not None
    assert prefix_reason(cfg(epochs=4), base, N_DIGITS) == "not shorter"


def test_a_run_that_reached_its_target_is_not_continued(tmp_path: Path) -> None:
    kw = dict(target_metric="train_acc", target_value=0.05)
    with Store(tmp_path / "s.db") as st:
        [short] = train_many([cfg(epochs=2, **kw)], st, keep_state=True)
        assert "target_epoch" in short.final
        [long] = train_many([cfg(epochs=4, **kw)], st)
        assert "continued_from" not in long.env


def test_a_damaged_state_file_means_training_from_scratch(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as st:
        [short] = train_many([cfg(epochs=2)], st, keep_state=True)
        path = Path(short.artifacts["state"][0])
        path.write_bytes(path.read_bytes()[:-8] + b"12345678")
        [long] = train_many([cfg(epochs=4)], st)
        assert "continued_from" not in long.env
        assert long.status == "completed"


def test_halving_continues_its_survivors_and_decides_the_same(tmp_path: Path, monkeypatch) -> None:
    """The halving search with its survivors continued from their previous round writes the
    same rows as the search retraining them (only `seconds_per_step` may differ), and its
    plan charges each survivor its added epochs only."""
    import csv

    from batchlab.engine.setup import get_data, resolve_device
    from batchlab.experiments import Context, run_experiment
    from batchlab.experiments.plan import make_plan
    from batchlab.runs import training
    from batchlab.runs.tasks import threads

    opts = {"hidden": [16], "dataset": "digits", "batch_sizes": [64, 256], "lrs": [0.3, 1.0, 3.0],
            "max_epochs": 6, "target_value": 0.999, "tiny_epochs": 1, "lr_search": "halving"}
    rows = {}
    for mode in ("continued", "scratch"):
        if mode == "scratch":
            monkeypatch.setattr(training, "find_resume", lambda *a: None)
        with threads(1), Store(tmp_path / f"{mode}.db") as st:
            ctx = Context(preset="quick", seeds=1, out_dir=tmp_path / mode, store=st, options=opts)
            if mode == "continued":
                plan = make_plan([("steps-to-target", ctx)], 0.01).to_json()
            _, path = run_experiment("steps-to-target", ctx)
            if mode == "continued":
                # the searches are over: no state they kept is left (pruned, 7.5 MB a paper run)
                assert st.runs() and not any("state" in r.artifacts for r in st.runs())
                assert any(r.env.get("continued_from") for r in training.train_many(
                    [c for c in _last_round(st)], st))
        rows[mode] = [{k: v for k, v in r.items() if k != "seconds_per_step"}
                      for r in csv.DictReader((path / "results.csv").open())]
    assert rows["continued"] == rows["scratch"]
    assert {r["round"] for r in rows["continued"]} == {"0", "1"}  # nobody reached 0.999
    # rounds (3 lrs, 2 epochs), (1 lr, 6 epochs): 3 x 2 + (6 - 2) epochs per batch size; the
    # tiny batch's 3 lrs x 1 epoch; G3's noise run (6 epochs, counted at the smallest batch)
    td = get_data(make_config(dataset="digits"), resolve_device("cpu"))
    steps = (sum((3 * 2 + 4) * -(-td.n_train // b) for b in (64, 256)) + 3 * td.n_train
             + 6 * -(-td.n_train // 64))
    assert plan["sgd_steps"] == steps


def _last_round(st: Store) -> list[TrainConfig]:
    """The configs of the halving's longest runs, from the store."""
    recs = [r for r in st.runs() if r.config["batch_size"] != 1]
    top = max(r.config["epochs"] for r in recs)
    return [make_config(**r.config) for r in recs if r.config["epochs"] == top]


def test_dropping_states_keeps_every_result_and_longer_runs_train_from_scratch(tmp_path: Path,
                                                                                run_main) -> None:
    """A kept state is a cache: `runs prune-states` removes its file and index row, the run
    stays whole (its checksum verified, its metrics unchanged), and a longer config then
    trains from scratch to the same record."""
    from batchlab.runs import training

    short, long = (make_config(**{**TINY, "epochs": e}) for e in (2, 3))
    with Store(tmp_path / "s.db") as st:
        kept = training.train_many([short], st, keep_state=True)[0]
        path = Path(st.get(kept.run_id).artifacts["state"][0])
        assert path.is_file()
    code = run_main("runs", "prune-states", "--store", tmp_path / "s.db", "--json")
    assert code == 0 and not path.exists()
    with Store(tmp_path / "s.db") as st:
        assert st.check() == [] and "state" not in st.get(kept.run_id).artifacts
        again = training.train_many([short], st)[0]
        assert again.cached and again.final == kept.final
        cont = training.train_many([long], st)[0]
    assert "continued_from" not in cont.env
    assert cont.final["test_correct_bits"] == training.train_many([long])[0].final["test_correct_bits"]


def test_pruning_states_leaves_a_damaged_run_unsigned(tmp_path: Path) -> None:
    """A run whose row was edited by hand is never saved again by the pruning (that would sign
    the edit): it keeps its state and stays damaged for `runs check` to report."""
    import sqlite3

    from batchlab.runs.continuation import drop_states

    a, b = (make_config(**{**TINY, "epochs": 2, "seed": s}) for s in (0, 1))
    with Store(tmp_path / "s.db") as st:
        ra, rb = train_many([a, b], st, keep_state=True)
    con = sqlite3.connect(tmp_path / "s.db")
    with con:
        con.execute("UPDATE runs SET final_json = replace(final_json, '\"status\"', "
                    "'\"statuz\"') WHERE run_id = ?", (ra.run_id,))
    con.close()
    with Store(tmp_path / "s.db") as st:
        assert drop_states(st, [ra.run_id, rb.run_id])[0] == 1
        assert "state" not in st.get(rb.run_id).artifacts
        assert [rid for rid, _ in st.check_runs()] == [ra.run_id]
