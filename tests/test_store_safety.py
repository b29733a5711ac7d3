"""Nothing stored is ever lost (issue 23): no output path can overwrite a results store, its
WAL/SHM or its artifact folder (resolved: `..`, symlinks); an existing file is replaced only
with --force; files get the user's umask."""

from __future__ import annotations

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
