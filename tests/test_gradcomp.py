"""Gradient-competition trials: summed gradients against a hand-rolled autograd loop,
replay from recorded seeds, vectorized == sequential, the modes' relations, blow-ups, on-disk
tensors and bad input; plus one tiny end-to-end run of the experiment."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchlab.analysis import gradcomp as gc
from batchlab.analysis import gradcomp_runner as gcr
from batchlab.analysis import gradcomp_trials as gct
from batchlab.atomic import leftovers
from batchlab.errors import BatchlabError, ConfigError
from batchlab.experiments import Context, prepared, run_experiment
from batchlab.experiments.claims import check_document
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


@pytest.mark.parametrize("backend", gc.BACKENDS)
@pytest.mark.parametrize("b", [1, 5, 8, 24])  # 5 leaves a remainder of 4
@pytest.mark.parametrize("mode", gc.MODES)
def test_matches_reference_loop(tiny, b, mode, backend):
    # float64 on both sides: the backends compute the same sums with different kernels
    # (baddbmm vs addmm; deferred rank-R updates), so agreement is to rounding, not bitwise;
    # in float64 that is ~1e-15 relative, far below any modelling difference (a wrong
    # remainder rule or reduction changes the result by > 1e-2).
    model, X, Y = tiny
    m64 = copy.deepcopy(model).double()
    idx = gc.sample_indices(len(Y), N, seed=11)
    x, y = X[idx].double(), Y[idx]
    got = gc.run_trial_block(m64, x[None], y[None], b, 0.05, [mode], backend)[mode][0]
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
    for backend in gc.BACKENDS:
        res = gc.run_block(model, X[idx][None], Y[idx][None], 2, 1e30, backend=backend)
        assert not torch.isfinite(res["max_loss"]).all(), backend


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


@pytest.mark.parametrize("backend", gc.BACKENDS)
def test_vectorized_equals_sequential(tiny, backend):
    model, X, Y = tiny
    seeds = gc.trial_seeds(0, "vec", 4)
    idx = torch.stack([gc.sample_indices(len(Y), N, s) for s in seeds])
    for b in (1, 5, 24):
        stacked = gc.run_trial_block(model, X[idx], Y[idx], b, 0.05, gc.MODES, backend)
        for k in range(4):
            one = gc.run_trial_block(model, X[idx[k:k + 1]], Y[idx[k:k + 1]], b, 0.05,
                                     gc.MODES, backend)
            for m in gc.MODES:
                # batched vs single gemm may round differently in the last bit
                torch.testing.assert_close(stacked[m][k], one[m][0], rtol=1e-6, atol=1e-7)


def _store(tmp_path, name="g.db"):
    return Store(tmp_path / name)


def _measured(recs):
    """Records without their timings (a recomputed chunk takes other seconds)."""
    return {b: {k: v for k, v in r.items() if k != "seconds"} for b, r in recs.items()}


def test_parallel_workers_give_identical_tensors(tiny, tmp_path):
    """Trials on 1 or 3 CPU workers: the same bits and the same store keys (the worker count
    is not part of a chunk's key)."""
    model, X, Y = tiny
    seeds = gc.trial_seeds(4, "workers", 7)
    out = {}
    for w in (1, 3):
        run = gct.TrialRun("w", seeds, [None] * 7, [1, 5], list(gc.MODES), n_samples=N,
                           lr=0.05, threads=w, chunk=2)
        done: Counter[int] = Counter()
        with _store(tmp_path, f"w{w}.db") as st:
            recs = gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / f"w{w}",
                                  advance=lambda b, t, done=done: done.update({b: t}))
            keys = {k for (k,) in st.conn.execute("SELECT key FROM measurements")}
        assert done == {1: 7, 5: 7}  # every trial reported once, per batch size
        out[w] = keys, {(b, m): gcr.load_tensors(recs[b], m, 16 * 5)
                        for b in (1, 5) for m in gc.MODES}
    assert out[1][0] == out[3][0] and len(out[1][0]) == 8  # 4 chunks of <= 2 trials per b
    assert all(np.array_equal(out[1][1][k], out[3][1][k]) for k in out[1][1])


