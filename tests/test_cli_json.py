"""One --json contract (issue 23): every command prints exactly one JSON object on stdout,
success or failure (lists inside an object), however loudly the user's own model and data
functions print: their prints go to stderr while the command runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

LOUD = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        print("forward says hello")
        return self.fc(x)

def make():
    print("building the model")
    return Net()

def load():
    print("loading the data")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
"""


@pytest.fixture
def loud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "loud_user_module"
    (tmp_path / f"{name}.py").write_text(LOUD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _one_object(text: str) -> dict:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text[:500]
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


def test_every_command_prints_one_object_even_when_user_code_prints(
        run_main, loud: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "s.db"
    user = ["--model", f"{loud}:make", "--data", f"{loud}:load"]
    assert run_main("train", *user, "--epochs", "1", "--batch-size", "32", "--lr", "0.1",
                    "--store", store, "--json") == 0
    out = capsys.readouterr()
    run = _one_object(out.out)
    assert run["status"] == "completed" and "forward says hello" in out.err
    grid = tmp_path / "g.toml"
    grid.write_text(f'[base]\nmodel = "{loud}:make"\ndata = "{loud}:load"\nepochs = 1\n'
                    f'lr = 0.1\n[grid]\nbatch_size = [16, 32]\n')
    ok = [
        ("sweep", grid, "--store", store),
        ("runs", "list", "--store", store),
        ("runs", "show", run["run_id"], "--store", store),
        ("runs", "check", "--store", store),
        ("experiment", "list"),
        ("experiment", "options", "batch-size"),
        ("experiment", "batch-size", *user, "--plan", "--set", "epochs=1",
         "--set", "batch_sizes=[16,32]", "--store", store, "--out", tmp_path / "out"),
    ]
    for args in ok:
        assert run_main(*args, "--json") == 0, (args, capsys.readouterr().err)
        doc = _one_object(capsys.readouterr().out)
        assert "code" not in doc, args
    assert run_main("runs", "delete", run["run_id"], "--store", store, "--json") == 0
    assert _one_object(capsys.readouterr().out)["deleted"] == [run["run_id"]]
    failing = [
        ("runs", "show", "zzzzzz", "--store", store),
        ("runs", "list", "--store", tmp_path / "none.db"),
        ("train", *user, "--batch-size", "0", "--store", store),
        ("train", "--no-such-flag"),
        ("experiment", "options", "no-such-experiment"),
    ]
    for args in failing:
        assert run_main(*args, "--json") == 2, args
        out = capsys.readouterr()
        doc = _one_object(out.out)
        assert doc["code"] == 2 and doc["error"] and out.err.count("error:") == 1, args
    assert sys.stdout is not sys.stderr  # restored after the command
