"""One JSON encoder (`batchlab.atomic.to_json`): every document batchlab writes turns NaN and
+-inf into null, whichever writer it goes through; what was stored before (run records with a
bare `NaN` token, measurement rows with the strings "nan"/"inf"/"-inf") still loads, and the
measurement row keys hashed from those strings are unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchlab.atomic import jsonable, to_json
from batchlab.cli.experiment import _strict_json
from batchlab.config import make_config
from batchlab.engine.result import TrainResult
from batchlab.experiments import claims, interval_audit
from batchlab.experiments.intervals import Interval
from batchlab.experiments.outputs import rows_to_csv
from batchlab.nn.checkpoint import read_meta, save_state
from batchlab.runs.measurement_files import checksum
from batchlab.runs.measurements import Measurements, canonical, spec_key
from batchlab.runs.store import Store
from batchlab.runs.store_schema import RUN_COLUMNS, RunRecord, row_checksum, scalar

VALUES: dict[str, Any] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                          "np": np.float32("nan"), "t": torch.tensor(math.inf), "ok": 1.5,
                          "nested": {"xs": [math.nan, 2.0, (-math.inf,)]}}
NULLED = {"nan": None, "inf": None, "-inf": None, "np": None, "t": None, "ok": 1.5,
          "nested": {"xs": [None, 2.0, [None]]}}


def test_the_encoder_writes_null_for_every_non_finite_float() -> None:
    assert jsonable(VALUES) == NULLED
    assert json.loads(to_json(VALUES)) == NULLED
    assert "NaN" not in to_json(VALUES) and "Infinity" not in to_json(VALUES)


def test_every_unified_writer_path_writes_null(tmp_path: Path) -> None:
    assert json.loads(_strict_json(VALUES)) == NULLED  # the CLI's --json documents
    doc = json.loads(claims.dumps([VALUES]))  # claims.json
    assert doc["claims"] == [NULLED]
    iv = Interval(math.nan, -math.inf, math.inf, 2, "mean", (1.0, math.nan), {"kind": "mean",
                                                                          "x": math.nan})
    assert interval_audit.interval_json(iv) == {"estimate": None, "ci": [None, None], "n": 2,
                                                "replicates": [1.0, None],
                                                "spec": {"kind": "mean", "x": None}}
    res = TrainResult(run_id="r", key="k", config=make_config(), status="ok",
                      epochs=[{"epoch": 1, **VALUES}], final=dict(VALUES))
    out = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert out["final"] == NULLED and out["epochs"][0] == {"epoch": 1, **NULLED}
    assert json.loads(scalar([math.nan, math.inf])) == [None, None]  # store export cells
    assert "NaN" not in rows_to_csv([{"v": [math.nan]}])  # experiment CSV cells
    save_state(tmp_path / "c.safetensors", {"w": torch.zeros(1)}, {"lr": math.inf})
    assert read_meta(tmp_path / "c.safetensors") == {"lr": None}


def test_run_records_store_null_and_old_nan_tokens_still_load(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as st:
        st.save_run(RunRecord(run_id="r1", config_hash="h1", config={"lr": 0.1}, seed=0,
                              status="completed", epochs=[{"epoch": 1, **VALUES}],
                              final=dict(VALUES)))
        text = st.conn.execute("SELECT final_json FROM runs").fetchone()[0]
        assert json.loads(text) == NULLED and "NaN" not in text
        rec = st.get("r1")
        assert rec is not None and rec.final == NULLED and rec.epochs[0]["nested"] == NULLED["nested"]
        # a record written before: json.dumps' bare NaN / Infinity tokens in a nested metric
        row = ("r0", "h0", '{"lr": 0.1}', 0, "completed", None, None, 0.0, None, "{}",
               json.dumps({"loss": math.nan, "xs": [math.inf]}))
        epochs = [(1, json.dumps({"epoch": 1, "loss": math.nan}))]
        with st.transaction() as c:
            c.execute(f"INSERT INTO runs ({RUN_COLUMNS}, checksum) VALUES "
                      f"(?,?,?,?,?,?,?,?,?,?,?,?)", (*row, row_checksum(row, epochs, [])))
            c.execute("INSERT INTO epochs VALUES (?,?,?)", ("r0", *epochs[0]))
        old = st.get("r0")
        assert old is not None and math.isnan(old.final["loss"]) and old.final["xs"] == [math.inf]
        assert math.isnan(old.epochs[0]["loss"])


def test_measurement_rows_keep_their_keys_and_old_strings_still_load(tmp_path: Path) -> None:
    """The measurement cache hashes its row keys from its canonical text, so that text keeps
    the strings it always wrote; a row stored before this change loads with nan/inf back."""
    spec = {"x": math.nan, "y": [math.inf, -math.inf], "z": np.float32(1.5), "k": (1, 2)}
    assert spec_key("demo", spec) == (
        "c9e24ea370f98b641781023b8a261c5109de50ba471ea0559e51366169790542")  # before the change
    assert canonical({"a": math.nan, "b": np.float64(-math.inf)}) == '{"a":"nan","b":"-inf"}'
    with Store(tmp_path / "m.db") as st:
        meas = Measurements(st)
        meas.put("demo", {"k": 1}, {"v": 1.0})
        old = '{"a":"nan","b":["inf","-inf"],"c":"text"}'  # an old row, written by hand
        st.conn.execute("UPDATE measurements SET payload_json = ?, checksum = ?",
                        (old, checksum(old)))
        got = meas.get("demo", {"k": 1})
        assert got is not None and math.isnan(got["a"]) and got["b"] == [math.inf, -math.inf]
        assert got["c"] == "text"


@pytest.mark.parametrize("v", [math.nan, math.inf, -math.inf])
def test_strict_text_never_holds_a_bare_non_finite_token(v: float) -> None:
    assert to_json({"v": v}) == '{"v": null}'