def test_replay_from_seed_gives_stored_tensors(tiny, tmp_path):
    model, X, Y = tiny
    run = gct.TrialRun("t", gc.trial_seeds(1, "replay", 3), [None] * 3, [1, 5, 24],
                       list(gc.MODES), n_samples=N, lr=0.05, k=1)
    st = _store(tmp_path)
    recs = gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "t")
    for b in (1, 5, 24):
        for m in gc.MODES:
            arr = gcr.load_tensors(recs[b], m, 16 * 5)
            for t, seed in enumerate(run.seeds):
                again = gc.replay_trial(model, X, Y, seed, b, 0.05, m, n_samples=N)
                assert np.array_equal(arr[t], again.numpy()), (b, m, t)
                assert recs[b]["modes"][m]["norms"][t] == pytest.approx(
                    float(np.linalg.norm(arr[t].astype(np.float64))))
    # a rerun reuses the records; a damaged tensor file is recomputed (said in one line)
    lines: list[str] = []
    again = gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "t",
                           progress=lines.append)
    assert again == recs and lines == []
    f = Path(recs[5]["modes"]["displacement"]["files"][0])
    f.write_bytes(f.read_bytes()[:200])
    fixed = gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "t",
                           progress=lines.append)
    assert _measured(fixed) == _measured(recs)
    assert [x for x in lines if "not trusted" in x and "does not match" in x]
    f.unlink()
    lines.clear()
    assert _measured(gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "t",
                                    progress=lines.append)) == _measured(recs)
    assert [x for x in lines if "missing" in x]
    st.close()


def test_damaged_or_foreign_records_are_not_reused(tiny, tmp_path):
    """A hand-edited chunk row is detected by its checksum and recomputed; other data or
    other weights never reuse a row; NaN weights are refused in one line."""
    model, X, Y = tiny
    run = gct.TrialRun("d", gc.trial_seeds(2, "d", 4), [None] * 4, [2, 8], ["displacement"],
                       n_samples=N, lr=0.05)
    with _store(tmp_path) as st:
        recs = gcr.run_trials(run, model, X, Y, st, keep_tensors=False)
        n_rows = st.conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        # edit one stored norm by hand (keeping valid JSON)
        key, text = st.conn.execute("SELECT key, payload_json FROM measurements").fetchone()
        edited = json.loads(text)
        edited["modes"]["displacement"]["norms"][0] *= 2
        st.conn.execute("UPDATE measurements SET payload_json = ? WHERE key = ?",
                        (json.dumps(edited), key))
        lines: list[str] = []
        again = gcr.run_trials(run, model, X, Y, st, keep_tensors=False, progress=lines.append)
        assert _measured(again) == _measured(recs)
        assert len([x for x in lines if "checksum" in x]) == 1
        # other data: new rows, old ones untouched
        X2 = X.clone()
        X2[0, 0] += 1
        gcr.run_trials(run, model, X2, Y, st, keep_tensors=False)
        assert st.conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 2 * n_rows
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad[0].weight[0, 0] = float("nan")
        with pytest.raises(BatchlabError, match="NaN"):
            gcr.run_trials(run, bad, X, Y, st, keep_tensors=False)
        with pytest.raises(BatchlabError, match="NaN"):
            gc.fit_state(copy.deepcopy(model), bad.state_dict())


