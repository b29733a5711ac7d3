"""The Ray executor on a real local Ray cluster (2 CPUs, dashboard off, shared by every test
here because starting Ray costs ~5-10 s): same stored results as the local executor, a killed
worker is retried and its run stored exactly once, a deterministic failure is stored as failed
after one attempt, re-running computes nothing, and Ctrl-C on the driver leaves a resumable
store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, _on_ci

try:
    import ray
except ImportError:
    if _on_ci():  # CI installs .[dev,ray]: a missing Ray there is a broken build, not a skip
        raise
    pytest.skip("Ray is not installed (pip install 'batchlab[ray]')", allow_module_level=True)

from batchlab.config import make_config
from batchlab.runs.executors import run_configs, run_local
from batchlab.runs.ray_executor import run_ray
from batchlab.runs.store import Store

TIMING = {"seconds", "eval_seconds", "train_seconds_total", "train_seconds"}


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # started by another test module: use it as it is
        yield
        return
    # a small object store: CI containers often have little /dev/shm
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


def _grid(seeds=(0, 1), batch_sizes=(16, 64)) -> list:
    return [make_config(**{**TINY, "batch_size": b, "seed": s}) for b in batch_sizes
            for s in seeds]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _one_thread(fn, *args, **kw):
    """Ray tasks train with torch threads = num_cpus (1 here); CPU float sums depend on the
    intra-op thread count, so the local reference must use the same count to match exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(before)


def hooked_unit(hook):
    """A Ray task body that calls `hook(cfg)` inside the worker just before each config trains
    (alone or in a vectorized pass), so a test can count runs or inject faults there; the
    production task takes no hook. Pickled by value (a closure), so it needs no import on the
    worker beyond batchlab."""

    def unit(configs, raw, num_threads):
        from batchlab.runs import ray_executor as rx

        train, group = rx.train, rx.train_group

        def hooked_train(cfg, **kw):
            hook(cfg)
            return train(cfg, **kw)

        def hooked_group(cfgs, td):
            for c in cfgs:
                hook(c)
            return group(cfgs, td)

        rx.train, rx.train_group = hooked_train, hooked_group
        try:
            return rx.train_unit(configs, raw, num_threads)
        finally:
            rx.train, rx.train_group = train, group

    return unit


@pytest.fixture
def task_hook(monkeypatch: pytest.MonkeyPatch):
    """`task_hook(hook)`: the Ray tasks submitted afterwards in this test run through `hook`."""
    import batchlab.runs.ray_executor as rx

    return lambda hook: monkeypatch.setattr(rx, "_task_body", hooked_unit(hook))


def _counting_hook(log_dir: Path):
    """A task hook (pickled by value: it is a closure) that logs every run a task starts."""

    def hook(cfg):
        with open(log_dir / f"{cfg.batch_size}-{cfg.seed}.log", "a") as f:
            f.write("run\n")

    return hook


def _executed(log_dir: Path) -> int:
    return sum(len(p.read_text().split()) for p in log_dir.glob("*.log"))


def test_ray_matches_local_and_resumes(cluster, tmp_path: Path, task_hook) -> None:
    configs = _grid()
    with Store(tmp_path / "ray.db") as st:
        via_ray = run_configs(configs, st, executor="ray", label="grid")
        assert st.count() == 4
        stored_ray = {r.config_hash: r for r in st.runs(with_epochs=True)}
    with Store(tmp_path / "local.db") as st:
        via_local = _one_thread(run_local, configs, st, label="grid")
        stored_local = {r.config_hash: r for r in st.runs(with_epochs=True)}
    assert [r.run_id for r in via_ray] == [r.run_id for r in via_local]
    assert set(stored_ray) == set(stored_local)
    for key, rec in stored_ray.items():
        ref = stored_local[key]
        assert rec.status == ref.status == "completed"
        assert _strip(rec.epochs) == _strip(ref.epochs)  # exact, not approximate
        assert {k: v for k, v in rec.final.items() if k not in TIMING} == \
            {k: v for k, v in ref.final.items() if k not in TIMING}
    # the driver hands back usable models, as the local executor does
    x = torch.zeros(3, 64)
    assert torch.equal(via_ray[0].model(x), via_local[0].model(x))

    # re-running computes nothing: no task starts a run, every result is cached
    logs = tmp_path / "logs"
    logs.mkdir()
    with Store(tmp_path / "ray.db") as st:
        task_hook(_counting_hook(logs))
        again = run_ray(configs, st)
        assert st.count() == 4
    assert all(r.cached for r in again) and _executed(logs) == 0


