"""Gradient-competition trials on a simulated two-node Ray cluster (Ray's own
`ray.cluster_utils.Cluster`: a head and a worker node with one CPU each, in this machine).

The chunks of trials are Ray tasks spread over both nodes; their records must be bit-identical
to the local executor's, also when the worker node is removed while chunks are in flight (Ray
reschedules the lost tasks on the head node). A second run finds every chunk in the store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _on_ci

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:
    if _on_ci():
        raise
    pytest.skip("Ray is not installed (pip install 'batchlab[ray]')", allow_module_level=True)

from batchlab.analysis import gradcomp as gc
from batchlab.analysis.gradcomp_runner import load_tensors, run_trials
from batchlab.analysis.gradcomp_trials import TrialRun
from batchlab.nn.models import build_mlp
from batchlab.runs.store import Store

N = 96


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():  # another module's single-node Ray: this test needs its own
        ray.shutdown()
    # a lost node is noticed within about a second (Ray's default health check takes ~15 s)
    fast_health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                   "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 1024**2, "include_dashboard": False,
        "_system_config": fast_health})
    worker = cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def _design() -> tuple[TrialRun, torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = build_mlp(30, [64], 10, seed=5)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(400, 30, generator=g)
    Y = torch.randint(0, 10, (400,), generator=g)
    run = TrialRun("cluster", gc.trial_seeds(7, "cluster", 12), [None] * 12, [1, 4, 96],
                   list(gc.MODES), n_samples=N, lr=0.05, chunk=2)
    return run, model, X, Y


def _without_time(recs: dict) -> dict:
    """Records without timings and tensor file paths (the tensors are compared by value)."""
    return {b: {k: v if k != "modes" else {m: {f: x for f, x in d.items() if f != "files"}
                                           for m, d in v.items()}
                for k, v in r.items() if k != "seconds"} for b, r in recs.items()}


def test_two_nodes_match_local_also_after_losing_a_node(two_nodes, tmp_path: Path) -> None:
    cluster, worker = two_nodes
    run, model, X, Y = _design()
    with Store(tmp_path / "local.db") as st:
        local = run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "local")
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2

    # remove the worker node as soon as the first chunks are back: later chunks (and the
    # ones it is running) go to the head node; Ray retries the lost ones
    removed = threading.Event()
    pending_at_removal: list[int] = []
    done = [0]

    def advance(b: int, trials: int) -> None:
        done[0] += trials
        if done[0] >= 4 and not removed.is_set():
            pending_at_removal.append(3 * len(run.seeds) - done[0])
            cluster.remove_node(worker, allow_graceful=False)
            removed.set()

    t0 = time.perf_counter()
    with Store(tmp_path / "ray.db") as st:
        via_ray = run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "ray",
                             executor="ray", advance=advance)
        assert removed.is_set() and pending_at_removal[0] > 0  # removed mid-run
        # a rerun finds every chunk in the store: nothing is submitted
        again = run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "ray", executor="ray")
    assert time.perf_counter() - t0 < 120
    assert _without_time(via_ray) == _without_time(local)
    assert _without_time(again) == _without_time(local)
    for b in run.batch_sizes:
        for m in run.modes:
            assert np.array_equal(load_tensors(via_ray[b], m), load_tensors(local[b], m))