def test_interrupted_run_resumes_to_the_chunk(tiny, tmp_path, monkeypatch):
    model, X, Y = tiny
    run = gct.TrialRun("fail", gc.trial_seeds(2, "fail", 6), [None] * 6, [1, 5],
                       ["displacement"], n_samples=N, lr=0.05, threads=2, chunk=1)
    real, calls = gc.run_trial_block, []

    def flaky(*a, **kw):
        calls.append(a[3])
        if len(calls) > 8:  # interrupted on the ninth trial
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gc, "run_trial_block", flaky)
    st = _store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "t")
    stored = st.conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
    assert 6 <= stored <= 8
    assert not leftovers(tmp_path) and len(list((tmp_path / "t").rglob("*.npy"))) == stored
    monkeypatch.setattr(gc, "run_trial_block", real)
    calls.clear()
    monkeypatch.setattr(gc, "run_trial_block", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    recs = gcr.run_trials(run, model, X, Y, st, tensor_dir=tmp_path / "t")
    assert sorted(recs) == [1, 5] and len(calls) == 12 - stored  # only the missing chunks
    st.close()


def test_same_samples_only_reorders(tiny):
    a = gc.sample_indices(200, N, seed=1, sample_seed=9)
    b = gc.sample_indices(200, N, seed=2, sample_seed=9)
    assert not torch.equal(a, b)
    assert torch.equal(a.sort().values, b.sort().values)
    assert not torch.equal(gc.sample_indices(200, N, 1).sort().values,
                           gc.sample_indices(200, N, 2).sort().values)


def test_sum_loss_blowups_are_recorded_not_raised(tiny, tmp_path):
    model, X, Y = tiny
    run = gct.TrialRun("blow", gc.trial_seeds(0, "blow", 2), [None] * 2, [12], list(gc.MODES),
                      n_samples=N, lr=2.0, blowup_loss=10.0)
    with _store(tmp_path) as st:
        rec = gcr.run_trials(run, model, X, Y, st, keep_tensors=False)[12]
    assert all(rec["modes"]["sum-loss"]["blowup"])  # second step at lr x 12 = 24 explodes
    assert not any(rec["modes"]["displacement"]["blowup"])  # same samples at lr 2: fine
    assert rec["modes"]["sum-loss"]["files"] is None
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


def _ctx(tmp_path, store, seeds=3, **opts):
    base = dict(trials=3, n_samples=64, batch_sizes=[1, 3, 16, 64], hidden=[32],
                early_epochs=1, late_epochs=2, decomp_sets=2, decomp_orders=2,
                decomp_batch_sizes=[4, 64])
    return Context(preset="quick", seeds=seeds, out_dir=tmp_path / "out", store=store,
                   options={**base, **opts})


def test_experiment_end_to_end(tmp_path):
    from batchlab.experiments.plan import make_plan

    with Store(tmp_path / "runs.db") as st:
        # the plan counts two checkpoint runs per seed (6: the early run and the late run that
        # continues it) and every trial of every checkpoint:
        # (3 trials x 4 b + 2 x 2 decomposition x 2 b) per regime, x 2 regimes x 3 seeds
        before = make_plan([("gradient-competition", _ctx(tmp_path, st))], 0.01).to_json()
        assert (before["runs"], before["trials"], before["trials_stored"]) == (6, 120, 0)
        assert before["projected_seconds"] > 0 and before["sgd_steps"] > 0
        out, path = run_experiment("gradient-competition", _ctx(tmp_path, st))
        after = make_plan([("gradient-competition", _ctx(tmp_path, st))], 0.01).to_json()
        assert (after["runs"], after["runs_stored"], after["trials"], after["trials_stored"]) \
            == (0, 6, 0, 120)
        # one trajectory per seed: each late run continued its seed's early run
        by = {(r.seed, r.config["epochs"]): r for r in st.runs()}
        assert [by[s, 2].env.get("continued_from") for s in range(3)] == \
            [by[s, 1].run_id for s in range(3)]
        assert {"norm_vs_b.png", "normalized_vs_b.png", "norm_hist_early.png",
                "value_hist.png", "results.csv", "summary.md", "claims.json",
                "trials.csv"} <= {p.name for p in path.iterdir()}
        fits = [r for r in out.rows if r["kind"] == "fit"]
        assert len(fits) == 6 and all(r["replicates"] == 3 for r in fits)
        # displacement = mean-loss gradient sum: shrinks with b (about 1/b for small lr)
        assert all(r["exponent"] < -0.5 for r in fits if r["mode"] == "displacement")
        doc = json.loads((path / "claims.json").read_text())
        assert check_document(doc) == []
        claims = {c["id"]: c for c in doc["claims"]}
        # eight claims per reading, three readings; S6's nested design has no sum-loss
        assert len(claims) == 3 * 8 - 1 and "sum-loss:which-samples-matter-at-large-b" not in claims
        assert {f for c in claims.values() for f in c["finding"].split(",")} == \
            {"S4", "S5", "S6", "S7", "S8", "S15"}
        # n = checkpoint seeds, never trials; one primary reading: sample-sum
        assert all(c["n"] == 3 for c in claims.values())
        assert all(c["primary"] == c["id"].startswith("sample-sum:") for c in claims.values())
        # the displacement reading's 1/b decides S4 and S15 by algebra: checks, not evidence
        for key, check in (("competition", "holds"), ("norm-grows-like-sqrt-b", "fails")):
            c = claims[f"displacement:{key}"]
            assert (c["verdict"], c["reason"]["code"], c["reason"]["check"]) == \
                ("untestable", "construction", check)
        # known direction: at lr 0.01 over 64 samples the trajectory hardly moves between
        # steps, so the per-sample sum hardly depends on b and sqrt(b) growth does not hold
        assert claims["sample-sum:norm-grows-like-sqrt-b"]["verdict"] == "not_reproduced"
        # two epochs of 4 steps is not late in training: S8 is untestable, with the reason
        s8 = claims["sample-sum:early-larger-than-late"]
        assert s8["verdict"] == "untestable" and s8["reason"]["code"] == "regime"
        assert "late" in s8["reason"]["text"] and not s8["gates"][0]["passed"]
        dec = [r for r in out.rows if r["kind"] == "decomposition"]
        assert dec and all(r["relative_spread"] >= 0 for r in dec)
        # a second run reuses every record (no training, no trials)
        out2, _ = run_experiment("gradient-competition", _ctx(tmp_path, st))
        assert [r.get("mean") for r in out2.rows] == [r.get("mean") for r in out.rows]
        # one seed: seed 0's stored checkpoint and trials, unbounded intervals, nothing decided
        one, p1 = run_experiment("gradient-competition", _ctx(tmp_path, st, seeds=1))
        doc1 = json.loads((p1 / "claims.json").read_text())
        assert check_document(doc1) == []
        assert all(c["n"] == 1 and c["verdict"] in ("inconclusive", "untestable")
                   for c in doc1["claims"])
        assert all(c["ci"][0] in (None, 0.0) and c["ci"][1] is None for c in doc1["claims"]
                   if c["verdict"] == "inconclusive")  # unbounded (a ratio's from 0)
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
        with pytest.raises(ConfigError, match="give both"):
            run_experiment("gradient-competition",
                           _ctx(tmp_path, st, checkpoint_early=str(bad)))
        with pytest.raises(BatchlabError, match="does not fit"):
            run_experiment("gradient-competition",
                           _ctx(tmp_path, st, checkpoint_early=str(bad),
                                checkpoint_late=str(bad)))


def test_checkpoints_without_kept_states_are_trained_again_to_the_same_claims(tmp_path):
    """The late checkpoint is read from its run's kept end state. With the states pruned (or
    a store from before runs kept them) the run is trained again keeping that epoch as a
    checkpoint, and the experiment's claims do not move."""
    from batchlab.runs.continuation import drop_states

    with Store(tmp_path / "runs.db") as st:
        _, path = run_experiment("gradient-competition", _ctx(tmp_path, st))
        before = (path / "claims.json").read_text()
        n, _ = drop_states(st, st.run_ids())
        assert n == 6
        _, path = run_experiment("gradient-competition", _ctx(tmp_path, st))
        assert (path / "claims.json").read_text() == before
        again = [r for r in st.runs() if r.label == "gradient-competition:checkpoint"]
        assert len(again) == 6 and all(r.config["checkpoint_epochs"] == [r.config["epochs"]]
                                       for r in again)


def test_ray_trains_one_run_per_seed_keeping_both_checkpoints(tmp_path):
    """Ray keeps no end state: there each seed's early and late checkpoints come from one run
    that keeps both, declared for both regimes and trained once."""
    from dataclasses import replace

    from batchlab.experiments import gradient_competition as G

    with Store(tmp_path / "runs.db") as st:
        ctx = prepared(G.NAME, replace(_ctx(tmp_path, st), executor="ray"))
        per_seed = G.checkpoint_configs(ctx, G.options(ctx))
    assert len(per_seed) == 3
    for c in per_seed:
        assert c["early"] == c["late"] and c["late"].checkpoint_epochs == [1, 2]


def test_plan_cli_prints_one_json_object(tmp_path, run_main, capsys):
    opts = ["--set", "trials=2", "--set", "n_samples=32", "--set", "batch_sizes=[1,32]",
            "--set", "hidden=[8]", "--set", "early_epochs=1", "--set", "late_epochs=2",
            "--set", "decomp_sets=2", "--set", "decomp_orders=2",
            "--set", "decomp_batch_sizes=[32]"]
    code = run_main("experiment", "gradient-competition", "--plan", "--json", "--store",
                    tmp_path / "r.db", "--out", tmp_path / "out", *opts)
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"projected_seconds", "sgd_steps", "flops"} <= set(plan)
    # per checkpoint seed (3 by default): 2 regimes x (2 trials x 2 b + 4 decomposition x 1 b)
    assert plan["trials"] == 3 * 2 * (2 * 2 + 4 * 1) and plan["runs"] == 3 * 2  # early + late
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))
    assert "fastest" in plan["probe_rule"] and "cpu_load" in plan


