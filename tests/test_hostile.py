"""Hostile input, tried at random: whatever the option values, TOML documents or damaged store
and IDX files, the CLI ends with exit 0 or 2, never a traceback, one line on error, and a store
an error left byte-for-byte unchanged. Plus the numeric edges of TrainConfig, and a pin that
configs valid before these checks keep their store key.

In-process (the real entry point, `batchlab.cli.main`) with bounded, derandomized examples, so
this file stays fast and the same on every machine."""

from __future__ import annotations

import gzip
import math
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchlab.config import TrainConfig, make_config
from batchlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- TrainConfig at its edges ---------------------------------------------------------------------
@pytest.mark.parametrize("fields, needle", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63 - 1}, "seed"),  # once overflowed the shuffle generator: a traceback
    ({"lr": 1e308}, "beyond any trainable value"),
    ({"lr": math.inf}, "lr"),
    ({"weight_decay": math.inf}, "finite"),
    ({"weight_decay": 1e9}, "weight_decay"),
    ({"epochs": 10**20}, "epochs"),
    ({"warmup_epochs": math.inf}, "warmup_epochs"),
    ({"decay_factor": math.inf}, "decay_factor"),
    ({"target_metric": "test_acc", "target_value": math.nan}, "target_value"),
    ({"epochs": 2, "checkpoint_epochs": [-5, 99]}, "checkpoint_epochs [-5, 99] are outside the run (0..2)"),
    ({"batch_size": 64, "ghost_batch_size": 24}, "ghost_batch_size 24 must divide"),
    ({"schedule": [{"epochs": 60_000}, {"epochs": 60_000}]}, "at most 100000"),
    ({"hidden": [0]}, "hidden"),
    ({"hidden": [2**40]}, "hidden"),
    ({"betas": [0.9, 1.5]}, "betas"),
    ({"device": "gpu; rm -rf /"}, "unknown device"),
    ({"decay": "step", "decay_epochs": [0]}, "decay_epochs"),
    ({"epochs": 3, "lr_multipliers": {1: 1e308}}, "lr_multipliers multiply the lr"),
    ({"epochs": 3, "lr_multipliers": {1: 1e20, 2: 1e20}}, "lr_multipliers multiply the lr"),
])
def test_configs_beyond_the_edges_are_one_line_errors(fields: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(**fields)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_keys_of_configs_valid_before_the_edge_checks_are_unchanged() -> None:
    """Results stored before the checks must still be found: the key (computed with the code
    before this change) of three representative configs."""
    complex_ = dict(optimizer="lars", batchnorm=True, ghost_batch_size=32, batch_size=256,
                    warmup_epochs=2.5, decay="step", decay_epochs=[5, 8], decay_factor=0.2,
                    target_metric="test_acc", target_value=0.97, seed=12345,
                    checkpoint_epochs=[0, 3], lr_multipliers={2: 0.5},
                    schedule=[{"epochs": 3, "batch_size": 128}, {"epochs": 7, "lr": 0.2}],
                    momentum=0.9, weight_decay=5e-4)
    assert [TrainConfig(**f).key("fp") for f in (
        {}, dict(dataset="digits", hidden=[32], epochs=2, batch_size=32, lr=0.1), complex_)] == [
        "aea1047426aa8db2e8f852bdbdd1f5c1492feaaa6c4d71962ad999133f1ad699",
        "3e537215b6f599fc3442aa48270356644f239d2f972703b4a937840e00eaa91b",
        "93a87ea7d7598ff1dcf9dd332b34e5b0eafe632a7e18d292fd036b231fb4a25b"]
    # ... except on purpose where the data changed: `max_train` subsets are stratified now (they
    # were the first rows), so such runs must not be found under their old key
    assert TrainConfig(**complex_, max_train=600).key("fp") != \
        "34b09201289582a5128ea29a76847a77fa0c44c17fbf43b7be27eb180c97378f"


# -- the CLI under random input ---------------------------------------------------------------------
def _dump(store: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return [r for t in ("runs", "epochs", "artifacts") for r in con.execute(f"SELECT * FROM {t} ORDER BY 1, 2")]
    finally:
        con.close()


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from batchlab import train

    path = tmp_path_factory.mktemp("hostile") / "small.db"
    train(make_config(dataset="digits", hidden=[8], epochs=1, batch_size=64, lr=0.1,
                      checkpoint_epochs=[1]), store=path, label="[base] batchlab[ray]")
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def _clean(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("error:"), err


hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "1e20", str(2**64), str(-2**63 - 1),
                     "0", "-1", "0x10", "[base]", "batchlab[ray]", "", " ", "1_000", "1e-320"]),
    st.integers().map(str),
    st.floats().map(repr),
)
OPTIONS = {
    "--lr": st.one_of(hostile_text, st.sampled_from(["0.05", "0.1"])),
    "--batch-size": st.one_of(hostile_text, st.sampled_from(["64", "128", "100000"])),
    "--epochs": st.one_of(hostile_text.filter(lambda s: not s.isdigit() or not 1 < int(s) <= 10**5),
                          st.sampled_from(["0", "1"])),
    "--momentum": hostile_text, "--weight-decay": hostile_text, "--seed": hostile_text,
    "--optimizer": st.one_of(hostile_text, st.sampled_from(["sgd", "adam", "lars"])),
    "--init": hostile_text, "--device": hostile_text, "--dataset": hostile_text,
}


