"""Bad input is the user's, never "internal error" (issue 23): an unavailable device, a
--data-dir symlink loop, IDX "files" that are FIFOs or endless devices, errors and sys.exit
raised by the user's own model code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from batchlab import train
from batchlab.data.idx import read_bytes
from batchlab.errors import BatchlabError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

USER = """
import sys
import torch
from torch import nn

class Sixth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 6:
            raise ValueError("my forward broke")
        return self.fc(x)

class Ints(nn.Linear):
    def forward(self, x):
        return super().forward(x).long()

def sixth():
    return Sixth()

def ints():
    return Ints(8, 3)

def exits():
    raise SystemExit(0)

def nan_init():
    m = nn.Linear(8, 3)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    return m

def load():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
"""


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "hostile_user_module"
    (tmp_path / f"{name}.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHLAB_LOG_DIR", str(tmp_path / "logs"))
    yield name
    sys.modules.pop(name, None)


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def test_errors_in_the_users_model_are_the_users(run_main, user: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--data", f"{user}:load", "--epochs", "2", "--batch-size", "32",
            "--store", tmp_path / "s.db"]
    assert run_main(*base, "--model", f"{user}:sixth") == 2
    err = _one_line(capsys.readouterr().err)
    assert "my forward broke" in err and f"{user}.py" in err and "traceback in" in err
    log = Path(err.split("traceback in ")[1].split(")")[0])
    assert "my forward broke" in log.read_text()
    assert run_main(*base, "--model", f"{user}:ints") == 2
    assert "floating-point" in _one_line(capsys.readouterr().err)
    assert run_main(*base, "--model", f"{user}:exits", "--json") == 2
    out = capsys.readouterr()
    assert "sys.exit(0)" in _one_line(out.err) and '"code": 2' in out.out
    assert run_main(*base, "--model", f"{user}:nan_init") == 2
    assert "NaN" in _one_line(capsys.readouterr().err)
    with pytest.raises(BatchlabError, match="NaN"):
        train(model=lambda: nan_init_module(), data=(torch.randn(80, 8), torch.arange(80) % 3),
              epochs=1, batch_size=16)


def nan_init_module():
    from torch import nn

    m = nn.Linear(8, 3)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    return m


def test_empty_hidden_widths_are_refused(run_main, capsys: pytest.CaptureFixture) -> None:
    assert run_main("recommend", "--hidden", "32,,32") == 2
    assert "none empty" in _one_line(capsys.readouterr().err)


def test_an_unavailable_device_is_a_user_error(run_main, capsys: pytest.CaptureFixture,
                                               tmp_path: Path) -> None:
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert run_main("train", "--dataset", "digits", "--device", "mps", "--store",
                    tmp_path / "s.db") == 2
    assert "MPS" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "s.db").exists()


def test_data_dir_symlink_loop_and_special_files(run_main, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert run_main("data", "mnist", "--data-dir", tmp_path / "a") == 2
    assert "symlink loop" in _one_line(capsys.readouterr().err)
    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO"):
        read_bytes(fifo)  # would wait forever for a writer
    endless = tmp_path / "endless.gz"
    endless.symlink_to("/dev/zero")
    with pytest.raises(DataError, match="device"):
        read_bytes(endless)  # would grow without end


@pytest.mark.parametrize("sizes", ["[64,100000]", "[64,99999999999999999999999]"])
def test_a_plan_refuses_what_the_run_refuses(run_main, tmp_path: Path, sizes: str,
                                             capsys: pytest.CaptureFixture) -> None:
    code = run_main("experiment", "batch-size", "--plan", "--set", f"batch_sizes={sizes}",
                    "--store", tmp_path / "s.db", "--out", tmp_path / "out")
    assert code == 2
    assert "larger than the training set" in _one_line(capsys.readouterr().err)


def test_a_store_in_a_missing_folder_is_refused_not_created(run_main, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    deep = tmp_path / "nonexistent" / "deep" / "x.db"
    assert run_main("train", "--dataset", "digits", "--epochs", "0", "--store", deep) == 2
    assert "does not exist" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("sets, needle", [
    (["epochs=true"], "a number is expected"),          # pydantic would read it as 1 epoch
    (["batch_sizes=[64,false]"], "a number is expected"),
    (["epochs=2", "epochs=3"], "given twice"),          # the last one silently winning
])
def test_set_values_that_would_be_misread_are_refused(run_main, tmp_path: Path, sets: list[str],
                                                      needle: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    args = [a for s in sets for a in ("--set", s)]
    code = run_main("experiment", "batch-size", *args, "--store", tmp_path / "s.db",
                    "--out", tmp_path / "out")
    assert code == 2 and needle in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "s.db").exists()
