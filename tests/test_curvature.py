"""batchlab.measure.curvature against the exact Hessian of tiny MLPs (float64, 5-4-3)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.measure import curvature as C
from batchlab.nn.models import build_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_mlp(5, [4], 3, init="torch", seed=1).double()
    X = torch.randn(64, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    obj = C.Objective(model, (X, y), batch_size=16)  # chunked: 4 chunks

    def f(theta: torch.Tensor) -> torch.Tensor:
        return obj.batch_loss(theta, X, y) / len(y)

    H = torch.autograd.functional.hessian(f, obj.theta)
    return model, (X, y), obj, H


def test_hvp_matches_exact_hessian(tiny):
    _, _, obj, H = tiny
    v = torch.randn(obj.dim, dtype=torch.float64)
    assert torch.allclose(obj.hvp(v), H @ v, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues(tiny, method):
    model, data, _, H = tiny
    exact = torch.linalg.eigvalsh(H).flip(0)
    res = C.hessian_eigenvalues(model, data, k=2, method=method, tol=1e-8, max_iter=1000,
                                batch_size=16, return_vectors=True)
    assert res.converged
    for got, want in zip(res.eigenvalues, exact[:2].tolist()):
        assert abs(got - want) <= 1e-4 * abs(want)
    v = res.eigenvectors[0]
    assert torch.allclose(H @ v, res.top * v, atol=1e-4)


def test_lanczos_needs_fewer_products_than_power(tiny):
    model, data, _, _ = tiny
    lz = C.hessian_eigenvalues(model, data, tol=1e-6, max_iter=500)
    pw = C.hessian_eigenvalues(model, data, tol=1e-6, max_iter=500, method="power")
    assert lz.n_hvp < pw.n_hvp


def test_per_layer_matches_block_hessians(tiny):
    model, data, _, H = tiny
    res = C.hessian_eigenvalues(model, data, per_layer=True, tol=1e-8, max_iter=200)
    assert list(res) == ["layer1", "layer2"]
    sizes = [5 * 4 + 4, 4 * 3 + 3]
    start = 0
    for name, n in zip(res, sizes):
        block = H[start:start + n, start:start + n]
        want = float(torch.linalg.eigvalsh(block)[-1])
        assert abs(res[name].top - want) <= 1e-4 * abs(want)
        start += n


def test_trace_hutchinson(tiny):
    model, data, _, H = tiny
    exact = float(H.trace())
    tr = C.hessian_trace(model, data, n_samples=1000, seed=3, probes_per_pass=250)
    assert abs(tr.estimate - exact) <= 0.05 * abs(exact)
    assert tr.stderr > 0
    assert abs(tr.estimate - exact) <= 5 * tr.stderr
    again = C.hessian_trace(model, data, n_samples=1000, seed=3, probes_per_pass=250)
    assert again.estimate == tr.estimate  # deterministic given the seed


def test_spectral_density(tiny):
    model, data, obj, H = tiny
    ev = torch.linalg.eigvalsh(H)
    d = C.spectral_density(model, data, n_vectors=3, n_steps=obj.dim, seed=0)
    mass = float(np.trapezoid(d.density, d.grid))
    assert abs(mass - 1) < 1e-3
    nodes = d.nodes[np.isfinite(d.nodes)]
    assert nodes.min() >= float(ev[0]) - 1e-6 and nodes.max() <= float(ev[-1]) + 1e-6
    np.testing.assert_allclose(d.weights.sum(1), 1.0, atol=1e-8)


def test_deflated_density_whole_space_is_exact(tiny):
    """A Krylov block as large as the space is the exact spectrum, weight 1/n per eigenvalue
    (this Hessian has a repeated zero eigenvalue, so the block stops at an invariant subspace
    and the probes take the eigenspace left over, which they then also resolve exactly)."""
    model, data, obj, H = tiny
    ev = torch.linalg.eigvalsh(H).numpy()
    d = C.spectral_density(model, data, n_vectors=2, n_steps=obj.dim, deflate=obj.dim, seed=0)
    atoms, p = d.measure()
    assert C.wasserstein1(atoms, p, ev, np.ones_like(ev)) < 1e-8
    assert 0 < d.deflated < obj.dim and d.w1_bound < 1e-8
    assert abs(float(np.trapezoid(d.density, d.grid)) - 1) < 1e-3


def test_deflated_density_is_close_and_bounded(tiny):
    """A partial block plus probes on its complement: the mixture is a probability measure,
    the reported bound is 2 beta_{k+1} / n, and with complete Lanczos runs on the complement
    the only error left is the probes' weights, which many probes average out."""
    model, data, obj, H = tiny
    ev = torch.linalg.eigvalsh(H).numpy()
    k = 10
    d = C.spectral_density(model, data, n_vectors=200, n_steps=obj.dim - k, deflate=k, seed=1)
    atoms, p = d.measure()
    assert d.deflated == k and abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(d.mass[0], k / obj.dim)
    assert atoms.min() >= ev[0] - 1e-8 and atoms.max() <= ev[-1] + 1e-8
    assert 0 < d.w1_bound < 2 * float(np.abs(ev).max()) * 2 / obj.dim
    scale = float(np.abs(ev).mean())
    err = C.wasserstein1(atoms, p, ev, np.ones_like(ev))
    assert err <= 0.05 * scale + d.w1_bound