def test_probe_keeps_the_fastest_block(monkeypatch):
    """A busy CPU slows some blocks of a timing; the probe keeps the fastest, so a burst of
    load at the start does not inflate the projection; and a job that keeps the probe off the
    cores (wall time passes, CPU time does not) inflates nothing (fake clocks: no real timing)."""
    import batchlab.experiments.plan_timing as pp

    threads = pp.torch.get_num_threads()
    wall, cpu = [0.0], [0.0]
    monkeypatch.setattr(pp.time, "perf_counter", lambda: wall[0])
    monkeypatch.setattr(pp.time, "process_time", lambda: cpu[0])
    calls = [0]

    def work(descheduled: bool) -> None:  # the first 4 timed calls: 10x slower wall time
        calls[0] += 1
        slow = calls[0] <= 2 + 4
        wall[0] += 0.1 if slow else 0.01
        cpu[0] += threads * (0.01 if descheduled or not slow else 0.1)

    t = pp.seconds_per_call(lambda: work(False), pp.torch.device("cpu"), min_seconds=0.5, warmup=2, blocks=5)
    assert t == pytest.approx(0.01)
    mean_rule = (4 * 0.1 + 0.01 * 10) / 14  # what one long block would have reported
    assert t < mean_rule / 3
    calls[0] = 0  # sustained: every block's wall time is slow, its CPU time is not
    wall[0] = cpu[0] = 0.0

    def busy() -> None:
        wall[0] += 0.1
        cpu[0] += threads * 0.01

    assert pp.seconds_per_call(busy, pp.torch.device("cpu"), min_seconds=0.5, blocks=5) == pytest.approx(0.01)



