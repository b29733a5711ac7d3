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
from batchlab.atomic import sha256_file
from batchlab.config import make_config
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


# -- robustness: foreign files, damaged files and rows, verified artifacts -----------------------
def _foreign(path: Path, sql: str) -> bytes:
    con = sqlite3.connect(path)
    con.executescript(sql)
    con.commit()
    con.close()
    return path.read_bytes()


@pytest.mark.parametrize("sql, needle", [
    ("CREATE TABLE t (x); INSERT INTO t VALUES (1);", "holds tables t"),
    ("CREATE TABLE runs (id, name); INSERT INTO runs VALUES (1, 'a');", "`runs` table is not batchlab's"),
    ("PRAGMA application_id = 77; CREATE TABLE x (y);", "application_id 77"),
])
def test_foreign_sqlite_files_are_refused_and_left_byte_identical(
        tmp_path: Path, sql: str, needle: str) -> None:
    path = tmp_path / "other.db"
    before = _foreign(path, sql)
    for readonly in (False, True):
        with pytest.raises(BatchlabError, match=needle) as e:
            Store(path, readonly=readonly)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == before
    assert not (tmp_path / "other.db-wal").exists()


def test_new_stores_are_marked_and_old_unmarked_stores_are_adopted(tmp_path: Path) -> None:
    from batchlab.runs.store import APPLICATION_ID, SCHEMA, SCHEMA_VERSION

    new = tmp_path / "new.db"
    Store(new).close()
    con = sqlite3.connect(new)
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()
    # a store written before the marks existed: batchlab's exact tables, no marks
    old = tmp_path / "old.db"
    _foreign(old, SCHEMA + "INSERT INTO runs VALUES ('abc123abc123', 'h1', '{\"lr\": 0.1}', 0, "
                           "'completed', NULL, 'x', 1.0, 2.0, '{}', '{\"test_acc\": 0.9}');")
    with Store(old, readonly=True) as st:  # readable as it is
        assert st.get("abc123abc123").final == {"test_acc": 0.9}
    with Store(old) as st:
        assert st.finished("h1").config == {"lr": 0.1}
    con = sqlite3.connect(old)
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    con.close()


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    from batchlab.runs.store import SCHEMA_VERSION

    path = tmp_path / "s.db"
    Store(path).close()
    _foreign(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1};")
    with pytest.raises(BatchlabError, match="newer batchlab"):
        Store(path)


@pytest.mark.parametrize("damage", ["garbage", "middle", "empty-ro"])
def test_a_damaged_file_is_one_line_naming_it(store_path: Path, damage: str) -> None:
    with Store(store_path) as st:
        for i in range(40):
            st.save_run(_record(i))
        st.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(store_path.read_bytes())
    if damage == "garbage":
        data[:] = bytes(range(256)) * 20
    elif damage == "middle":  # keep the header, wreck the pages behind it
        data[4096:] = b"\xa5" * (len(data) - 4096)
    else:
        data[:] = b""
    store_path.write_bytes(bytes(data))
    with pytest.raises(BatchlabError) as e, Store(store_path, readonly=True) as st:
        st.runs()
        st.check()
    msg = str(e.value)
    assert "\n" not in msg and str(store_path) in msg
    assert store_path.read_bytes() == bytes(data)


def test_damaged_rows_are_skipped_with_a_note_and_reported_by_check(store_path: Path) -> None:
    from batchlab.runs.store import DamagedRow

    with Store(store_path) as st:
        for i in range(3):
            st.save_run(_record(i))
        st.conn.execute("UPDATE runs SET config_json = '{broken' WHERE run_id = 'run0001'")
        st.conn.execute("UPDATE runs SET final_json = '[1, 2]' WHERE run_id = 'run0002'")
        recs = st.runs(with_epochs=True)
        assert [r.run_id for r in recs] == ["run0000"]
        assert [s[0] for s in st.skipped] == ["run0001", "run0002"]
        with pytest.raises(DamagedRow, match="config_json"):
            st.get("run0001")
        assert st.finished("hash0001") is None  # recomputed, then replaced
        assert len(st.export_rows()) == 3
        problems = st.check()
        assert len(problems) == 2 and "config_json" in problems[0] and "final_json" in problems[1]
        st.save_run(_record(1))
        assert len(st.check()) == 1


def test_run_id_prefix_is_literal_not_a_like_pattern(store_path: Path) -> None:
    with Store(store_path) as st:
        st.save_run(_record(7))
        for pattern in ("____", "%%%%", "run_", "r%07", "____0007"):
            assert st.get(pattern) is None, pattern
        assert st.get("run0007").run_id == "run0007"


def test_checkpoints_are_verified_against_the_recorded_sha256(store_path: Path) -> None:
    cfg = make_config(**TINY, checkpoint_epochs=[1])
    train(cfg, store=store_path)
    cached = train(cfg, store=store_path)
    path = Path(cached.artifacts["epoch0001"][0])
    # replaced by a valid safetensors file of other (finite) weights: the sha256 catches it
    good = load_state(path)
    save_file({k: v + 1 for k, v in good.items()}, str(path))
    with pytest.raises(BatchlabError, match="does not match the sha256") as e:
        cached.checkpoint(1)
    assert "\n" not in str(e.value)
    with Store(store_path, readonly=True) as st:
        assert any("does not match its recorded sha256" in p for p in st.check())


def test_nan_weights_in_a_checkpoint_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    save_state(path, {"w": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3])})
    with pytest.raises(BatchlabError, match="NaN or infinite"):
        load_state(path)
    with pytest.raises(BatchlabError, match="NaN or infinite"):
        load_state(path, sha256=sha256_file(path))  # a recorded sha does not make it usable
    assert torch.isnan(load_state(path, allow_nonfinite=True)["w"][1])


def test_leftovers_of_dead_writers_are_cleaned_live_ones_kept(store_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from batchlab.atomic import atomic_path

    Store(store_path).close()
    art = store_path.with_name(store_path.name + ".artifacts")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan, fresh, other = art / "0123456789ab", art / "ba9876543210", art / "notarun"
        for d in (orphan, fresh, other):
            d.mkdir(parents=True)
            (d / "epoch0001.safetensors").write_bytes(b"x")
        old = time.time() - 3600
        for p in (orphan, orphan / "epoch0001.safetensors", other, other / "epoch0001.safetensors"):
            os.utime(p, (old, old))
        dead_tmp = fresh / f".epoch0002.safetensors.{dead}.abcd1234.tmp"
        live_tmp = fresh / f".epoch0002.safetensors.{live.pid}.abcd1234.tmp"
        for t in (dead_tmp, live_tmp):
            t.write_bytes(b"half")
        with atomic_path(art / "mine.bin") as mine:  # this process is writing right now
            mine.write_bytes(b"x")
            with Store(store_path) as st:
                removed = set(st.removed)
            assert mine.exists()
        assert removed == {dead_tmp, orphan}
        assert not dead_tmp.exists() and not orphan.exists()
        assert live_tmp.exists() and fresh.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
