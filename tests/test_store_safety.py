"""Nothing stored is ever lost (issue 23): no output path can overwrite a results store, its
WAL/SHM or its artifact folder (resolved: `..`, symlinks); an existing file is replaced only
with --force; files get the user's umask."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batchlab.atomic import atomic_write, check_output, check_output_dir, store_role
from batchlab.errors import BatchlabError
from batchlab.runs.store import RunRecord, Store


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "ex.db"
    with Store(path) as st:
        st.save_run(RunRecord(run_id="run0001", config_hash="hash0001", config={"i": 1}, seed=1,
                              status="completed", epochs=[{"epoch": 0, "loss": 1.0}],
                              final={"test_acc": 0.5}, label="t"))
    (tmp_path / "ex.db.artifacts" / "run0001").mkdir(parents=True)
    return path


def _victims(tmp_path: Path, store: Path) -> list[Path]:
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.csv"
    link.symlink_to(store)
    (tmp_path / "ex.db-wal").write_bytes(b"")
    return [store, tmp_path / "sub" / ".." / "ex.db", link, tmp_path / "ex.db-wal",
            tmp_path / "ex.db-shm", tmp_path / "ex.db.artifacts",
            tmp_path / "ex.db.artifacts" / "run0001" / "x.csv"]


def test_export_never_overwrites_a_store_or_its_side_files(run_main, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    store = _store(tmp_path)
    before = store.read_bytes()
    for victim in _victims(tmp_path, store):
        for force in ([], ["--force"]):
            assert run_main("runs", "export", "--store", store, "-o", victim, *force) == 2, victim
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "results store" in err, err
    assert store.read_bytes() == before
    assert not (tmp_path / "ex.db.artifacts" / "run0001" / "x.csv").exists()


def test_an_existing_file_is_replaced_only_with_force(run_main, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    store = _store(tmp_path)
    victim = tmp_path / "tiny_victim.toml"
    victim.write_text("keep me")
    assert run_main("runs", "export", "--store", store, "-o", victim) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and err.count("\n") == 1
    assert victim.read_text() == "keep me"
    assert run_main("runs", "export", "--store", store, "-o", victim, "--force") == 0
    assert victim.read_text().startswith("run_id")


def test_another_sqlite_file_is_never_an_output(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    with Store(other):
        pass
    assert store_role(other) is not None
    with pytest.raises(BatchlabError, match="SQLite"):
        check_output(other, force=True)
    check_output(tmp_path / "fresh.csv")  # a new name is fine
    assert store_role(tmp_path / "x.db-wal") is None  # a -wal name with no store beside it


def test_output_folders_cannot_land_on_a_store(run_main, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    store = _store(tmp_path)
    with pytest.raises(BatchlabError, match="artifact folder"):
        check_output_dir(tmp_path / "ex.db.artifacts", "--out", ("a",), stores=(store,))
    with pytest.raises(BatchlabError, match="would write"):
        check_output_dir(tmp_path, "--out", ("ex.db",), stores=(store,))
    check_output_dir(tmp_path / "out", "--out", ("batch-size",), stores=(store,))
    code = run_main("experiment", "batch-size", "--store", store, "--out",
                    tmp_path / "ex.db.artifacts")
    assert code == 2 and "artifact folder" in capsys.readouterr().err


def test_written_files_get_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.csv", "x")
        assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "b.csv", "x")
        assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o600
        os.chmod(tmp_path / "a.csv", 0o640)
        atomic_write(tmp_path / "a.csv", "y")  # a replaced file keeps its mode
        assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- an intact store is never called damaged; a damaged one is told what to do ----------------
def test_read_only_folder_and_full_disk_are_named_not_damage(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from batchlab.runs import store_schema
    from batchlab.runs.store import StoreUnavailable

    path = _store(tmp_path)
    monkeypatch.setattr(store_schema, "writable_folder", lambda folder: False)
    with Store(path, readonly=True) as st:  # read without the -shm SQLite cannot create
        assert [r.run_id for r in st.runs()] == ["run0001"] and st.check() == []
    with pytest.raises(StoreUnavailable, match="read-only") as e:
        Store(path)
    assert "damaged" not in str(e.value) and "intact" in str(e.value)
    with Store(path, readonly=True) as st, pytest.raises(StoreUnavailable, match="read-only"), st._guard():
        raise sqlite3.OperationalError("unable to open database file")
    monkeypatch.setattr(store_schema, "low_space", lambda folder: True)
    with Store(path, readonly=True) as st:
        for msg in ("database or disk is full", "disk I/O error"):
            with pytest.raises(StoreUnavailable, match="full") as e, st._guard():
                raise sqlite3.OperationalError(msg)
            assert "damaged" not in str(e.value)


def test_check_on_a_damaged_file_says_what_to_do(run_main, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    path = _store(tmp_path)
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 20)
    assert run_main("runs", "check", "--store", path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err and "backup" in err and "move it away" in err
    assert "runs check" not in err  # never the command that just failed


# -- stores move: artifact paths relative to the artifact folder ------------------------------
def _trained(tmp_path: Path) -> tuple[dict, Path]:
    from conftest import TINY

    from batchlab import train
    from batchlab.config import make_config

    cfg = make_config(**TINY, checkpoint_epochs=[1])
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "a.db"
    train(cfg, store=path)
    return cfg, path


def test_a_store_moved_and_renamed_with_its_folder_works_from_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import sqlite3

    from batchlab import train

    cfg, path = _trained(tmp_path)
    con = sqlite3.connect(path)
    (stored,) = con.execute("SELECT path FROM artifacts").fetchone()
    con.close()
    assert not Path(stored).is_absolute() and "a.db" not in stored
    (tmp_path / "b").mkdir()
    moved = tmp_path / "b" / "other.db"
    shutil.move(path, moved)
    shutil.move(tmp_path / "a" / "a.db.artifacts", tmp_path / "b" / "other.db.artifacts")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with Store(moved, readonly=True) as st:
        assert st.check() == []
    again = train(cfg, store=moved)
    assert again.cached and again.checkpoint(1)


def test_old_stores_with_old_paths_still_read_and_are_adopted(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from batchlab import train

    cfg, path = _trained(tmp_path)
    # a schema-1 store: no row checksums, paths relative to the writer's working directory
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE runs DROP COLUMN checksum")
    con.execute("UPDATE artifacts SET path = 'a.db.artifacts/' || path")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    monkeypatch.chdir(tmp_path)  # not the folder the paths were relative to
    with Store(path, readonly=True) as st:
        assert not st.signed and st.check() == []
    again = train(cfg, store=path)  # adopted: migrated to schema 2, rows signed
    assert again.cached and again.checkpoint(1)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    assert con.execute("SELECT checksum FROM runs").fetchone()[0]
    con.close()
    with Store(path, readonly=True) as st:
        assert st.signed and st.check() == []


# -- damaged results are never served -----------------------------------------------------------
def test_damaged_checkpoints_are_recomputed_not_served(run_main, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    import pickle

    from batchlab import train

    cfg, path = _trained(tmp_path)
    ckpt = next((tmp_path / "a" / "a.db.artifacts").rglob("*.safetensors"))
    good = ckpt.read_bytes()
    for damage in (good[:100] + b"x" + good[101:], pickle.dumps({"w": [1.0]})):
        ckpt.write_bytes(damage)
        with Store(path, readonly=True) as st:
            assert st.check()
        with Store(path) as st:
            res = train(cfg, store=st)
            assert not res.cached and any("recomputing" in w for w, _ in st.warnings)
        with Store(path, readonly=True) as st:
            assert st.check() == []
        assert train(cfg, store=path).cached


def test_edited_rows_nan_weights_and_bad_values_are_flagged(run_main, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    import sqlite3

    import torch
    from safetensors.torch import load_file, save_file

    from batchlab import train
    from batchlab.atomic import sha256_file
    from batchlab.runs.store import RUN_COLUMNS, row_checksum

    cfg, path = _trained(tmp_path)
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET final_json = replace(final_json, 'test_acc', 'test_acc_')")
    con.commit()
    assert run_main("runs", "check", "--store", path) == 2
    out = capsys.readouterr()
    assert "checksum" in out.out and "runs delete --damaged" in out.err
    with Store(path) as st:
        assert st.finished(train(cfg, store=st).key) is not None  # recomputed and replaced
    # a forged checkpoint: NaN weights, sha256 and row checksum updated to match
    ckpt = next((tmp_path / "a" / "a.db.artifacts").rglob("*.safetensors"))
    state = load_file(str(ckpt))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(ckpt))
    con.execute("UPDATE artifacts SET sha256 = ?", (sha256_file(ckpt),))
    row = con.execute(f"SELECT {RUN_COLUMNS} FROM runs").fetchone()
    epochs = con.execute("SELECT epoch, metrics_json FROM epochs ORDER BY epoch").fetchall()
    arts = con.execute("SELECT name, path, sha256 FROM artifacts ORDER BY name").fetchall()
    con.execute("UPDATE runs SET checksum = ?", (row_checksum(row, epochs, arts),))
    con.commit()
    with Store(path, readonly=True) as st:
        assert any("NaN" in p for p in st.check())
        run_id = st.runs()[0].run_id
    assert run_main("runs", "show", run_id, "--store", path, "--json") == 0
    assert "NaN" in capsys.readouterr().err
    con.execute("PRAGMA ignore_check_constraints = ON")
    con.execute("UPDATE runs SET status = 'weird', seed = 'abc'")
    con.commit()
    con.close()
    with Store(path, readonly=True) as st:
        problems = " ".join(st.check())
    assert "status 'weird'" in problems
    assert run_main("runs", "delete", "--damaged", "--store", path, "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["deleted"]) == 1
    with Store(path, readonly=True) as st:
        assert st.count() == 0 and st.check() == []
    assert not train(cfg, store=path).cached


def test_runs_delete_by_key_and_filter(run_main, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    path = _store(tmp_path)
    assert run_main("runs", "delete", "--store", path) == 2
    assert "say what to delete" in capsys.readouterr().err
    assert run_main("runs", "delete", "nope9999", "--store", path) == 2
    assert run_main("runs", "delete", "run0", "--store", path) == 0
    assert "deleted 1" in capsys.readouterr().err
    assert not (tmp_path / "ex.db.artifacts" / "run0001").exists()
    with Store(path, readonly=True) as st:
        assert st.count() == 0


def test_quiet_never_hides_warnings_about_tampered_runs(run_main, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    import sqlite3

    from conftest import TINY

    path = tmp_path / "q.db"
    args = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "32", "--lr", "0.1",
            "--store", path, "--quiet"]
    assert TINY["dataset"] == "digits"
    assert run_main(*args) == 0
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET final_json = '{\"test_acc\": 1.0}'")
    con.commit()
    con.close()
    capsys.readouterr()
    assert run_main(*args) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "checksum" in err and "recomputing" in err


def test_edited_measurements_are_flagged_by_check(tmp_path: Path) -> None:
    import sqlite3

    from batchlab.runs.measurements import Measurements

    path = _store(tmp_path)
    f = tmp_path / "ex.db.artifacts" / "t.npy"
    f.write_bytes(b"tensor")
    with Store(path) as st:
        Measurements(st).put("chunk", {"b": 1}, {"v": 1.0}, files={"t": f})
    con = sqlite3.connect(path)
    assert con.execute("SELECT files_json FROM measurements").fetchone()[0].count("@artifacts/t.npy")
    con.execute("UPDATE measurements SET payload_json = '{\"v\":2.0}'")
    con.commit()
    con.close()
    with Store(path, readonly=True) as st:
        assert any("measurement chunk" in p and "checksum" in p for p in st.check())
