"""SIGKILL during a checkpoint save, then resume: nothing half-written or unclaimed stays in
the artifacts folder, and every stored checkpoint matches its recorded sha256. Real processes,
real signals."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from batchlab.atomic import sha256_file

CFG = 'dataset = "digits"\nhidden = [32]\nepochs = 2\nbatch_size = 32\nlr = 0.1\ncheckpoint_epochs = [0, 2]\n'

# Trains with the store, but hangs (to be killed) at a chosen point of saving its results:
# "file" = halfway through writing the second checkpoint, "row" = after every checkpoint file is
# written and before the run's row is stored.
CHILD = r"""
import sys, time
import batchlab.nn.checkpoint as ck
from batchlab import train
from batchlab.config import make_config
from batchlab.runs.store import Store

where, store, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_save, calls = ck.save_file, []

def hang():
    print("HANGING", flush=True)
    time.sleep(120)

def half_save(tensors, filename, metadata=None):
    calls.append(filename)
    real_save(tensors, filename, metadata=metadata)
    if len(calls) == 2:
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        hang()

if where == "file":
    ck.save_file = half_save
else:
    Store.save_run = lambda self, rec: hang()
train(make_config(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1,
                  checkpoint_epochs=[0, 2], seed=seed), store=store)
"""


def _kill_at(where: str, store: Path, seed: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, where, str(store), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HANGING", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_sigkill_during_checkpoint_save_then_resume_leaves_no_orphans(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    art = tmp_path / "s.db.artifacts"
    _kill_at("file", store, seed=0)  # killed while writing epoch 2's checkpoint
    half = [p for p in _files(art) if p.name.endswith(".tmp")]
    assert len(half) == 1 and str(half[0].name).startswith(".epoch0002.safetensors.")
    _kill_at("row", store, seed=1)   # killed after its files, before its row
    assert not half[0].exists()  # the second run's store opening removed the dead writer's file
    run_dirs = {p.parent for p in _files(art) if not p.name.endswith(".tmp")}
    assert len(run_dirs) == 2
    old = time.time() - 3600  # the seed-1 run is never resumed: its folder ages
    for d in run_dirs:
        for p in (d, *d.iterdir()):
            os.utime(p, (old, old))

    cfg = tmp_path / "c.toml"
    cfg.write_text(CFG)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "batchlab", "train", "--config", str(cfg),
                           "--store", str(store), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]

    con = sqlite3.connect(store)
    arts = con.execute("SELECT run_id, path, sha256 FROM artifacts").fetchall()
    runs = [r for (r,) in con.execute("SELECT run_id FROM runs")]
    con.close()
    assert runs == [run_id] and len(arts) == 2
    # every file in the artifacts folder is a stored checkpoint with its recorded bytes
    # stored paths are relative to the artifact folder (the store can move with it)
    assert {p.resolve() for p in _files(art)} == {(art / p).resolve() for _, p, _ in arts}
    for _, p, sha in arts:
        assert sha256_file(art / p) == sha
    assert {p.parent.name for p in _files(art)} == {run_id}