def test_wasserstein1_is_the_area_between_cdfs():
    assert C.wasserstein1(np.array([0.0]), np.array([1.0]), np.array([2.0]), np.array([5.0])) == 2.0
    # half the mass moved by 1, and unnormalized weights are normalized
    assert C.wasserstein1(np.array([0.0, 1.0]), np.array([1.0, 1.0]), np.array([0.0, 0.0]),
                          np.array([3.0, 3.0])) == pytest.approx(0.5)


def test_deflate_must_be_non_negative(tiny):
    model, data, _, _ = tiny
    with pytest.raises(ConfigError, match="deflate"):
        C.spectral_density(model, data, deflate=-1)


def test_sharpness_nonnegative_and_monotone(tiny):
    model, data, _, _ = tiny
    full = [C.sharpness(model, data, epsilon=e).sharpness for e in (1e-4, 1e-3, 1e-2)]
    sub = [C.sharpness(model, data, epsilon=e, subspace_dim=5, seed=1).sharpness
           for e in (1e-4, 1e-3, 1e-2)]
    for s in (full, sub):
        assert s[0] <= s[1] <= s[2]
        assert s[2] > 0
    # the value itself: for a small box the loss is ~linear, so its maximum sits at the corner
    # sign(g) and phi ~ 100 eps sum_i |g_i| (|x_i| + 1) / (1 + f): the maximizer must find it
    obj = C.Objective(model, data)
    theta = obj.theta.detach()
    f, g = obj.loss_and_grad(theta)
    eps = 1e-4
    first_order = float(100 * eps * (g.abs() * (theta.abs() + 1)).sum() / (1 + f))
    assert full[0] == pytest.approx(first_order, rel=0.05)


def test_interpolate_endpoints(tiny):
    model, data, _, _ = tiny
    other = build_mlp(5, [4], 3, init="torch", seed=2).double()
    rows = C.interpolate(model, other, data, data, [0.0, 0.5, 1.0])
    from batchlab.measure.metrics import evaluate

    la, _ = evaluate(model, *data)
    lb, _ = evaluate(other, *data)
    assert rows[0]["train_loss"] == pytest.approx(float(la))
    assert rows[-1]["test_loss"] == pytest.approx(float(lb))


def test_bad_inputs(tiny):
    model, (X, y), obj, _ = tiny
    logits = nn.Sequential(nn.Linear(5, 3)).double()
    with pytest.raises(ConfigError, match="log-probabilities"):
        C.hessian_eigenvalues(logits, (X, y))
    with pytest.raises(ConfigError, match="empty"):
        C.hessian_trace(model, (X[:0], y[:0]))
    with pytest.raises(ConfigError, match="epsilon"):
        C.sharpness(model, (X, y), epsilon=0)
    with pytest.raises(ConfigError, match="larger than the number of parameters"):
        C.hessian_eigenvalues(model, (X, y), k=obj.dim + 1)
    with pytest.raises(ConfigError, match="method"):
        C.hessian_eigenvalues(model, (X, y), method="qr")


