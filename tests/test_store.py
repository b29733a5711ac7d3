"""The SQLite results store and safetensors checkpoints."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import save_file

from batchlab import train
from batchlab.config import make_config
from batchlab.data.idx import sha256_file
from batchlab.errors import BatchlabError
from batchlab.nn.checkpoint import load_into, load_state, read_meta, save_model, save_state
from batchlab.nn.models import build_mlp
from batchlab.runs.store import RunRecord, Store

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(i: int, status: str = "completed") -> RunRecord:
    return RunRecord(run_id=f"run{i:04d}", config_hash=f"hash{i:04d}", config={"i": i}, seed=i,
                     status=status, epochs=[{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(3)],
                     final={"test_acc": 0.5}, label="t")


def test_store_is_wal_and_round_trips_a_run(store_path: Path) -> None:
    with Store(store_path) as st:
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        st.save_run(_record(1))
        rec = st.get("run0001")
        assert rec.config == {"i": 1} and rec.final == {"test_acc": 0.5}
        assert [e["epoch"] for e in rec.epochs] == [0, 1, 2]
        assert st.get("hash0001").run_id == "run0001"
        assert st.get("run0").run_id == "run0001"  # a unique prefix
        st.save_run(_record(2))
        assert st.get("run0") is None  # an ambiguous prefix finds nothing
        assert st.get("nope") is None
        assert st.finished("hash0001") is not None


def test_failed_runs_are_not_finished_and_resaving_replaces(store_path: Path) -> None:
    with Store(store_path) as st:
        st.save_run(_record(2, status="failed"))
        assert st.finished("hash0002") is None
        st.save_run(_record(2, status="completed"))
        assert st.count() == 1 and st.finished("hash0002") is not None
        assert len(st.epochs("run0002")) == 3


def test_a_failing_transaction_leaves_nothing(store_path: Path) -> None:
    with Store(store_path) as st:
        bad = _record(3)
        bad.epochs = [{"epoch": 0}, {"epoch": 0}]  # duplicate primary key mid-transaction
        with pytest.raises(sqlite3.IntegrityError):
            st.save_run(bad)
        assert st.count() == 0 and st.epochs("run0003") == []


def test_train_with_store_saves_once_and_returns_cached(store_path: Path) -> None:
    cfg = make_config(**TINY)
    first = train(cfg, store=store_path, label="x")
    again = train(cfg, store=store_path)
    assert not first.cached and again.cached and again.model is None
    assert again.run_id == first.run_id and again.status == "completed"
    assert [e["test_acc"] for e in again.epochs] == [e["test_acc"] for e in first.epochs]
    with Store(store_path) as st:
        assert st.count() == 1
        rec = st.get(first.run_id)
        assert rec.label == "x" and rec.env["torch"] == torch.__version__
        assert rec.config["batch_size"] == TINY["batch_size"] and rec.seed == 0


def test_reading_while_another_connection_writes(store_path: Path) -> None:
    """WAL: a reader sees consistent snapshots, never a half-written run, while writes go on."""
    Store(store_path).close()
    stop = threading.Event()
    errors: list[Exception] = []

    def writer() -> None:
        with Store(store_path) as st:
            for i in range(60):
                st.save_run(_record(i))
        stop.set()

    seen = []
    t = threading.Thread(target=writer)
    t.start()
    with Store(store_path) as reader:
        while not stop.is_set() or not seen:
            try:
                recs = reader.runs(with_epochs=True)
            except sqlite3.Error as e:  # pragma: no cover - the failure this test looks for
                errors.append(e)
                break
            assert all(len(r.epochs) == 3 for r in recs)  # whole runs only
            seen.append(len(recs))
    t.join()
    assert not errors
    assert seen == sorted(seen) and seen[-1] <= 60
    with Store(store_path) as st:
        assert st.count() == 60


def test_checkpoints_round_trip_through_the_store(store_path: Path) -> None:
    cfg = make_config(**TINY, checkpoint_epochs=[0, 2])
    res = train(cfg, store=store_path)
    assert set(res.checkpoints) == {0, 2}
    for k, v in res.init_state.items():
        assert torch.equal(res.checkpoints[0][k], v)
    final = {k: v.detach() for k, v in res.model.state_dict().items()}
    cached = train(cfg, store=store_path)
    assert cached.cached and not cached.checkpoints
    for epoch, ref in ((0, res.init_state), (2, final)):
        loaded = cached.checkpoint(epoch)
        assert loaded.keys() == ref.keys()
        for k in ref:
            assert torch.equal(loaded[k], ref[k])
    path, sha = cached.artifacts["epoch0002"]
    assert sha256_file(Path(path)) == sha
    assert read_meta(Path(path)) == {"run_id": res.run_id, "epoch": 2}
    with pytest.raises(KeyError, match="checkpoint_epochs"):
        cached.checkpoint(1)


def test_safetensors_model_round_trip_and_mismatch(tmp_path: Path) -> None:
    a = build_mlp(64, [32], seed=1)
    b = build_mlp(64, [32], seed=2)
    path = tmp_path / "m.safetensors"
    save_model(path, a, {"note": "x"})
    load_into(b, path)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(BatchlabError, match="does not fit the model.*shape mismatch"):
        load_into(build_mlp(64, [16], seed=0), path)
    with pytest.raises(BatchlabError, match="does not fit the model.*missing"):
        load_into(build_mlp(64, [32, 32], seed=0), path)


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_state(path, {"w": torch.ones(3)})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BatchlabError, match="cannot load checkpoint"):
        load_state(path)
    # a pickle is not loaded (and so never executed)
    pkl = tmp_path / "evil.safetensors"
    torch.save({"w": torch.ones(3)}, pkl)
    with pytest.raises(BatchlabError):
        load_state(pkl)
    # a file with foreign names does not fit
    other = tmp_path / "other.safetensors"
    save_file({"foo": torch.ones(2)}, str(other))
    with pytest.raises(BatchlabError, match="unexpected"):
        load_into(build_mlp(4, [2]), other)


def test_export_rows_flatten_config_and_epochs(store_path: Path) -> None:
    with Store(store_path) as st:
        st.save_run(_record(1))
        rows = st.export_rows()
        assert len(rows) == 3 and rows[0]["cfg_i"] == 1 and rows[2]["epoch"] == 2
        with pytest.raises(BatchlabError, match="unknown export format"):
            st.export(store_path.with_suffix(".x"), "xlsx")


def test_store_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BatchlabError, match="directory"):
        Store(tmp_path)