def test_plan_counts_unusable_stored_weights_as_to_do_but_hides_no_bug(tmp_path):
    """Weights that do not fit (another shape) are the real run's error to report: the plan
    counts their trials as to do. Anything else (here a non-tensor) is a bug and propagates."""
    from batchlab.engine.setup import get_data
    from batchlab.experiments import gradient_competition as G
    from batchlab.experiments.plan_trials import _stored_chunks

    with Store(tmp_path / "runs.db") as st:
        ctx = prepared(G.NAME, _ctx(tmp_path, st))
        o = G.options(ctx)
        cfg = G.checkpoint_config(ctx, o, 0)
        td = get_data(cfg, torch.device("cpu"))
        run = G.trial_runs(o, "early", 0)[0]
        cpu = torch.device("cpu")
        assert _stored_chunks(ctx, run, cfg, {"w": torch.zeros(2)}, cpu, td) == {}
        junk = {k: "not a tensor" for k in build_mlp(td.input_dim, [32], td.n_classes)
                .state_dict()}
        with pytest.raises(AttributeError):
            _stored_chunks(ctx, run, cfg, junk, cpu, td)


@pytest.mark.parametrize("error, swallowed", [
    (KeyError("epoch0002"), True),  # the stored run lacks that checkpoint
    (BatchlabError("checkpoint is damaged"), True),  # a missing, damaged or NaN file
    (RuntimeError("a bug while loading"), False),
])
def test_plan_counts_only_missing_or_damaged_checkpoints_as_to_do(tmp_path, monkeypatch, error,
                                                                 swallowed):
    """The stored checkpoint run's weights: a checkpoint it lacks or a file that cannot be
    used makes the plan count that seed's trials as to do; any other error propagates."""
    from batchlab.experiments import gradient_competition as G
    from batchlab.experiments.plan_trials import _stored_states

    class Stored:
        def checkpoint(self, epoch: int) -> dict:
            raise error

    monkeypatch.setattr(Context, "run_many", lambda self, cfgs, label: [Stored()])
    with Store(tmp_path / "runs.db") as st:
        ctx = prepared(G.NAME, _ctx(tmp_path, st))
        cfg = G.checkpoint_config(ctx, G.options(ctx), 0)
        if swallowed:
            assert _stored_states(ctx, cfg, object(), [1, 2]) == {}
        else:
            with pytest.raises(RuntimeError, match="a bug"):
                _stored_states(ctx, cfg, object(), [1, 2])