def test_killed_worker_is_retried_and_stored_once(cluster, tmp_path: Path, task_hook) -> None:
    marker = tmp_path / "killed"

    def kill_once(cfg):
        import os
        import signal

        if cfg.seed == 1 and cfg.batch_size == 32 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-run

    configs = _grid(batch_sizes=(32, 1024))  # a vectorized pair and two single runs
    with Store(tmp_path / "r.db") as st:
        task_hook(kill_once)
        results = run_ray(configs, st, max_retries=2)
        runs = st.runs(with_epochs=True)
    assert marker.exists(), "the fault was never injected"
    assert int(marker.read_text()) != os.getpid()  # it killed a worker, not the driver
    assert len(runs) == 4 and len({r.config_hash for r in runs}) == 4
    assert all(r.status == "completed" for r in runs + results)
    # the retried task (the vectorized pair) restarted from scratch: equal to undisturbed runs
    with Store(tmp_path / "ref.db") as st:
        _one_thread(run_local, configs, st)
        for r in runs:
            assert _strip(r.epochs) == _strip(st.get(r.config_hash).epochs)


def test_deterministic_failure_is_stored_not_retried(cluster, tmp_path: Path, task_hook) -> None:
    attempts = tmp_path / "attempts"

    def explode(cfg):
        if cfg.seed == 1:
            with open(attempts, "a") as f:
                f.write("x")
            raise RuntimeError("boom in training")

    # autograd runs are never vectorized: one run per task, so one hook call per attempt
    configs = [c.model_copy(update={"engine": "autograd"}) for c in _grid(batch_sizes=(32,))]
    with Store(tmp_path / "r.db") as st:
        task_hook(explode)
        results = run_ray(configs, st, max_retries=3)
        recs = {r.seed: r for r in st.runs()}
    assert attempts.read_text() == "x"  # one attempt: exceptions are not retried
    assert [r.status for r in results] == ["completed", "failed"]
    assert recs[0].status == "completed"
    assert recs[1].status == "failed" and "RuntimeError: boom in training" in recs[1].error


def test_interrupt_leaves_resumable_store(cluster, tmp_path: Path) -> None:
    class InterruptingStore(Store):
        def save_run(self, rec):  # Ctrl-C arrives right after the first run is stored
            super().save_run(rec)
            raise KeyboardInterrupt

    configs = _grid()
    with InterruptingStore(tmp_path / "r.db") as st, pytest.raises(KeyboardInterrupt):
        run_ray(configs, st)
    with Store(tmp_path / "r.db") as st:
        assert st.count() == 1
        done = st.runs(with_epochs=True)[0]
        assert done.status == "completed" and len(done.epochs) == 3
        resumed = run_ray(configs, st)
        assert st.count() == 4
    assert sum(r.cached for r in resumed) == 1
    assert all(r.status == "completed" for r in resumed)


def test_bad_cluster_input_fails_fast() -> None:
    from batchlab.errors import BatchlabError, ConfigError
    from batchlab.runs.ray_executor import _wants_gpu
    from batchlab.runs.tasks import check_reachable

    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_reachable("nohost")
    with pytest.raises(BatchlabError, match="cannot reach"):  # a closed port, not a long hang
        check_reachable("127.0.0.1:1", timeout=2.0)
    cuda = make_config(**{**TINY, "device": "cuda:1"})
    with pytest.raises(ConfigError, match="no GPU"):
        _wants_gpu(cuda, cluster_gpus=0)
    assert _wants_gpu(cuda, cluster_gpus=2)
    assert not _wants_gpu(make_config(**TINY, device="cpu"), cluster_gpus=2)
    assert _wants_gpu(make_config(**TINY, device="auto"), cluster_gpus=1)


def test_cli_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """typer reports Ctrl-C as a returned 130; the CLI must exit with it, not with 0."""
    from batchlab.cli import root as cli

    monkeypatch.setattr(cli, "app", lambda standalone_mode: 130)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert "re-run to resume" in capsys.readouterr().err


KILLING_CLI = """
import os, signal, sys
from batchlab.runs import ray_executor

marker = sys.argv[1]
sys.path.insert(0, sys.argv[2])
from test_ray import hooked_unit


def kill_once(cfg):
    if cfg.seed == 1 and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)  # a Ray worker dies mid-run


ray_executor._task_body = hooked_unit(kill_once)
ray_executor.run_ray.__kwdefaults__.update(num_cpus=2)
from batchlab.cli.root import main

sys.argv = ["batchlab", *sys.argv[3:]]
main()
"""


def test_json_stdout_is_one_object_even_when_a_ray_worker_dies(tmp_path: Path) -> None:
    """`--json` with Ray: stdout carries exactly the JSON, while Ray's messages about the
    killed worker (and its retry) go to stderr."""
    import json
    import subprocess
    import sys

    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\ndataset = "digits"\nhidden = [32]\nepochs = 2\nlr = 0.1\n'
                    'batch_size = 32\n[grid]\nseed = [0, 1]\n')
    marker = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLING_CLI, str(marker), str(Path(__file__).parent), "sweep", str(grid), "--store",
         str(tmp_path / "r.db"), "--executor", "ray", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists(), "the fault was never injected"
    rows = json.loads(proc.stdout)["runs"]  # the whole of stdout is one JSON object
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert "died" in proc.stderr or "retried" in proc.stderr or "retries" in proc.stderr