def test_nonconvergence_is_reported(tiny):
    model, data, _, _ = tiny
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = C.hessian_eigenvalues(model, data, method="power", tol=1e-14, max_iter=3)
    assert not res.converged and res.residuals[0] > 0
    with pytest.raises(C.ConvergenceError, match="residual"):
        C.hessian_eigenvalues(model, data, method="power", tol=1e-14, max_iter=3,
                              on_fail="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.hessian_eigenvalues(model, data, tol=1e-6, max_iter=200)  # converges: no warning


def test_cached_graph_hvp_equals_recomputed(tiny):
    model, data, _, H = tiny
    graph = C.Objective(model, data, mode="graph", probes_per_pass=8)
    chunked = C.Objective(model, data, batch_size=16, mode="chunked", probes_per_pass=8)
    assert graph.mode == "graph" and chunked.mode == "chunked"
    V = torch.randn(5, graph.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for obj in (graph, chunked):
        many = obj.hvp_many(V)  # batched probes (is_grads_batched)
        one = torch.stack([obj.hvp(v) for v in V])  # one product at a time, graph reused
        torch.testing.assert_close(many, one, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(many, V @ H, atol=1e-12, rtol=1e-10)


def test_memory_rule_picks_the_mode(tiny):
    model, data, _, _ = tiny
    roomy = C.Objective(model, data)
    assert roomy.mode == "graph" and roomy.per_sample > 0
    tight = C.Objective(model, data, memory_budget=math.ceil(roomy.per_sample * 2 * 10))
    assert tight.mode == "chunked" and tight.chunk == 10
    assert tight.max_probes() == 1  # a second probe would not fit beside a chunk's graph
    v = torch.randn(roomy.dim, dtype=torch.float64)
    torch.testing.assert_close(tight.hvp(v), roomy.hvp(v), atol=1e-12, rtol=1e-10)


def test_logits_with_cross_entropy_equal_log_softmax_with_nll(tiny):
    model, data, _, _ = tiny
    assert isinstance(model[-1], nn.LogSoftmax)
    logits = nn.Sequential(*list(model)[:-1])  # the same parameters, without the LogSoftmax
    ce = nn.CrossEntropyLoss()
    a = C.hessian_eigenvalues(model, data, k=2, tol=1e-8, max_iter=200)
    b = C.hessian_eigenvalues(logits, data, k=2, tol=1e-8, max_iter=200, criterion=ce)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)
    ta = C.hessian_trace(model, data, n_samples=16, seed=1)
    tb = C.hessian_trace(logits, data, n_samples=16, seed=1, criterion=ce)
    assert ta.estimate == pytest.approx(tb.estimate, rel=1e-10)
    with pytest.raises(ConfigError, match="CrossEntropyLoss"):
        C.hessian_trace(logits, data, n_samples=4)  # logits need the criterion
    with pytest.raises(ConfigError, match="reduction"):
        C.hessian_trace(logits, data, criterion=nn.CrossEntropyLoss(reduction="sum"))


def test_dataloader_equals_tensors(tiny):
    from torch.utils.data import DataLoader, TensorDataset

    model, (X, y), _, _ = tiny
    loader = DataLoader(TensorDataset(X, y), batch_size=24)  # uneven batches: 24, 24, 16
    v = torch.randn(X.shape[1] * 4 + 4 + 4 * 3 + 3, dtype=torch.float64)
    want = C.Objective(model, (X, y)).hvp(v)
    gathered = C.Objective(model, loader)  # fits: gathered once, graph kept
    streamed = C.Objective(model, loader, memory_budget=1)  # streamed batch by batch
    assert gathered.mode == "graph" and streamed.mode == "chunked" and streamed.n == 64
    for obj in (gathered, streamed):
        torch.testing.assert_close(obj.hvp(v), want, atol=1e-12, rtol=1e-10)
    a = C.hessian_eigenvalues(model, (X, y), k=2, tol=1e-8, max_iter=200)
    b = C.hessian_eigenvalues(model, loader, k=2, tol=1e-8, max_iter=200, memory_budget=1)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)
    with pytest.raises(ConfigError, match="pair"):
        C.hessian_trace(model, [X])


def test_lock_step_lanczos_equals_single_runs(tiny):
    _, _, obj, _ = tiny
    gen = torch.Generator().manual_seed(4)
    V0 = torch.randn(3, obj.dim, dtype=torch.float64, generator=gen)
    runs = C.lanczos_many(obj.hvp_many, V0, 12)
    for v0, (alpha, beta) in zip(V0, runs):
        a1, b1, _, _, _ = C.lanczos(obj.hvp, v0, 12)
        np.testing.assert_allclose(alpha, a1, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(beta, b1, rtol=1e-9, atol=1e-12)


def test_pyhessian_interface(tiny):
    model, data, _, H = tiny
    exact = torch.linalg.eigvalsh(H).flip(0)
    h = C.Hessian(model, nn.NLLLoss(), data=data)
    vals, vecs = h.eigenvalues(maxIter=200, tol=1e-10, top_n=3)
    np.testing.assert_allclose(vals, exact[:3].numpy(), rtol=1e-6)
    assert [v.shape for v in vecs[0]] == [p.shape for p in model.parameters()]
    samples = h.trace(maxIter=50, tol=1e-3)
    means = np.cumsum(samples) / np.arange(1, len(samples) + 1)
    assert len(samples) == 50 or abs(means[-1] - means[-2]) < 1e-3 * (abs(means[-2]) + 1e-6)
    assert all(abs(b - a) >= 1e-3 * (abs(a) + 1e-6) for a, b in zip(means[:-2], means[1:-1]))
    eig, w = h.density(iter=10, n_v=2)
    assert len(eig) == len(w) == 2 and len(eig[0]) == 10
    np.testing.assert_allclose([sum(r) for r in w], 1.0, atol=1e-8)
    with pytest.raises(ConfigError, match="exactly one"):
        C.Hessian(model, nn.NLLLoss())