# -- the claims on planted records (no training) --------------------------------------------
def _record(norms, values, blowup=None):
    """A trial record of every mode: `norms[m]` per trial, `values[m]` [trials, width]."""
    from batchlab.analysis.gradcomp_stats import ValueStats

    modes = {}
    for m, v in norms.items():
        flags = blowup.get(m, [False] * len(v)) if blowup else [False] * len(v)
        vs = ValueStats(scale=1.0)
        vs.update(values[m][~np.asarray(flags)])
        modes[m] = {"norms": [float(x) for x in v], "max_loss": [1.0] * len(v),
                    "blowup": list(flags), "values": vs.to_json()}
    return {"trials": len(next(iter(norms.values()))), "seconds": 0.0, "k": 1,
            "engine": "deferred", "modes": modes}


def _planted(seeds=3, late_acc=0.97, bs=(1, 4, 16, 64), n=64, diverge_at=None):
    """Replicates whose sample-sum norm grows like sqrt(b) (the study's S4), displacement =
    sample-sum / b (the algebra), sum-loss = sample-sum with `diverge_at` = (b, trials)
    diverged in the early regime (planted with a huge norm that must not count)."""
    from batchlab.experiments.gradient_competition_claims import Replicate

    g = np.random.default_rng(7)
    reps = []
    for s in range(seeds):
        rep = Replicate(s, {}, {}, late_acc)
        for regime, scale in (("early", 2.0), ("late", 1.0)):
            rep.recs[regime] = {}
            for b in bs:
                base = scale * math.sqrt(b) * (1 + 0.02 * g.standard_normal(4)) * (1 + 0.03 * s)
                vals = g.standard_normal((4, 50)) * base[:, None] / math.sqrt(50)
                norms = {"displacement": base / b, "sample-sum": base, "sum-loss": base.copy()}
                values = {"displacement": vals / b, "sample-sum": vals, "sum-loss": vals.copy()}
                blow = {}
                if diverge_at and regime == "early" and b == diverge_at[0]:
                    k = diverge_at[1]
                    norms["sum-loss"][:k] = 1e9
                    values["sum-loss"][:k] = 1e9
                    blow = {"sum-loss": [True] * k + [False] * (4 - k)}
                rep.recs[regime][b] = _record(norms, values, blow)
            rep.decomp[regime] = {}
            for b in (1, n):  # 2 sets x 2 orders; sets differ more at the large batch
                set_effect = np.repeat(np.array([1.0, 1.0 + 0.2 * (b == n)]), 2)
                base = scale * set_effect * (1 + 0.001 * g.standard_normal(4))
                vals = g.standard_normal((4, 50))
                rep.decomp[regime][b] = _record({"displacement": base / b, "sample-sum": base},
                                                {"displacement": vals, "sample-sum": vals})
        reps.append(rep)
    return reps


