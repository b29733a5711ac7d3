"""The gradient-competition engine: summed gradients against a hand-rolled autograd loop,
replay from recorded seeds, vectorized == sequential, the modes' relations, blow-ups, on-disk
tensors and bad input; plus one tiny end-to-end run of the experiment."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchlab import gradcomp as gc
from batchlab.errors import BatchlabError, ConfigError
from batchlab.experiments import Context, run_experiment
from batchlab.models import build_mlp
from batchlab.store import Store

N = 24  # samples per trial in these tests


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = build_mlp(20, [16], 5, seed=3)
    X = torch.rand(200, 20)
    Y = torch.randint(0, 5, (200,))
    return model, X, Y


def reference(model, x, y, b, lr, mode):
    """The study's loop, written plainly: autograd per step, manual SGD, last-layer grads
    summed; the remainder is one last smaller step."""
    net = copy.deepcopy(model)
    total = torch.zeros_like(net[-2].weight)
    for s in range(0, len(y), b):
        xb, yb = x[s:s + b], y[s:s + b]
        loss = F.nll_loss(net(xb), yb, reduction="sum" if mode == "sum-loss" else "mean")
        net.zero_grad()
        loss.backward()
        g = net[-2].weight.grad
        total += g * len(yb) if mode == "sample-sum" else g
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad
    return total.flatten()


@pytest.mark.parametrize("b", [1, 5, 8, 24])  # 5 leaves a remainder of 4
@pytest.mark.parametrize("mode", gc.MODES)
def test_matches_reference_loop(tiny, b, mode):
    # float64 on both sides: the fused engine computes the same sums with different kernels
    # (baddbmm vs addmm, a different summation order), so agreement is to rounding, not
    # bitwise; in float64 that is ~1e-15 relative, far below any modelling difference
    # (a wrong remainder rule or reduction changes the result by > 1e-2).
    model, X, Y = tiny
    m64 = copy.deepcopy(model).double()
    idx = gc.sample_indices(len(Y), N, seed=11)
    x, y = X[idx].double(), Y[idx]
    got = gc.run_trial_block(m64, x[None], y[None], b, 0.05, [mode])[mode][0]
    want = reference(m64, x, y, b, 0.05, mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_modes_relate_as_documented(tiny):
    model, X, Y = tiny
    idx = gc.sample_indices(len(Y), N, seed=5)
    x, y = X[idx][None], Y[idx][None]
    r4 = gc.run_trial_block(model, x, y, 4, 0.05, gc.MODES)  # 4 divides 24: no remainder
    assert torch.equal(r4["sample-sum"], 4 * r4["displacement"])
    r1 = gc.run_trial_block(model, x, y, 1, 0.05, gc.MODES)
    assert torch.equal(r1["sum-loss"], r1["displacement"])
    assert torch.equal(r1["sample-sum"], r1["displacement"])
    rn = gc.run_trial_block(model, x, y, N, 0.05, gc.MODES)  # one step: recorded pre-update
    torch.testing.assert_close(rn["sum-loss"], rn["sample-sum"], rtol=1e-6, atol=1e-6)
    # displacement is the weight change / lr
    net = copy.deepcopy(model)
    w0 = net[-2].weight.detach().clone()
    from batchlab.fused import FusedMLPSGD

    eng = FusedMLPSGD.from_mlps([net])
    for s in range(0, N, 4):
        eng.step(x[:, s:s + 4], y[:, s:s + 4], 0.05)
    torch.testing.assert_close((w0 - net[-2].weight).flatten() / 0.05, r4["displacement"][0],
                               rtol=1e-4, atol=1e-5)


def test_vectorized_equals_sequential(tiny):
    model, X, Y = tiny
    seeds = gc.trial_seeds(0, "vec", 4)
    idx = torch.stack([gc.sample_indices(len(Y), N, s) for s in seeds])
    for b in (1, 5, 24):
        stacked = gc.run_trial_block(model, X[idx], Y[idx], b, 0.05, gc.MODES)
        for k in range(4):
            one = gc.run_trial_block(model, X[idx[k:k + 1]], Y[idx[k:k + 1]], b, 0.05, gc.MODES)
            for m in gc.MODES:
                # batched vs single gemm may round differently in the last bit
                torch.testing.assert_close(stacked[m][k], one[m][0], rtol=1e-6, atol=1e-7)


def test_replay_from_seed_gives_stored_tensors(tiny, tmp_path):
    model, X, Y = tiny
    run = gc.TrialRun("t", gc.trial_seeds(1, "replay", 3), [None] * 3, [1, 5, 24],
                      list(gc.MODES), n_samples=N, lr=0.05, k=1)
    recs = gc.run_trials(run, model, X, Y, tmp_path, "ckpt")
    d = next(tmp_path.glob("t-*"))
    for b in (1, 5, 24):
        for m in gc.MODES:
            arr = gc.open_tensors(d / recs[b]["modes"][m]["file"], 3, 16 * 5)
            for t, seed in enumerate(run.seeds):
                again = gc.replay_trial(model, X, Y, seed, b, 0.05, m, n_samples=N)
                assert np.array_equal(arr[t], again.numpy()), (b, m, t)
                assert recs[b]["modes"][m]["norms"][t] == pytest.approx(
                    float(np.linalg.norm(arr[t].astype(np.float64))))
    # a rerun reuses the records; a truncated tensor file is a clear error
    assert gc.run_trials(run, model, X, Y, tmp_path, "ckpt")[5] == recs[5]
    f = d / recs[5]["modes"]["displacement"]["file"]
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(BatchlabError, match="truncated|shape"):
        gc.run_trials(run, model, X, Y, tmp_path, "ckpt")
    f.unlink()
    with pytest.raises(BatchlabError, match="missing"):
        gc.run_trials(run, model, X, Y, tmp_path, "ckpt")


def test_same_samples_only_reorders(tiny):
    a = gc.sample_indices(200, N, seed=1, sample_seed=9)
    b = gc.sample_indices(200, N, seed=2, sample_seed=9)
    assert not torch.equal(a, b)
    assert torch.equal(a.sort().values, b.sort().values)
    assert not torch.equal(gc.sample_indices(200, N, 1).sort().values,
                           gc.sample_indices(200, N, 2).sort().values)


def test_sum_loss_blowups_are_recorded_not_raised(tiny, tmp_path):
    model, X, Y = tiny
    run = gc.TrialRun("blow", gc.trial_seeds(0, "blow", 2), [None] * 2, [12], list(gc.MODES),
                      n_samples=N, lr=2.0, blowup_loss=10.0)
    rec = gc.run_trials(run, model, X, Y, tmp_path, "ckpt", keep_tensors=False)[12]
    assert all(rec["modes"]["sum-loss"]["blowup"])  # second step at lr x 12 = 24 explodes
    assert not any(rec["modes"]["displacement"]["blowup"])  # same samples at lr 2: fine
    assert rec["modes"]["sum-loss"]["file"] is None
    assert not list(tmp_path.rglob("*.npy"))


def test_bad_inputs(tiny):
    model, _, _ = tiny
    with pytest.raises(ConfigError, match="1..1024"):
        gc.validate_batch_sizes([0, 4], 1024)
    with pytest.raises(ConfigError, match="1..1024"):
        gc.validate_batch_sizes([1, 2048], 1024)
    other = build_mlp(20, [8], 5).state_dict()
    with pytest.raises(BatchlabError, match="does not fit"):
        gc.fit_state(model, other)


def _ctx(tmp_path, store, **opts):
    base = dict(trials=3, n_samples=64, batch_sizes=[1, 3, 16, 64], hidden=[32],
                early_epochs=1, late_epochs=2, decomp_sets=2, decomp_orders=2,
                decomp_batch_sizes=[4, 64])
    return Context(preset="quick", out_dir=tmp_path / "out", store=store,
                   options={**base, **opts})


def test_experiment_end_to_end(tmp_path):
    with Store(tmp_path / "runs.db") as st:
        out, path = run_experiment("gradient-competition", _ctx(tmp_path, st))
        assert {"norm_vs_b.png", "normalized_vs_b.png", "norm_hist_early.png",
                "value_hist.png", "results.csv", "summary.md", "claims.json",
                "trials.csv"} <= {p.name for p in path.iterdir()}
        fits = [r for r in out.rows if r["kind"] == "fit"]
        assert len(fits) == 6 and all(np.isfinite(r["exponent"]) for r in fits)
        # displacement = mean-loss gradient sum: shrinks with b (about 1/b for small lr)
        disp = [r for r in fits if r["mode"] == "displacement"]
        assert all(r["exponent"] < -0.5 for r in disp)
        claims = json.loads((path / "claims.json").read_text())
        assert len(claims) == 15
        assert {c["verdict"] for c in claims} <= {"reproduced", "not_reproduced", "inconclusive"}
        dec = [r for r in out.rows if r["kind"] == "decomposition"]
        assert dec and all(0 <= r["share_samples"] <= 1 for r in dec)
        # a second run reuses every record (no training, no trials)
        out2, _ = run_experiment("gradient-competition", _ctx(tmp_path, st))
        assert [r.get("mean") for r in out2.rows] == [r.get("mean") for r in out.rows]
        with pytest.raises(ConfigError, match="1..64"):
            run_experiment("gradient-competition", _ctx(tmp_path, st, batch_sizes=[0, 8]))
        with pytest.raises(ConfigError, match="unknown option"):
            run_experiment("gradient-competition", _ctx(tmp_path, st, bogus=1))
        bad = tmp_path / "bad.safetensors"
        from batchlab.checkpoint import save_model

        save_model(bad, build_mlp(784, [8], 10))
        with pytest.raises(BatchlabError, match="does not fit"):
            run_experiment("gradient-competition",
                           _ctx(tmp_path, st, checkpoint_early=str(bad)))
