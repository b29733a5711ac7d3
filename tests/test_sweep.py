"""Sweeps: grid expansion and validation, and resuming after a SIGKILL mid-sweep."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchlab.atomic import sha256_file
from batchlab.errors import ConfigError
from batchlab.runs.sweep import expand, load_grid, validate_against_data


def _grid(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_is_the_cartesian_product_in_a_stable_order(tmp_path: Path) -> None:
    path = _grid(tmp_path, """
[base]
dataset = "digits"
hidden = [32]
epochs = 1
lr = 0.5
batch_size = 8
[grid]
seed = [0, 1]
lr = [0.1, 0.01, 0.001]
batch_size = [16, 32]
""")
    base, grid = load_grid(path)
    configs = expand(base, grid)
    assert len(configs) == 2 * 3 * 2
    # grid keys in sorted order (batch_size, lr, seed), values in listed order, last fastest
    got = [(c.batch_size, c.lr, c.seed) for c in configs]
    want = [(b, lr, s) for b in (16, 32) for lr in (0.1, 0.01, 0.001) for s in (0, 1)]
    assert got == want
    # grid values override [base]; the rest of [base] reaches every run
    assert all(c.dataset == "digits" and c.hidden == [32] and c.epochs == 1 for c in configs)
    assert len({c.key() for c in configs}) == len(configs)


def test_duplicate_cells_run_once(tmp_path: Path) -> None:
    configs = expand({"dataset": "digits"}, {"seed": [0, 0, 1]})
    assert [c.seed for c in configs] == [0, 1]


@pytest.mark.parametrize("text, match", [
    ("[base\nepochs = 1", "malformed TOML"),
    ("[grid]\nlr = 0.1\n", "must be a non-empty list"),
    ("[grid]\nlr = []\n", "must be a non-empty list"),
    ("[runs]\nlr = [0.1]\n", "unknown tables"),
])
def test_bad_grid_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_grid(_grid(tmp_path, text))


def test_one_bad_cell_fails_the_whole_grid_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lr"):
        expand({"dataset": "digits"}, {"lr": [0.1, -1.0]})
    ok = expand({"dataset": "digits"}, {"batch_size": [32, 4096]})
    with pytest.raises(ConfigError, match="batch size 4096 is larger"):
        validate_against_data(ok)


@pytest.mark.parametrize("grid", [
    '[base]\ndataset = "digits"\n[grid]\nlr = [0.1, nan]\n',
    '[base]\ndataset = "digits"\n[grid]\nbatch_size = [32, 100000]\n',
    '[base]\ndataset = "no-such-set"\n[grid]\nlr = [0.1]\n',
    '[base]\ndataset = "digits"\n[grid]\noptimizer = ["sgd", "rmsprop"]\n',
    '[base]\ndataset = "digits"\ngrid = 3\n[grid\n',
])
def test_sweep_cli_rejects_bad_grids_writing_nothing(run_main,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, grid: str
) -> None:
    store = tmp_path / "s.db"
    code = run_main("sweep", _grid(tmp_path, grid), "--store", store)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().startswith("error:") and captured.err.strip().count("\n") == 0
    assert not store.exists()


def _count(store: Path) -> int:
    con = sqlite3.connect(store, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        con.close()


def test_sigkill_mid_sweep_then_resume_loses_and_duplicates_nothing(run_main,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # six runs of ~0.4 s each: long enough to kill the sweep between its first and last. Each
    # has its own batch size, so none share a schedule: the executor trains and stores them one
    # by one (runs differing only in seed would be trained in one vectorized pass and stored
    # together, leaving no "between" to kill in)
    grid = _grid(tmp_path, """
[base]
dataset = "digits"
hidden = [256, 256]
epochs = 3
seed = 0
lr = 0.02
checkpoint_epochs = [0, 3]
[grid]
batch_size = [8, 9, 10, 11, 12, 13]
""")
    n_runs = 6
    store = tmp_path / "sweep.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "batchlab", "sweep", str(grid), "--store", str(store),
           "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        # poll with `batchlab runs list` itself: reading while the sweep writes must work
        deadline = time.monotonic() + 120
        listed: list = []
        while not listed:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "sweep stored nothing in 120 s"
            time.sleep(0.02)
            if store.exists():
                assert run_main("runs", "list", "--store", store, "--json") == 0
                listed = json.loads(capsys.readouterr().out)["runs"]
        proc.send_signal(signal.SIGKILL)
        assert all(r["status"] == "completed" for r in listed)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = _count(store)
    assert 0 < before < n_runs, "the sweep was not interrupted mid-way; make the runs longer"
    con = sqlite3.connect(store)
    survivors = dict(con.execute("SELECT run_id, created_at FROM runs").fetchall())
    con.close()

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["runs"]
    assert len(rows) == n_runs
    assert {r["run_id"] for r in rows if r["cached"]} == set(survivors)

    con = sqlite3.connect(store)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = con.execute("SELECT run_id, config_hash, status, created_at FROM runs").fetchall()
        assert len(runs) == n_runs and len({r[1] for r in runs}) == n_runs
        assert {r[2] for r in runs} == {"completed"}
        for run_id, _, _, created in runs:  # finished runs were not recomputed
            if run_id in survivors:
                assert created == survivors[run_id]
        per_run = dict(con.execute("SELECT run_id, COUNT(*) FROM epochs GROUP BY run_id"))
        assert per_run == {r[0]: 4 for r in runs}  # epochs 0..3, no orphans, no duplicates
        arts = con.execute("SELECT run_id, name, path, sha256 FROM artifacts").fetchall()
        assert len(arts) == 2 * n_runs
        for _, _, path, sha in arts:  # relative to the artifact folder (stores move with it)
            assert sha256_file(store.with_name(store.name + ".artifacts") / path) == sha
    finally:
        con.close()


@pytest.mark.parametrize("content, needle", [
    (b"grid = 5\n", "'grid' must be a table"),
    (b"# nothing\n", "defines no runs"),
    (b"base = [1, 2]\n", "'base' must be a table"),
    (b"[base]\nlr = 0.1\n\xff\xfe\n", "not UTF-8"),
    (b"[grid]\nlr = [0.1, 0.2]\nseed = [0, 1, 2]\nbatch_size = "
     + str(list(range(1, 20000))).encode() + b"\nepochs = " + str(list(range(10))).encode() + b"\n",
     "at most 100000"),
])
def test_hostile_sweep_files_are_one_line_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "g.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle) as e:
        load_grid(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_folder_given_as_the_sweep_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_grid(tmp_path)