def _claims(reps, modes=tuple(gc.MODES)):
    from batchlab.experiments.claims import claims_document
    from batchlab.experiments.gradient_competition_claims import Design, claims_for

    claims, table = claims_for(reps, Design(list(modes), 2, 2))
    doc = claims_document([c.to_json() for c in claims])
    assert check_document(json.loads(json.dumps(doc))) == []
    return {c.id: c for c in claims}, table


def test_reading_table_states_every_reading_beside_its_algebra():
    claims, table = _claims(_planted())
    rows = {(r["claim"], r["reading"]): r for r in table}
    for key in ("larger-batch-larger-step", "norm-grows-like-sqrt-b", "competition"):
        assert {m for (k, m) in rows if k == key} == set(gc.MODES)
        assert [rows[(key, m)]["algebra"] for m in gc.MODES] == [-1.0, 0.0, 0.0]
        # displacement's exponent is its algebra's 1/b: a check, never evidence
        d = claims[f"displacement:{key}"]
        assert d.verdict == "untestable" and d.reason["code"] == "construction"
        assert claims[f"sample-sum:{key}"].primary and not claims[f"sum-loss:{key}"].primary
    # sample-sum grows like sqrt(b) here: S4 reproduced, S15 (competition) not, in the
    # primary reading; the displacement check says S15 "holds" - the verdict depends on it
    assert claims["sample-sum:norm-grows-like-sqrt-b"].verdict == "reproduced"
    assert claims["sample-sum:competition"].verdict == "not_reproduced"
    assert claims["displacement:competition"].reason["check"] == "holds"
    assert claims["sample-sum:competition"].evidence["depends_on_reading"] is True
    # ... but only through the algebra's check: the readings the data decide agree
    assert claims["sample-sum:competition"].evidence["depends_on_data_reading"] is False
    assert rows[("competition", "displacement")]["data_outcome"] == "reproduced"
    # S6 on the relative spread across sample sets: larger at the large batch
    assert claims["sample-sum:which-samples-matter-at-large-b"].interval.estimate > 0
    # S7's centre in sample-sum: the same scale at every b up to sqrt(64) = 8: not similar
    assert claims["sample-sum:centre-similar"].verdict == "not_reproduced"
    assert rows[("centre-similar", "displacement")]["algebra"] == pytest.approx(1 / 64)


def test_diverged_trials_are_excluded_and_counted():
    clean, _ = _claims(_planted())
    claims, _ = _claims(_planted(diverge_at=(16, 3)))
    div = claims["sum-loss:larger-batch-larger-step"].evidence["diverged"]
    assert div["diverged"] == 3 * 3 and div["trials"] == 3 * 2 * 4 * 4
    assert {(x["regime"], x["b"], x["diverged"]) for x in div["by"]} == {("early", 16, 3)}
    assert claims["sample-sum:larger-batch-larger-step"].evidence["diverged"]["diverged"] == 0
    # the planted 1e9 norms are not in the statistic: the exponent stays near 0.5
    est = claims["sum-loss:norm-grows-like-sqrt-b"].interval.estimate
    assert est == pytest.approx(clean["sum-loss:norm-grows-like-sqrt-b"].interval.estimate,
                                abs=0.05)