@FAST
@given(opts=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), min_size=1, max_size=4)
       .flatmap(lambda d: st.fixed_dictionaries({k: OPTIONS[k] for k in d})))
def test_random_train_options(run_main, capsys, small_store: Path, opts: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "s.db"
        shutil.copy(small_store, store)
        before = _dump(store)
        cfg = Path(d) / "c.toml"
        cfg.write_text('dataset = "digits"\nhidden = [8]\nepochs = 0\n')
        args = [a for k, v in opts.items() for a in (k, v)]
        code = run_main("train", "--config", cfg, *args, "--store", store, "--quiet")
        _clean(code, capsys.readouterr().err)
        if code == 2:
            assert _dump(store) == before


FIELDS = ["lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "seed", "init",
          "warmup_epochs", "decay", "decay_epochs", "decay_factor", "target_metric", "target_value",
          "checkpoint_epochs", "ghost_batch_size", "batchnorm", "val_fraction", "max_train",
          "lr_multipliers", "betas", "probes", "normalize", "device", "nonsense", "base", "grid"]
toml_scalar = st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(),
                        st.booleans(), st.text(max_size=8))
toml_value = st.recursive(toml_scalar, lambda v: st.one_of(st.lists(v, max_size=3),
                                                           st.dictionaries(st.sampled_from(FIELDS), v, max_size=3)),
                          max_leaves=6)


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"


@FAST
@given(doc=st.dictionaries(st.sampled_from(FIELDS), toml_value, max_size=5),
       junk=st.one_of(st.none(), st.binary(max_size=40)))
def test_random_toml_documents(run_main, capsys, small_store: Path, doc: dict, junk: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "s.db"
        shutil.copy(small_store, store)
        before = _dump(store)
        f = Path(d) / "doc.toml"
        f.write_bytes(junk if junk is not None else
                      ('hidden = [8]\n' + "".join(f"{k} = {_toml(v)}\n" for k, v in doc.items())).encode())
        runs = [("train", "--config", f, "--dataset", "digits", "--epochs", "0", "--quiet"),
                ("sweep", f, "--quiet"),
                ("schedule-preset", "goyal", "--batch-size", "256", "--config", f)]
        for args in runs:
            code = run_main(*args, "--store", store) if args[0] != "schedule-preset" else run_main(*args)
            _clean(code, capsys.readouterr().err)
            if code == 2:
                assert _dump(store) == before
            before = _dump(store)


@FAST
@given(cuts=st.lists(st.tuples(st.integers(0, 40_000), st.binary(min_size=1, max_size=64)), max_size=4),
       truncate=st.one_of(st.none(), st.integers(0, 40_000)))
def test_random_damage_to_a_store_file(run_main, capsys, small_store: Path,
                                       cuts: list[tuple[int, bytes]], truncate: int | None) -> None:
    data = bytearray(small_store.read_bytes())
    for at, b in cuts:
        data[at:at + len(b)] = b
    if truncate is not None:
        data = data[:truncate]
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "s.db"
        store.write_bytes(bytes(data))
        for args in (("runs", "list", "--json"), ("runs", "show", "abcd"), ("runs", "check"),
                     ("runs", "export", "-o", Path(d) / "x.csv")):
            code = run_main(*args, "--store", store)
            _clean(code, capsys.readouterr().err)
            assert store.read_bytes() == bytes(data)


def _fake_idx_dir(directory: Path) -> dict[str, Path]:
    from batchlab.data import sources
    from batchlab.data.idx import write_idx

    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
              "train_y": rng.integers(0, 10, 40, dtype=np.uint8),
              "test_x": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "test_y": rng.integers(0, 10, 10, dtype=np.uint8)}
    paths = {}
    for key, fname in sources.FILES.items():
        paths[key] = directory / fname
        write_idx(paths[key], arrays[key])
    return paths


@FAST
@given(which=st.sampled_from(["train_x", "train_y", "test_x", "test_y"]),
       layer=st.sampled_from(["payload", "gzip"]),
       cuts=st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=8)), min_size=1, max_size=3),
       truncate=st.one_of(st.none(), st.integers(0, 300)))
def test_random_damage_to_idx_files(run_main, capsys, monkeypatch, which: str, layer: str,
                                    cuts: list[tuple[int, bytes]], truncate: int | None) -> None:
    monkeypatch.setattr("batchlab.data._CACHE", {})
    with tempfile.TemporaryDirectory() as d:
        paths = _fake_idx_dir(Path(d))
        raw = bytearray(paths[which].read_bytes() if layer == "gzip" else gzip.decompress(paths[which].read_bytes()))
        for at, b in cuts:
            raw[at:at + len(b)] = b
        if truncate is not None:
            raw = raw[:truncate]
        paths[which].write_bytes(bytes(raw) if layer == "gzip" else gzip.compress(bytes(raw)))
        code = run_main("data", "mnist", "--data-dir", d)
        _clean(code, capsys.readouterr().err)
