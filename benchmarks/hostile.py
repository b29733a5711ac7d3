"""Hostile-input sweep of the CLI: real `python -m batchlab` subprocesses fed bad values for every
option of train / sweep / runs / data / schedule-preset, damaged and foreign stores, damaged IDX
files, bad TOML and numeric extremes.

    python benchmarks/hostile.py [--workers 4] [--verbose]

Each case says whether its input is nonsense (must be refused) or valid (may work). Outcomes:
- clean: exit 0, or exit 2 with exactly one line on stderr (and a store left unchanged);
- traceback: a Python traceback, or exit 1 (an internal error: a bug, even with its log);
- silent: exit 0 on nonsense input (accepted without a word);
- other: anything else (a multi-line error, a changed store, a timeout, a valid case refused).
Prints the table "cases tried / clean / traceback / silent / other" and lists every case that is
not clean. Valid training cases use `--epochs 0` or 1 on tiny models, so the sweep takes minutes.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ERR, OK, ANY = "error", "ok", "any"


@dataclass
class Case:
    group: str
    args: list[str]
    expect: str  # ERR: must be refused; OK: must work; ANY: either, but cleanly
    store: Path | None = None  # a store that must be byte-identical after a refusal


def _store_dump(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _idx(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    dt = np.dtype(arr.dtype).newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    head = bytes([0, 0, codes[np.dtype(dt)], arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + np.ascontiguousarray(arr, dtype=dt).tobytes()


FILES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
         "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}


def _idx_dir(d: Path, **override: bytes) -> Path:
    """Four small valid IDX files, with some replaced by the given raw (uncompressed) bytes."""
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
              "train_y": rng.integers(0, 10, 60, dtype=np.uint8),
              "test_x": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "test_y": rng.integers(0, 10, 20, dtype=np.uint8)}
    for key, name in FILES.items():
        raw = override.get(key, _idx(arrays[key]))
        _write(d / name, gzip.compress(raw))
    return d


def _sqlite(path: Path, sql: str) -> Path:
    con = sqlite3.connect(path)
    con.executescript(sql)
    con.commit()
    con.close()
    return path


def build(work: Path, py: list[str]) -> list[Case]:
    """Create the hostile files under `work` and return the cases."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    filled = work / "filled.db"
    small = _write(work / "small.toml", 'dataset = "digits"\nhidden = [8]\nepochs = 1\n')
    subprocess.run([*py, "train", "--config", str(small), "--store", str(filled), "--quiet"],
                   check=True, env=env, capture_output=True)
    con = sqlite3.connect(filled)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    stores = {
        "foreign": _sqlite(work / "foreign.db", "CREATE TABLE t (x); INSERT INTO t VALUES (1);"),
        "other-runs": _sqlite(work / "other-runs.db", "CREATE TABLE runs (id, name);"),
        "other-app": _sqlite(work / "other-app.db", "PRAGMA application_id = 7; CREATE TABLE t (x);"),
        "garbage": _write(work / "garbage.db", bytes(range(256)) * 16),
        "text": _write(work / "text.db", "hello, I am not a database\n"),
    }
    mid = work / "middle.db"
    data = bytearray(filled.read_bytes())
    data[4096:] = b"\xa5" * (len(data) - 4096)
    stores["middle-damaged"] = _write(mid, bytes(data))
    newer = work / "newer.db"
    shutil.copy(filled, newer)
    _sqlite(newer, "PRAGMA user_version = 99;")
    stores["newer"] = newer
    badrow = work / "badrow.db"
    shutil.copy(filled, badrow)
    _sqlite(badrow, "UPDATE runs SET config_json = '{broken', final_json = 'NaN';")
    afile = _write(work / "afile", "x")
    adir = work / "adir"
    adir.mkdir()

    cases: list[Case] = []

    def train(args: list[str], expect: str = ERR, store: Path | None = None) -> None:
        st = store or work / "t.db"
        cases.append(Case("train", ["train", "--config", str(small), "--epochs", "0", *args,
                                    "--store", str(st), "--quiet"], expect, st if store else None))

    for opt, values in {
        "--lr": ["0", "-1", "nan", "inf", "-inf", "1e308", "abc", "", "1e-400"],
        "--batch-size": ["0", "-5", "1e3", str(10**30), "99999", "abc", "2.5"],
        "--epochs": ["-1", "1e20", str(10**20), "100001", "abc", "2.5"],
        "--momentum": ["-0.1", "1", "1.5", "nan", "inf"],
        "--weight-decay": ["-1", "inf", "nan", "1e9"],
        # 2**63 - 1: seeds derived from it (seed * 1_000_003 + 7919) would overflow int64
        "--seed": ["-1", str(2**63 - 1), str(2**64), str(10**30), "1.5", "abc"],
        "--optimizer": ["rmsprop", "", "SGD", "[base]"],
        "--init": ["xavier", ""],
        "--device": ["gpu", "cuda:99", "cpu;rm", "", "cuda:-1"],
        "--dataset": ["cifar", "", "../etc", "batchlab[ray]"],
    }.items():
        for v in values:
            train([opt, v], ERR, filled)
    for v in ["0.05", "1e-5"]:
        train(["--lr", v], OK)
    from batchlab.config import MAX_SEED

    train(["--seed", str(MAX_SEED)], OK)  # the largest seed whose derived seeds fit in int64
    train(["--no-such-flag"], ERR, filled)
    # data folders
    train(["--dataset", "mnist", "--data-dir", str(work / "missing")])
    train(["--dataset", "mnist", "--data-dir", str(afile)])
    train(["--dataset", "mnist", "--data-dir", str(adir)])
    # stores
    for path in stores.values():
        train([], ERR, path)
    train([], ERR, adir)
    train([], ERR, afile / "s.db")
    train([], OK, Path(shutil.copy(badrow, work / "badrow2.db")))  # another run's damaged row: no obstacle
    _write(work / "empty.db", b"")
    train([], OK, work / "empty.db")
    # config files
    configs = {
        "missing": None, "dir": adir,
        "non-utf8": b'lr = 0.1\n\xff\xfe\n', "malformed": "lr = [\n", "unknown-key": "colour = 1\n",
        "wrong-type": 'lr = "fast"\n', "list-lr": "lr = [0.1]\n", "int-overflow": f"seed = {2**64}\n",
        "warmup-inf": "warmup_epochs = inf\n", "decay-inf": 'decay = "step"\ndecay_epochs = [1]\ndecay_factor = inf\n',
        "target-nan": 'target_metric = "test_acc"\ntarget_value = nan\n',
        "ckpt-range": "epochs = 2\ncheckpoint_epochs = [-5, 99]\n",
        "ghost": "batchnorm = true\nbatch_size = 64\nghost_batch_size = 24\n",
        "hidden-0": "hidden = [0]\n", "hidden-huge": "hidden = [1099511627776]\n",
        "mult-0": "lr_multipliers = {0 = 1.0}\n", "schedule-0": "schedule = [{epochs = 0}]\n",
        "schedule-huge": "schedule = [{epochs = 99999}, {epochs = 99999}]\n",
        "betas": "betas = [0.9, 2.0]\n", "val-1": "val_fraction = 1.0\n", "max-train-0": "max_train = 0\n",
        "probes": 'probes = ["nonexistent"]\n', "table-top": "[base]\nlr = 0.1\n",
        "bom": "\ufefflr = 0.1\n".encode("utf-8-sig"),
    }
    for name, content in configs.items():
        path = work / "cfg" / f"{name}.toml"
        if content is None:
            pass
        elif isinstance(content, Path):
            path = content
        else:
            _write(path, content)
        cases.append(Case("train", ["train", "--config", str(path), "--dataset", "digits", "--epochs", "0",
                                    "--store", str(filled), "--quiet"], ERR, filled))
    # sweeps
    small_base = '[base]\ndataset = "digits"\nhidden = [8]\nepochs = 0\n'
    sweeps = {
        "grid-int": small_base + "grid = 5\n", "base-list": "base = [1, 2]\n", "empty": "",
        "comment": "# nothing\n", "non-utf8": b"[grid]\n\xff = [1]\n", "unknown-table": "[runs]\nlr = [0.1]\n",
        "grid-scalar": small_base + "[grid]\nlr = 0.1\n", "grid-empty": small_base + "[grid]\nlr = []\n",
        "grid-bad-value": small_base + "[grid]\nlr = [0.1, -1]\n",
        "grid-bad-key": small_base + "[grid]\ncolour = [1]\n",
        "grid-huge": small_base + "[grid]\nseed = [" + ", ".join(map(str, range(1000))) + "]\nlr = ["
                     + ", ".join(f"0.{i + 1}" for i in range(200)) + "]\n",
        "base-bad": '[base]\ndataset = "digits"\nepochs = -1\n', "batch-too-big": small_base + "batch_size = 100000\n",
        "malformed": "[grid\n",
    }
    for name, content in sweeps.items():
        path = _write(work / "sweep" / f"{name}.toml", content)
        cases.append(Case("sweep", ["sweep", str(path), "--store", str(filled), "--quiet"], ERR, filled))
    ok_sweep = _write(work / "sweep" / "ok.toml", small_base + "[grid]\nlr = [0.05, 0.1]\n")
    cases.append(Case("sweep", ["sweep", str(ok_sweep), "--store", str(work / "sw.db"), "--quiet"], OK))
    for args in (["sweep", str(work / "missing.toml")], ["sweep", str(adir)],
                 ["sweep", str(ok_sweep), "--executor", "dask"], ["sweep", str(ok_sweep), "--store", str(adir)],
                 ["sweep", str(ok_sweep), "--store", str(afile / "x.db")],
                 ["sweep", str(ok_sweep), "--store", str(stores["foreign"])]):
        cases.append(Case("sweep", args, ERR))
    # runs
    for path in [*stores.values(), adir, work / "nope.db", afile]:
        for sub in (["list"], ["show", "abcd"], ["export", "-o", str(work / "x.csv")], ["check"]):
            cases.append(Case("runs", ["runs", *sub, "--store", str(path)], ERR, path if path.is_file() else None))
    for sub, expect in ((["list"], OK), (["export", "-o", str(work / "b.csv")], OK), (["check"], ERR)):
        cases.append(Case("runs", ["runs", *sub, "--store", str(badrow)], expect, badrow))
    for rid in ("____", "%%%%", "%", "", "a" * 10000, "'; DROP TABLE runs; --", "[base]"):
        cases.append(Case("runs", ["runs", "show", rid, "--store", str(filled)], ERR, filled))
    for args, expect in (
        (["export", "--format", "xls"], ERR), (["export", "-o", str(adir)], ERR),
        (["export", "-o", str(afile / "x.csv")], ERR), (["export", "-o", str(work / "new" / "dir" / "x.csv")], OK),
        (["export", "--format", "parquet", "-o", str(work / "x.parquet")], OK), (["list", "--label", "[base]"], OK),
        (["check"], OK), (["list", "--json"], OK), (["show", "--json"], ERR),
    ):
        cases.append(Case("runs", ["runs", *args, "--store", str(filled)], expect, filled))
    # data
    bomb = work / "bomb"
    _idx_dir(bomb)
    with gzip.open(bomb / FILES["train_x"], "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (4_000_000, 28, 28)))
        f.write(bytes(1 << 20))
    idx_dirs = {
        "float-pixels": {"train_x": _idx(np.full((60, 28, 28), np.nan, dtype=np.float32))},
        "big-floats": {"train_x": _idx(np.full((60, 28, 28), 1e30))},
        "neg-labels": {"train_y": _idx(np.full(60, -1, dtype=np.int8))},
        "label-10": {"train_y": _idx(np.full(60, 10, dtype=np.uint8))},
        "zero-images": {"train_x": _idx(np.zeros((0, 28, 28), dtype=np.uint8)),
                        "train_y": _idx(np.zeros(0, dtype=np.uint8))},
        "truncated": {"test_x": _idx(np.zeros((20, 28, 28), dtype=np.uint8))[:-100]},
        "trailing": {"test_y": _idx(np.zeros(20, dtype=np.uint8)) + b"xx"},
        "bad-magic": {"train_x": b"\x01\x02" + _idx(np.zeros((60, 28, 28), dtype=np.uint8))[2:]},
        "count-mismatch": {"train_y": _idx(np.zeros(59, dtype=np.uint8))},
        "dims-5": {"train_x": bytes([0, 0, 8, 5]) + bytes(20)},
        "float-labels": {"test_y": _idx(np.full(20, 0.5, dtype=np.float32))},
        "shape-differs": {"test_x": _idx(np.zeros((20, 27, 28), dtype=np.uint8))},
    }
    for name, override in idx_dirs.items():
        d = _idx_dir(work / "idx" / name, **override)
        cases.append(Case("data", ["data", "mnist", "--data-dir", str(d)], ERR))
    not_gz = _idx_dir(work / "idx" / "not-gzip")
    _write(not_gz / FILES["test_y"], b"not gzip at all")
    for d in (bomb, not_gz, work / "missing", afile, adir):
        cases.append(Case("data", ["data", "mnist", "--data-dir", str(d)], ERR))
    for name in ("cifar", "", "MNIST", "../../etc/passwd"):
        cases.append(Case("data", ["data", name], ERR))
    cases.append(Case("data", ["data", "mnist", "--data-dir", str(_idx_dir(work / "idx" / "good"))], OK))
    cases.append(Case("data", ["data", "digits"], OK))
    # schedule-preset
    step = _write(work / "step.toml", 'decay = "step"\ndecay_epochs = [10, 20]\nepochs = 30\n')
    for args in (["nosuch"], [""], ["goyal"], ["hoffer"], ["smith"], ["goyal", "--batch-size", "0"],
                 ["goyal", "--batch-size", "-1"], ["goyal", "--batch-size", "abc"],
                 ["goyal", "--batch-size", "256", "--warmup-epochs", "nan"],
                 ["goyal", "--batch-size", "256", "--warmup-epochs", "inf"],
                 ["goyal", "--batch-size", "256", "--warmup-epochs", "-1"],
                 ["goyal", "--batch-size", "256", "--base-batch", "0"],
                 ["goyal", "--batch-size", "256", "--table", "a b"],
                 ["goyal", "--batch-size", "256", "--table", "[x]"],
                 ["goyal", "--batch-size", "256", "--config", str(adir)],
                 ["goyal", "--batch-size", "256", "--config", str(work / "cfg" / "non-utf8.toml")],
                 ["goyal", "--batch-size", "256", "--config", str(work / "cfg" / "wrong-type.toml")],
                 ["goyal", "--batch-size", "256", "--config", str(work / "cfg" / "malformed.toml")],
                 ["goyal", "--batch-size", "256", "--config", str(_write(work / "p-epochs.toml", 'epochs = "x"\n'))],
                 ["smith", "--config", str(step), "--max-batch", "-5"],
                 ["hoffer", "--batch-size", "256", "--config",
                  str(_write(work / "p-de.toml", 'decay_epochs = ["a"]\n'))]):
        cases.append(Case("schedule-preset", ["schedule-preset", *args], ERR))
    for args in (["goyal", "--batch-size", "256"], ["smith", "--config", str(step)],
                 ["hoffer", "--batch-size", "512", "--table", "base"]):
        cases.append(Case("schedule-preset", ["schedule-preset", *args], OK))
    # --set values that would be misread (true as 1 epoch; a repeated key silently winning)
    for sets in (["epochs=true"], ["batch_sizes=[64,false]"], ["epochs=2", "epochs=3"]):
        args = [a for kv in sets for a in ("--set", kv)]
        cases.append(Case("experiment", ["experiment", "batch-size", *args, "--store",
                                         str(work / "set.db"), "--out", str(work / "set-out")],
                          ERR))
    # top level
    for args, expect in (([], ANY), (["--version"], OK), (["--help"], OK), (["nosuch"], ERR),
                         (["train", "--help"], OK), (["runs"], ANY), (["--bogus"], ERR)):
        cases.append(Case("top", args, expect))
    return cases


def run_case(case: Case, py: list[str], env: dict[str, str], timeout: float) -> tuple[str, str]:
    before = _store_dump(case.store) if case.store else None
    try:
        p = subprocess.run([*py, *case.args], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "other", "timeout"
    err_lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    detail = f"rc={p.returncode} {err_lines[-1][:160] if err_lines else ''}"
    if "Traceback" in p.stderr or p.returncode == 1:
        return "traceback", detail
    if case.expect == ERR and p.returncode == 0:
        return "silent", detail
    if p.returncode not in (0, 2) or (case.expect == OK and p.returncode != 0):
        return "other", detail
    if p.returncode == 2:
        if len(err_lines) != 1:
            return "other", f"{len(err_lines)} lines on stderr: " + detail
        if case.store and _store_dump(case.store) != before:
            return "other", "store changed: " + detail
    return "clean", detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--verbose", action="store_true", help="print every case")
    a = ap.parse_args()
    py = [sys.executable, "-m", "batchlab"]
    with tempfile.TemporaryDirectory(prefix="batchlab-hostile-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BATCHLAB_LOG_DIR": str(work / "logs"),
               "BATCHLAB_DATA": str(work / "cache"), "COLUMNS": "200"}
        cases = build(work, py)
        with ThreadPoolExecutor(a.workers) as pool:
            results = list(pool.map(lambda c: run_case(c, py, env, a.timeout), cases))
    counts = {k: 0 for k in ("clean", "traceback", "silent", "other")}
    by_group: dict[str, dict[str, int]] = {}
    for case, (outcome, detail) in zip(cases, results):
        counts[outcome] += 1
        g = by_group.setdefault(case.group, {k: 0 for k in counts})
        g[outcome] += 1
        if a.verbose or outcome != "clean":
            print(f"{outcome:9s} {case.group:15s} {' '.join(case.args)[:140]!s}\n          -> {detail}")
    print()
    print(f"{'group':16s} {'tried':>6s} {'clean':>6s} {'traceback':>10s} {'silent':>7s} {'other':>6s}")
    for g, c in [*by_group.items(), ("ALL", counts)]:
        print(f"{g:16s} {sum(c.values()):6d} {c['clean']:6d} {c['traceback']:10d} {c['silent']:7d} {c['other']:6d}")


if __name__ == "__main__":
    main()