def test_s8_leaves_out_a_batch_size_where_every_trial_diverged():
    claims, _ = _claims(_planted(diverge_at=(16, 4)))
    c = claims["sum-loss:early-larger-than-late"]
    # b = 16 has no kept early trial in sum-loss: left out and listed, n stays the seeds
    assert c.interval.n == 3 and c.evidence["dropped_b"] == [16]
    assert 16 not in c.evidence["by_b"] and c.verdict == "reproduced"
    assert claims["sample-sum:early-larger-than-late"].evidence["dropped_b"] == []


def test_one_checkpoint_is_unbounded_and_decides_nothing():
    claims, _ = _claims(_planted(seeds=1))
    for c in claims.values():
        assert c.interval.n == 1
        assert c.verdict in ("inconclusive", "untestable"), c.id
        if c.reason is None:  # unbounded on its scale (a ratio's is [0, inf])
            assert c.interval.lo in (-math.inf, 0.0) and c.interval.hi == math.inf, c.id


def test_s8_is_gated_on_a_late_checkpoint():
    early_train, _ = _claims(_planted(late_acc=0.6))
    late_train, _ = _claims(_planted(late_acc=0.97))
    c = early_train["sample-sum:early-larger-than-late"]
    assert c.verdict == "untestable" and c.reason["code"] == "regime"
    assert "train accuracy at the late checkpoint" in c.reason["text"]
    # early norms are twice the late ones here, at every b
    assert late_train["sample-sum:early-larger-than-late"].verdict == "reproduced"


def test_value_stats_median_and_common_threshold():
    from batchlab.analysis.gradcomp_stats import ValueStats

    g = np.random.default_rng(1)
    v = g.standard_normal(5000) * 3e-3
    a, b = ValueStats(scale=1.0), ValueStats(scale=1.0)
    a.update(v[:2000])
    b.update(v[2000:])
    s = a.merge(b)
    assert s.median_abs() == pytest.approx(float(np.median(np.abs(v))), rel=0.03)
    frac, edge = s.fraction_above(9e-3)
    assert 9e-3 <= edge < 9e-3 * 1.13
    assert frac == float(np.mean(np.abs(v) >= edge))


def test_relative_spread_is_not_one_by_construction():
    from batchlab.experiments.gradient_competition_stats import decompose, relative_spread

    # at b = n the order does not matter: the share of variance due to the sample set is 1
    # whatever the sets do, while the relative spread says how much they differ
    g = np.array([[10.0, 10.0], [10.1, 10.1], [9.9, 9.9]])
    assert decompose(g, 3, 2)["share_samples"] == pytest.approx(1.0)
    assert relative_spread(g, 3, 2) == pytest.approx(0.01)


@pytest.mark.parametrize("backend, key", [
    ("deferred", "b93830cda037dcbf4a421ba2e14d26aa2c7aca32eb021d149592f53d64b7fb46"),
    ("fused", "d6437165ebf06ac984760c09c7aa6d27f695ca8cdd3a995b0beefee2220affad"),
])
def test_chunk_keys_keep_their_stored_engine_name(backend: str, key: str) -> None:
    """The trial backend is stored as "engine" (its name before the package called it a
    backend): a chunk's key is what it was then, so stored chunks are still found."""
    from batchlab.analysis.gradcomp_runner import KIND
    from batchlab.runs.measurements import spec_key

    task = gct.ChunkTask(b=4, start=0, stop=2, seeds=(11, 12), sample_seeds=(None, 7),
                         modes=("displacement", "sum-loss"), n_samples=64, lr=0.01,
                         blowup_loss=100.0, k=1, backend=backend, scales=None)
    spec = task.spec("w" * 64, "d" * 64, "cpu")
    assert spec["engine"] == backend and "backend" not in spec
    assert spec_key(KIND, spec) == key
