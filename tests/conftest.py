"""Shared fixtures. Integration tests on real MNIST use ../shared/data/mnist-24k; on CI
(CI=true) that directory must exist — a missing one is an error, never a silent skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-24k"


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not SHARED_MNIST.is_dir():
        if _on_ci():
            pytest.fail(f"CI needs the real MNIST subset at {SHARED_MNIST} (shared/data/mnist-24k)")
        pytest.skip("real MNIST subset (../shared/data/mnist-24k) not present")
    return SHARED_MNIST


@pytest.fixture
def one_thread():
    """Tiny models run on one intra-op thread: thousands of tiny kernels gain nothing from a
    second thread, and on a busy machine OpenMP barriers make them 10-100x slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch):
    """Run the real CLI entry point (`batchlab.cli.main`) in-process: `run_main(*args)` returns
    its exit code. Exit codes and one-line errors come from `main`, so this is what users get."""
    from batchlab import cli

    def run(*args: object) -> int:
        monkeypatch.setattr(sys, "argv", ["batchlab", *map(str, args)])
        try:
            cli.main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    return run


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Never touch the user's data cache from tests."""
    monkeypatch.setenv("BATCHLAB_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))


TINY = dict(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1)
"""A config that trains in well under a second: for tests of the machinery, not of results."""
