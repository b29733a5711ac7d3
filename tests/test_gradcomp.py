"""The gradient-competition engine: summed gradients against a hand-rolled autograd loop,
replay from recorded seeds, vectorized == sequential, the modes' relations, blow-ups, on-disk
tensors and bad input; plus one tiny end-to-end run of the experiment."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchlab.analysis import gradcomp as gc
from batchlab.errors import BatchlabError, ConfigError
from batchlab.experiments import Context, run_experiment
from batchlab.nn.models import build_mlp
from batchlab.runs.store import Store

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


@pytest.mark.parametrize("engine", gc.ENGINES)
@pytest.mark.parametrize("b", [1, 5, 8, 24])  # 5 leaves a remainder of 4
@pytest.mark.parametrize("mode", gc.MODES)
def test_matches_reference_loop(tiny, b, mode, engine):
    # float64 on both sides: the engines compute the same sums with different kernels
    # (baddbmm vs addmm; deferred rank-R updates), so agreement is to rounding, not bitwise;
    # in float64 that is ~1e-15 relative, far below any modelling difference (a wrong
    # remainder rule or reduction changes the result by > 1e-2).
    model, X, Y = tiny
    m64 = copy.deepcopy(model).double()
    idx = gc.sample_indices(len(Y), N, seed=11)
    x, y = X[idx].double(), Y[idx]
    got = gc.run_trial_block(m64, x[None], y[None], b, 0.05, [mode], engine)[mode][0]
    want = reference(m64, x, y, b, 0.05, mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("hidden", [[], [16], [16, 12], [12, 16, 8]])
@pytest.mark.parametrize("rank", [1, 4, 7])  # several chunks; with b > rank, one step each
@pytest.mark.parametrize("b", [1, 3, 5])
@pytest.mark.parametrize("mode", gc.MODES)
def test_deferred_chunks_match_reference(monkeypatch, hidden, rank, b, mode):
    """Deferred updates across chunk boundaries, for 0-3 hidden layers (the first layer's
    Gram path, the hidden layers' history path and the direct last layer)."""
    monkeypatch.setattr(gc, "DEFERRED_RANK", rank)
    model = build_mlp(20, hidden, 5, seed=4).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(N, 20, generator=g).double(), torch.randint(0, 5, (N,), generator=g)
    got = gc.run_trial_block(model, x[None], y[None], b, 0.1, [mode], "deferred")
    want = reference(model, x, y, b, 0.1, mode)
    torch.testing.assert_close(got[mode][0], want, rtol=1e-12, atol=1e-13)
    # the largest step loss, as the plain loop sees it
    net, worst = copy.deepcopy(model), -1.0
    for s in range(0, N, b):
        loss = F.nll_loss(net(x[s:s + b]), y[s:s + b],
                          reduction="sum" if mode == "sum-loss" and b > 1 else "mean")
        worst = max(worst, loss.item() / (min(b, N - s) if mode == "sum-loss" and b > 1 else 1))
        net.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
    key = "max_loss/sum" if mode == "sum-loss" else "max_loss/mean"
    assert float(got[key][0]) == pytest.approx(worst, rel=1e-12)


@pytest.mark.parametrize("hidden", [[], [16, 12]])
def test_deferred_pass_leaves_the_sgd_weights(hidden):
    """With final_update (the default) the weights after a deferred pass are plain SGD's."""
    from batchlab.engine.deferred import Step, sgd_pass

    model = build_mlp(20, hidden, 5, seed=4).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(N, 20, generator=g).double(), torch.randint(0, 5, (N,), generator=g)
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    W = [m.weight.detach().clone()[None] for m in lins]
    bias = [m.bias.detach().clone()[None] for m in lins]
    sink = torch.zeros_like(W[-1])
    sgd_pass(W, bias, x[None], y[None], [Step(s, s + 3, 0.1, sink) for s in range(0, N, 3)],
             rank=5)
    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for s in range(0, N, 3):
        opt.zero_grad()
        F.nll_loss(net(x[s:s + 3]), y[s:s + 3]).backward()
        opt.step()
    for m, w, b in zip([m for m in net.modules() if isinstance(m, torch.nn.Linear)], W, bias):
        torch.testing.assert_close(w[0], m.weight.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(b[0], m.bias.detach(), rtol=1e-12, atol=1e-13)


def test_deferred_chunking_rule():
    from batchlab.engine.deferred import Step, chunks

    sink = torch.zeros(1)
    steps = [Step(s, s + 3, 0.1, sink) for s in range(0, 30, 3)] + [Step(30, 31, 0.1, sink)]
    groups = chunks(steps, 8)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2, 1]  # 6 rows each; the remainder alone
    assert all(g[-1].stop - g[0].start <= 8 for g in groups)
    assert [s for g in groups for s in g] == steps
    assert [len(g) for g in chunks(steps[:4], 2)] == [1, 1, 1, 1]  # b > rank: one step each
    # sum-loss: lr x B per step keeps lr / B equal, so the remainder joins the chunk
    summed = [Step(0, 2, 0.5, sink), Step(2, 3, 0.25, sink)]
    assert [len(g) for g in chunks(summed, 8)] == [2]


def test_nan_loss_is_reported(tiny):
    model, X, Y = tiny
    idx = gc.sample_indices(len(Y), N, seed=3)
    for engine in gc.ENGINES:
        res = gc.run_block(model, X[idx][None], Y[idx][None], 2, 1e30, engine=engine)
        assert not torch.isfinite(res["max_loss"]).all(), engine


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
    from batchlab.engine.fused import FusedMLPSGD

    eng = FusedMLPSGD.from_mlps([net])
    for s in range(0, N, 4):
        eng.step(x[:, s:s + 4], y[:, s:s + 4], 0.05)
    torch.testing.assert_close((w0 - net[-2].weight).flatten() / 0.05, r4["displacement"][0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", gc.ENGINES)
def test_vectorized_equals_sequential(tiny, engine):
    model, X, Y = tiny
    seeds = gc.trial_seeds(0, "vec", 4)
    idx = torch.stack([gc.sample_indices(len(Y), N, s) for s in seeds])
    for b in (1, 5, 24):
        stacked = gc.run_trial_block(model, X[idx], Y[idx], b, 0.05, gc.MODES, engine)
        for k in range(4):
            one = gc.run_trial_block(model, X[idx[k:k + 1]], Y[idx[k:k + 1]], b, 0.05,
                                     gc.MODES, engine)
            for m in gc.MODES:
                # batched vs single gemm may round differently in the last bit
                torch.testing.assert_close(stacked[m][k], one[m][0], rtol=1e-6, atol=1e-7)


def test_parallel_workers_give_identical_tensors(tiny, tmp_path):
    """Trials on 1 or 3 CPU workers: the same bits, and the same result directory (the worker
    count is not part of the design's hash)."""
    model, X, Y = tiny
    seeds = gc.trial_seeds(4, "workers", 7)
    out = {}
    for w in (1, 3):
        run = gc.TrialRun("w", seeds, [None] * 7, [1, 5], list(gc.MODES), n_samples=N,
                          lr=0.05, threads=w)
        done: Counter[int] = Counter()
        recs = gc.run_trials(run, model, X, Y, tmp_path / f"w{w}", "ckpt",
                             advance=lambda b, t, done=done: done.update({b: t}))
        assert done == {1: 7, 5: 7}  # every trial reported once, per batch size
        (d,) = (tmp_path / f"w{w}").iterdir()
        out[w] = d.name, {(b, m): np.load(d / recs[b]["modes"][m]["file"])
                          for b in (1, 5) for m in gc.MODES}
    assert out[1][0] == out[3][0]
    assert all(np.array_equal(out[1][1][k], out[3][1][k]) for k in out[1][1])


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


def test_failed_batch_size_leaves_no_partial_files(tiny, tmp_path, monkeypatch):
    model, X, Y = tiny
    run = gc.TrialRun("fail", gc.trial_seeds(2, "fail", 6), [None] * 6, [1, 5],
                      ["displacement"], n_samples=N, lr=0.05, threads=2)
    real, calls = gc.run_trial_block, []

    def flaky(*a, **kw):
        calls.append(a[3])
        if a[3] == 5 and len(calls) > 8:  # b=1 completes; b=5 fails on its third block
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gc, "run_trial_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        gc.run_trials(run, model, X, Y, tmp_path, "ckpt")
    (d,) = tmp_path.iterdir()
    assert sorted(p.name for p in d.iterdir()) == ["b0001.json", "displacement_b0001.npy"]
    monkeypatch.setattr(gc, "run_trial_block", real)
    recs = gc.run_trials(run, model, X, Y, tmp_path, "ckpt")  # resumes: b=1 reused, b=5 run
    assert sorted(recs) == [1, 5] and not list(d.glob(".*"))


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
        claims = json.loads((path / "claims.json").read_text())["claims"]
        assert len(claims) == 15
        assert {c["verdict"] for c in claims} <= {"reproduced", "not_reproduced", "inconclusive"}
        dec = [r for r in out.rows if r["kind"] == "decomposition"]
        assert dec and all(0 <= r["share_samples"] <= 1 for r in dec)
        # a second run reuses every record (no training, no trials)
        out2, _ = run_experiment("gradient-competition", _ctx(tmp_path, st))
        assert [r.get("mean") for r in out2.rows] == [r.get("mean") for r in out.rows]
        with pytest.raises(ConfigError, match="1..64"):
            run_experiment("gradient-competition", _ctx(tmp_path, st, batch_sizes=[128]))
        with pytest.raises(ConfigError, match="option batch_sizes"):
            run_experiment("gradient-competition", _ctx(tmp_path, st, batch_sizes=[0, 8]))
        with pytest.raises(ConfigError, match="unknown option"):
            run_experiment("gradient-competition", _ctx(tmp_path, st, bogus=1))
        for bad_opt in ({"threads": 0}, {"k": -1}, {"k": 1.5}, {"engine": "bogus"}):
            with pytest.raises(ConfigError, match=f"option {next(iter(bad_opt))} of experiment"):
                run_experiment("gradient-competition", _ctx(tmp_path, st, **bad_opt))
        bad = tmp_path / "bad.safetensors"
        from batchlab.nn.checkpoint import save_model

        save_model(bad, build_mlp(784, [8], 10))
        with pytest.raises(BatchlabError, match="does not fit"):
            run_experiment("gradient-competition",
                           _ctx(tmp_path, st, checkpoint_early=str(bad)))
