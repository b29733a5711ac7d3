"""Measured results through the store: keyed rows with a checksum (edits are caught and
recomputed), files verified by sha256, non-finite numbers kept; and the sharpness experiment
resuming at the next curvature measurement after an interruption."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest

from batchlab.experiments import Context, run_experiment
from batchlab.measure import curvature as C
from batchlab.runs.measurements import Measurements, spec_key
from batchlab.runs.store import Store


def test_rows_are_keyed_checksummed_and_verified(tmp_path: Path) -> None:
    lines: list[str] = []
    with Store(tmp_path / "m.db") as st:
        meas = Measurements(st, warn=lines.append)
        spec = {"weights": "ab", "data": "cd", "k": 1}
        f = tmp_path / "t.npy"
        np.save(f, np.arange(4.0))
        meas.put("demo", spec, {"v": 1.5, "bad": math.nan, "arr": np.float32(2.0)}, {"t": f})
        got = meas.get("demo", spec)
        assert got["v"] == 1.5 and math.isnan(got["bad"]) and got["arr"] == 2.0
        assert meas.get("demo", {**spec, "data": "other"}) is None  # other data: no reuse
        assert spec_key("demo", spec) == spec_key("demo", dict(reversed(spec.items())))
        # a changed file is caught, said in one line, and the row dropped for a recompute
        np.save(f, np.arange(5.0))
        assert meas.get("demo", spec) is None and meas.count("demo") == 0
        assert len(lines) == 1 and "does not match its sha256" in lines[0]
        # an edited payload is caught by its checksum
        meas.put("demo", spec, {"v": 1.5})
        st.conn.execute("UPDATE measurements SET payload_json = '{\"v\": 2.5}'")
        assert meas.get("demo", spec) is None and "checksum" in lines[-1]
        calls = []
        assert meas.cached("demo", spec, lambda: calls.append(1) or {"v": 3.0}) == {"v": 3.0}
        assert meas.cached("demo", spec, lambda: calls.append(1) or {"v": 4.0}) == {"v": 3.0}
        assert calls == [1]


def test_interrupted_sharpness_run_resumes_at_the_next_measurement(tmp_path, monkeypatch):
    """Curvature units run as tasks (two worker threads here) and each is stored as it comes
    back: an interrupt loses only the units in flight, the rerun computes exactly the units
    that were not stored, and a third run computes nothing and gives the same numbers."""

    opts = dict(epochs=1, large_epochs=1, curvature_samples=64, trace_rtol=0.5,
                slq_steps=4, subspace_dim=4)
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def counting(name, fn, fail_at=None):
        def wrapped(*a, **kw):
            with lock:
                calls[name] = calls.get(name, 0) + 1
                n = calls[name]
            if fail_at is not None and n == fail_at:
                raise KeyboardInterrupt
            return fn(*a, **kw)
        return wrapped

    real = {n: getattr(C, n) for n in ("sharpness", "hessian_eigenvalues", "hessian_trace",
                                       "spectral_density", "interpolate")}
    for n, fn in real.items():
        monkeypatch.setattr(C, n, counting(n, fn, fail_at=3 if n == "hessian_trace" else None))
    # 2 seeds x 3 regimes x (4 eps-sharpness + lambda_max + trace) + 2 interpolations + 2 densities
    # + K7's lr sweep per seed (one lambda_max at the initial weights each)
    total = 6 * 6 + 2 + 2 + 2
    with Store(tmp_path / "runs.db") as st:
        ctx = Context(preset="quick", seeds=2, out_dir=tmp_path / "out", store=st, options=opts)
        with pytest.raises(KeyboardInterrupt):
            run_experiment("sharpness", ctx)
        stored = Measurements(st).count()
        assert 0 < stored < total
        calls.clear()
        for n, fn in real.items():
            monkeypatch.setattr(C, n, counting(n, fn))
        out, _ = run_experiment("sharpness", ctx)
        assert sum(calls.values()) == total - stored  # only what was not stored
        assert Measurements(st).count() == total
        calls.clear()
        again, _ = run_experiment("sharpness", ctx)
        assert calls == {}  # everything from the store
        cols = ("lambda_max", "trace", "sharp_full_0.001")
        assert [[r.get(c) for c in cols] for r in again.rows] == \
            [[r.get(c) for c in cols] for r in out.rows]