def test_group_crash_fails_every_run_and_retries_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash escaping a vectorized pass inside a task marks every run of the pass failed, as
    `run_local` does; no run is then retried on its own (which would hide the crash)."""
    import batchlab.runs.ray_executor as rx
    from batchlab.data import load_dataset

    calls: list[int] = []

    def crash(cfgs, td):
        calls.append(len(cfgs))
        raise RuntimeError("boom in the pass")

    monkeypatch.setattr(rx, "train_group", crash)
    monkeypatch.setattr(rx, "_train_one", lambda *a: pytest.fail("retried a run alone"))
    cfgs = _grid(seeds=(0, 1), batch_sizes=(16,))
    outs = rx.train_unit(cfgs, load_dataset(cfgs[0].dataset, cfgs[0].data_dir), 1)
    assert calls == [2]
    assert [o.status for o in outs] == ["failed", "failed"]
    assert all("boom in the pass" in o.error for o in outs)


def test_curvature_units_as_ray_tasks_match_local(cluster, tmp_path: Path) -> None:
    """Sharpness's curvature measurements give the same stored numbers as Ray tasks and on
    local worker threads (both compute with one intra-op thread)."""
    from batchlab.engine.setup import build_model, get_data
    from batchlab.experiments import Context
    from batchlab.experiments import sharpness_units as U

    cfg = make_config(**{**TINY, "seed": 3})
    td = get_data(cfg, torch.device("cpu"))
    a, b = build_model(cfg, td), build_model(make_config(**{**TINY, "seed": 4}), td)  # two inits
    data = (td.x_train[:64], td.y_train[:64])
    got = {}
    for executor in ("local", "ray"):
        batch = U.Batch()
        for m in (a, b):
            U.curvature_units(batch, m, data, 0, 4, 0.5, (1e-3,))
        batch.add("interpolation", [a, b], [*data, *data], {"alphas": [0.0, 0.5]}, U.interpolation,
                  [0.0, 0.5])
        with Store(tmp_path / f"{executor}.db") as st:
            got[executor] = batch.run(Context(store=st, executor=executor))
            assert len(st.conn.execute("SELECT key FROM measurements").fetchall()) == len(batch.units)
    assert got["ray"] == got["local"]


def test_task_lost_beyond_its_retries_is_stored_failed_in_one_line(cluster, tmp_path: Path,
                                                                   task_hook) -> None:
    """A worker that dies on every attempt exhausts the retries: the runs of that task are
    stored as failed with the pool's one-line message, the others complete."""

    def always_die(cfg):
        import os
        import signal

        if cfg.seed == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    configs = [c.model_copy(update={"engine": "autograd"}) for c in _grid(batch_sizes=(32,))]
    with Store(tmp_path / "r.db") as st:
        task_hook(always_die)
        results = run_ray(configs, st, max_retries=0)
        recs = {r.seed: r for r in st.runs()}
    assert [r.status for r in results] == ["completed", "failed"]
    assert recs[1].status == "failed"
    assert recs[1].error.startswith("a Ray task was lost after 0 retries")
    assert "\n" not in recs[1].error


def test_pool_task_errors_are_one_line(cluster) -> None:
    """The pool's caller sees a task's bad-input error as itself, any other exception as one
    `TaskFailed` line naming the task (not Ray's remote traceback)."""
    from batchlab.errors import DataError
    from batchlab.runs.tasks import RayPool, TaskFailed

    def _raises(kind: str) -> None:  # a closure: pickled by value, no test import on the worker
        if kind == "bad input":
            raise DataError("no such column")
        raise RuntimeError("boom in a task\nsecond line of detail")

    pool = RayPool(max_retries=0)
    try:
        bad = pool.submit(_raises, "bad input")
        with pytest.raises(DataError, match="no such column"):
            pool.next_done()
        crash = pool.submit(_raises, "bug")
        with pytest.raises(TaskFailed) as err:
            pool.next_done()
        assert err.value.task == crash != bad
        assert str(err.value) == "a Ray task raised RuntimeError: boom in a task"
        assert err.value.exit_code == 1  # the work failed, not the input: not exit 2
        assert pool.pending() == 0
    finally:
        pool.close()


def test_task_prepares_data_as_the_local_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray task prepares its tensors with the local executor's own `prepare_for`: every
    option of the config reaches it (a copy on the worker once dropped `train_eval_size`, so
    train metrics came from all rows on Ray and from the subset locally)."""
    import batchlab.runs.ray_executor as rx
    from batchlab.data import load_dataset
    from batchlab.engine.setup import get_data

    cfg = make_config(**{**TINY, "train_eval_size": 50, "epochs": 1})
    got = []
    monkeypatch.setattr(rx, "_train_one", lambda c, td, k: got.append(td))
    rx.train_unit([cfg], load_dataset(cfg.dataset, cfg.data_dir), 1)
    local = get_data(cfg, torch.device("cpu"))
    assert len(got[0].eval_sets["train"][1]) == 50
    for split, (x, y) in local.eval_sets.items():
        assert torch.equal(got[0].eval_sets[split][0], x)
        assert torch.equal(got[0].eval_sets[split][1], y)
