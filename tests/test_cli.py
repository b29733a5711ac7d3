"""The command line: --json output, one-line errors with exit code 2 that write nothing, the
runs commands and exports. Two tests go through a real subprocess (the honest check of exit
codes and stdout/stderr); the rest call the same entry point, `batchlab.cli.main`, in-process
to keep the suite fast."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from batchlab.data import sources

TINY_ARGS = ["--dataset", "digits", "--epochs", "2", "--batch-size", "32", "--lr", "0.1"]
EPOCH_KEYS = {"epoch", "train_acc", "test_acc", "train_loss", "test_loss", "steps", "seconds",
              "eval_seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _dump(store: Path) -> list[tuple]:
    con = sqlite3.connect(store)
    try:
        return [row for t in ("runs", "epochs", "artifacts")
                for row in con.execute(f"SELECT * FROM {t} ORDER BY 1, 2")]
    finally:
        con.close()


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one tiny run (trained through the subprocess --json test's sibling)."""
    from batchlab import train
    from batchlab.config import make_config

    path = tmp_path_factory.mktemp("cli") / "filled.db"
    train(make_config(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1),
          store=path, label="one")
    return path


def test_train_json_prints_exactly_one_object(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    proc = subprocess.run(
        [sys.executable, "-m", "batchlab", "train", *TINY_ARGS, "--store", str(store),
         "--json"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert {"run_id", "status", "config", "epochs", "final"} <= set(doc)
    assert doc["status"] == "completed" and doc["config"]["batch_size"] == 32
    assert [e["epoch"] for e in doc["epochs"]] == [0, 1, 2]
    for e in doc["epochs"]:
        assert set(e) >= EPOCH_KEYS, EPOCH_KEYS - set(e)
        assert e["seconds"] >= 0 and e["eval_seconds"] > 0
    assert doc["final"]["test_acc"] == doc["epochs"][-1]["test_acc"]
    con = sqlite3.connect(store)
    assert con.execute("SELECT run_id FROM runs").fetchall() == [(doc["run_id"],)]
    con.close()


def test_bad_input_in_a_real_process_exit_2_one_line_store_untouched(
    filled_store: Path
) -> None:
    before = _dump(filled_store)
    proc = subprocess.run(
        [sys.executable, "-m", "batchlab", "train", "--dataset", "digits",
         "--batch-size", "100000", "--store", str(filled_store)],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "100000" in err
    assert _dump(filled_store) == before


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "-5"], "batch_size"),
    (["--batch-size", "5000"], "larger than"),
    (["--lr", "0"], "lr"),
    (["--lr", "-0.1"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--dataset", "cifar-10"], "cifar-10"),
    (["--optimizer", "rmsprop"], "optimizer"),
    (["--batch-size", "many"], "batch-size"),
    (["--no-such-flag"], "no-such-flag"),
])
def test_bad_train_input_exit_2_one_line_nothing_written(run_main,
    tmp_path: Path, filled_store: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, args: list[str], needle: str
) -> None:
    base = ["train", "--dataset", "digits", "--epochs", "1"]
    before = _dump(filled_store)
    for store in (filled_store, tmp_path / "fresh.db"):
        code = run_main(*base, *args, "--store", store)
        out = capsys.readouterr()
        assert code == 2
        err = out.err.strip()
        assert err.count("\n") == 0 and needle in err, err
        assert out.out == ""
    assert _dump(filled_store) == before
    assert not (tmp_path / "fresh.db").exists()


def test_malformed_config_toml(run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("batch_size = [\n")
    code = run_main("train", "--config", bad, "--store", tmp_path / "s.db")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(bad) in err
    assert not (tmp_path / "s.db").exists()


def test_config_file_fields_and_explicit_flags(run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "digits"\nhidden = [16]\nepochs = 1\nbatch_size = 64\n')
    code = run_main("train", "--config", cfg, "--batch-size", "128",
                 "--store", tmp_path / "s.db", "--json")
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["config"]["hidden"] == [16] and doc["config"]["batch_size"] == 128


def test_missing_data_offline_exit_2_says_how_to_fix(run_main,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    store = tmp_path / "s.db"
    code = run_main("train", "--dataset", "mnist", "--data-dir", tmp_path / "empty",
                 "--store", store)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing IDX files" in err and err.count("\n") == 0
    # no data dir, nothing cached, no reachable mirror
    monkeypatch.setenv("BATCHLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr("batchlab.data._CACHE", {})
    offline = replace(sources.MNIST, mirrors=((tmp_path / "offline").as_uri() + "/",),
                      system_dirs=())
    monkeypatch.setitem(sources.REMOTE, "mnist", offline)
    code = run_main("train", "--dataset", "mnist", "--store", store)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data-dir" in err and err.count("\n") == 0
    assert not store.exists()


def test_runs_list_show_export(run_main, tmp_path: Path, filled_store: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    assert run_main("runs", "list", "--store", filled_store, "--json") == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert len(rows) == 1 and rows[0]["label"] == "one" and rows[0]["dataset"] == "digits"
    run_id = rows[0]["run_id"]

    assert run_main("runs", "list", "--store", filled_store) == 0
    assert run_id in capsys.readouterr().out

    assert run_main("runs", "show", run_id[:6], "--store", filled_store, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run_id"] == run_id and len(shown["epochs"]) == 3

    assert run_main("runs", "show", "zzzzzz", "--store", filled_store) == 2
    assert "no run" in capsys.readouterr().err
    assert run_main("runs", "list", "--store", tmp_path / "none.db") == 2
    capsys.readouterr()

    out = tmp_path / "runs.csv"
    assert run_main("runs", "export", "--store", filled_store, "-o", out) == 0
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [0, 1, 2]
    assert {r["run_id"] for r in table} == {run_id} and table[0]["cfg_dataset"] == "digits"
    assert float(table[2]["test_acc"]) == pytest.approx(shown["epochs"][2]["test_acc"])

    assert run_main("runs", "export", "--store", filled_store, "--format", "xls") == 2


def test_runs_export_parquet(run_main, tmp_path: Path, filled_store: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "runs.parquet"
    code = run_main("runs", "export", "--store", filled_store, "--format", "parquet",
                 "-o", out)
    assert code == 0
    table = pq.read_table(out).to_pylist()
    assert [r["epoch"] for r in table] == [0, 1, 2]
    assert table[0]["cfg_hidden"] == "[32]" and isinstance(table[2]["test_acc"], float)


@pytest.mark.parametrize("command, words", [
    ("train", ["--batch-size", "--lr", "--data-dir", "--store", "--json"]),
    ("sweep", ["'base' table", "'grid' table", "--store"]),
])
def test_help_reads_well(run_main, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                         command: str, words: list[str]) -> None:
    assert run_main(command, "--help") == 0
    raw = capsys.readouterr().out
    assert "with  and" not in raw  # rich markup once swallowed "[base]" and "[grid]"
    text = " ".join(raw.replace("│", " ").split())  # undo rich's wrapping
    for w in words:
        assert w in text, w


# -- the error boundary, paths, choices, --version ----------------------------------------------
def test_version_in_a_real_process_and_in_process(run_main, capsys: pytest.CaptureFixture) -> None:
    import batchlab

    proc = subprocess.run([sys.executable, "-m", "batchlab", "--version"], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"batchlab {batchlab.__version__}"
    assert run_main("--version") == 0
    assert batchlab.__version__ in capsys.readouterr().out


def test_a_bug_is_one_line_naming_a_log_with_the_traceback(
        run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("BATCHLAB_LOG_DIR", str(tmp_path / "logs"))

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("boom [base] batchlab[ray]")

    monkeypatch.setattr("batchlab.data.load_dataset", broken)
    assert run_main("data", "digits") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: boom [base] batchlab[ray]" in err
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback" in text and "boom" in text and "data digits" in text


def test_messages_keep_their_brackets(run_main, tmp_path: Path, filled_store: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    assert run_main("train", "--config", tmp_path / "[base].toml") == 2
    assert "[base].toml not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed
    assert run_main("runs", "export", "--store", filled_store, "--format", "parquet",
                    "-o", tmp_path / "x.parquet") == 2
    assert "pip install 'batchlab[parquet]'" in capsys.readouterr().err


def test_runs_show_does_not_treat_underscores_as_wildcards(run_main, filled_store: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    for pattern in ("____", "%%%%", "____________"):
        assert run_main("runs", "show", pattern, "--store", filled_store) == 2
        assert "no run" in capsys.readouterr().err


def test_runs_check_and_listing_past_a_damaged_row(run_main, tmp_path: Path, filled_store: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    import shutil

    assert run_main("runs", "check", "--store", filled_store) == 0
    assert "no problems" in capsys.readouterr().out
    store = tmp_path / "damaged.db"
    shutil.copy(filled_store, store)
    con = sqlite3.connect(store)
    con.execute("UPDATE runs SET final_json = 'NaN garbage'")
    con.commit()
    con.close()
    before = store.read_bytes()
    assert run_main("runs", "list", "--store", store, "--json") == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["runs"] == [] and "warning: skipped damaged run" in out.err
    assert run_main("runs", "check", "--store", store) == 2
    out = capsys.readouterr()
    assert "final_json" in out.out and out.err.count("\n") == 1 and "1 problem" in out.err
    assert store.read_bytes() == before


def test_output_paths_are_checked_before_any_work(run_main, tmp_path: Path, filled_store: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    deep = tmp_path / "new" / "folder" / "runs.csv"
    assert run_main("runs", "export", "--store", filled_store, "-o", deep) == 0
    assert deep.read_text().startswith("run_id")
    assert run_main("runs", "export", "--store", filled_store, "-o", tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert run_main("runs", "export", "--store", filled_store, "-o", a_file / "x.csv") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert run_main("train", *TINY_ARGS, "--store", a_file / "s.db") == 2
    err = capsys.readouterr().err
    assert "--store" in err and "is a file" in err and err.count("\n") == 1
    assert a_file.read_text() == "x"


def test_read_only_paths_fail_before_the_run(run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(str(ro)) else real(p, m, **k))
    trained: list[int] = []
    monkeypatch.setattr("batchlab.runs.training.train", lambda *a, **k: trained.append(1))
    assert run_main("train", *TINY_ARGS, "--store", ro / "s.db") == 2
    assert "read-only" in capsys.readouterr().err and not trained
    assert run_main("runs", "export", "--store", tmp_path / "none.db", "-o", ro / "x.csv") == 2
    assert "read-only" in capsys.readouterr().err


def test_enumerated_options_are_choices_in_help_and_match_the_library(
        run_main, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import typing

    monkeypatch.setenv("COLUMNS", "250")
    from batchlab.cli import options as root
    from batchlab.config import INITS, optimizer_names
    from batchlab.data import DATASETS

    assert typing.get_args(root.Dataset) == DATASETS
    assert typing.get_args(root.Optimizer) == optimizer_names()
    assert typing.get_args(root.Init) == INITS
    def squeezed() -> str:  # rich wraps long choice lists inside its box
        return "".join(capsys.readouterr().out.replace("│", "").split())

    assert run_main("train", "--help") == 0
    text = squeezed()
    assert "sgd|adam|adamw|lars|cblr|mclr" in text and "glorot|torch|kaiming" in text
    assert "mnist|fashion-mnist|cifar10|mnist-5k|digits" in text
    assert run_main("sweep", "--help") == 0
    assert "local|ray" in squeezed()
    assert run_main("runs", "export", "--help") == 0
    assert "csv|parquet" in squeezed()
    assert run_main("train", "--optimizer", "rmsprop") == 2
    assert "rmsprop" in capsys.readouterr().err


def test_every_option_of_these_commands_has_help() -> None:
    import typer

    from batchlab.cli import app

    group = typer.main.get_command(app)
    mine = {"train", "sweep", "data", "schedule-preset", "runs"}
    missing = []
    for name, cmd in group.commands.items():
        if name not in mine:
            continue
        subs = cmd.commands.items() if hasattr(cmd, "commands") else [(name, cmd)]
        for sub, c in subs:
            missing += [f"{name} {sub} {p.name}" for p in c.params
                        if getattr(p, "help", "x") is not None and not getattr(p, "help", "x")]
    assert not missing, missing
