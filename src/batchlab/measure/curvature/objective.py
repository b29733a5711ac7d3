"""The loss over a data set as a function of a flat parameter vector, and its exact
Hessian-vector products.

Two ways to compute H v, chosen by a memory rule (`Objective.mode`):

- "graph" (the data fit in memory as one chunk): one forward and one backward with
  `create_graph=True` build the gradient graph once; every product is then a double backward
  through it, `torch.autograd.grad(grads, params, v, retain_graph=True)`, as PyHessian does
  with a single batch. Nothing is recomputed between products.
- "chunked" (they do not): every product re-runs, per chunk, the forward, the backward with
  `create_graph=True` and the double backward, then frees that chunk's graph, as PyHessian's
  `full_dataset` mode does; memory is one chunk's graph whatever the data size.

Several products (`hvp_many`, used by the Hutchinson trace and the lock-step Lanczos runs of the
spectral density) can go through one double backward with `is_grads_batched=True`, b probes per
pass (`probes_per_pass`). Chunked, the b products share each chunk's forward and backward, which
saves work. With the graph kept there is nothing left to share: the double backward is ~90%
matrix multiplies whose FLOPs are the same batched or not, and on a CPU thread the batched
kernels measured ~15% slower per product (benchmarks/curvature.py prints the profile), so the
default is b = 1 there on the CPU and b = 8 otherwise (chunked, or on a GPU, where one launch
for b products saves kernel-launch overhead).

Memory rule. The retained graph is measured, not guessed: `saved_tensors_hooks` record the
bytes autograd saves for a forward + create_graph backward on up to 64 samples (parameters
excluded), which scales linearly with the samples: `per_sample` bytes. A product of b probes
needs about (1 + b) graphs' worth (the kept graph plus the double backward's temporaries), so
the data are one chunk ("graph") when n * per_sample * 2 <= memory_budget (default 1 GiB), and
otherwise chunks of memory_budget / (2 per_sample) samples; probes are then batched only as far
as (1 + b) * chunk * per_sample <= memory_budget allows. An explicit `batch_size` overrides the
chunk size (one chunk, hence "graph", when the data are no larger).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from batchlab.errors import ConfigError, DataError

DEFAULT_CHUNK = 4096  # samples per chunk for plain evaluations (interpolation)
DEFAULT_MEMORY = 1 << 30  # bytes the Hessian-vector products may hold at once
Data = tuple[torch.Tensor, torch.Tensor]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nll_criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: mean negative log-likelihood of log-probability outputs."""
    return F.nll_loss(out, y)


def check_pair(data: object) -> Data:
    """An (X, y) pair of tensors with matching, non-zero lengths, or a one-line ConfigError."""
    try:
        x, y = data  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ConfigError("data must be an (X, y) pair of tensors or a DataLoader of pairs") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError("data must be an (X, y) pair of tensors or a DataLoader of pairs")
    if x.shape[0] == 0:
        raise ConfigError("data is empty: curvature needs at least one sample")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"X has {x.shape[0]} samples but y has {y.shape[0]}")
    return x, y


def is_pair(data: object) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data))


@torch.no_grad()
def check_log_probs(model: nn.Module, x: torch.Tensor, tol: float = 1e-3) -> None:
    """With the default NLL criterion the outputs must be log-probabilities (each row's
    logsumexp ~ 0), not logits or probabilities."""
    out = model(x[:256])
    if out.ndim != 2:
        raise ConfigError(f"model must return (batch, classes) log-probabilities, got shape "
                          f"{tuple(out.shape)}")
    dev = float(torch.logsumexp(out.double(), dim=1).abs().max())
    if not math.isfinite(dev) or dev > tol:
        raise ConfigError("model outputs are not log-probabilities (logsumexp of a row is "
                          f"{dev:.3g}, not 0): end the model with LogSoftmax, or pass "
                          "criterion=nn.CrossEntropyLoss() for a logits model")


class Objective:
    """Mean loss of `model` over `data` as a function of a flat vector of (some of) its
    parameters; the others are held fixed at their current values.

    data: an (X, y) pair of tensors, or an iterable of (X, y) batches (a DataLoader) that
    yields the same samples on every pass. criterion(outputs, targets) must return the mean
    loss over the batch (`nn.CrossEntropyLoss()` for logits); default: NLL of log-probabilities.
    `names` selects the parameters that form the vector (all trainable ones by default), so the
    same code gives the full Hessian and any diagonal block of it. `mode`: "auto" (the memory
    rule of the module docstring), "graph" or "chunked". `probes_per_pass`: products per
    double backward in `hvp_many` (default: see the module docstring).
    """

    def __init__(self, model: nn.Module, data: Data | Iterable[Data], *,
                 criterion: Criterion | None = None, names: Sequence[str] | None = None,
                 batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY,
                 mode: str = "auto", probes_per_pass: int | None = None) -> None:
        if batch_size is not None and int(batch_size) <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive, got {memory_budget}")
        if mode not in ("auto", "graph", "chunked"):
            raise ConfigError(f"mode must be auto, graph or chunked, got {mode!r}")
        if criterion is not None and getattr(criterion, "reduction", "mean") != "mean":
            raise ConfigError("criterion must average over the batch (reduction='mean')")
        self.model = model
        self.criterion = criterion or nll_criterion
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        self.names = list(names) if names is not None else list(params)
        unknown = [k for k in self.names if k not in params]
        if unknown:
            raise ConfigError(f"unknown parameter names {unknown[:3]}")
        self.fixed = {k: v for k, v in params.items() if k not in self.names}
        self.buffers = {k: b.detach() for k, b in model.named_buffers()}
        self.shapes = [params[k].shape for k in self.names]
        self.numels = [params[k].numel() for k in self.names]
        self.theta = torch.cat([params[k].reshape(-1) for k in self.names])
        self.dim = int(self.theta.numel())
        self.budget = int(memory_budget)
        self.n_hvp = 0
        self._graph: tuple[list[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        self._setup_data(data, criterion is None, batch_size, mode)
        if probes_per_pass is not None and probes_per_pass < 1:
            raise ConfigError(f"probes_per_pass must be at least 1, got {probes_per_pass}")
        cpu_graph = self.mode == "graph" and self.theta.device.type == "cpu"
        self.probes_per_pass = probes_per_pass or (1 if cpu_graph else 8)

    # ------------------------------------------------------------------ data and memory rule
    def _setup_data(self, data: object, check: bool, batch_size: int | None, mode: str) -> None:
        self.loader: Iterable[Data] | None = None
        if is_pair(data) or not isinstance(data, Iterable):
            self.x, self.y = check_pair(data)
            first = (self.x, self.y)
        else:
            self.loader = data
            first = check_pair(next(iter(data), None))
            self.x, self.y = first
        if check:
            check_log_probs(self.model, first[0])
        self.per_sample = self.graph_bytes_per_sample(*first)
        if self.loader is not None:
            self.n = sum(int(check_pair(b)[1].shape[0]) for b in self.loader)
        else:
            self.n = int(self.x.shape[0])
        fit = max(1, int(self.budget // (2 * self.per_sample)))
        self.chunk = int(batch_size) if batch_size is not None else fit
        single = self.n <= self.chunk
        self.mode = mode if mode != "auto" else ("graph" if single else "chunked")
        if self.loader is not None and (self.mode == "graph" or batch_size is not None):
            self.x, self.y = self._gather()  # it fits (or the user chose the chunks): tensors
            self.loader = None
        if self.mode == "graph":
            self.chunk = max(self.chunk, self.n)
        elif self.loader is not None:  # streamed: the loader's batches are the chunks
            self.chunk = int(first[1].shape[0])

    def _gather(self) -> Data:
        xs, ys = zip(*(check_pair(b) for b in self.loader or ()))
        return torch.cat(xs), torch.cat(ys)

    def graph_bytes_per_sample(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Bytes autograd saves per sample for the gradient graph (forward + create_graph
        backward), measured with saved_tensors_hooks on up to 64 samples; parameters,
        buffers and the inputs themselves are not counted."""
        m = min(int(x.shape[0]), 64)
        own = {t.untyped_storage().data_ptr() for t in
               [*self.fixed.values(), *self.buffers.values(), self.theta, x, y]}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in own:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._grads(self._leaves(self.theta), x[:m], y[:m], 1.0)
        return max(sum(seen.values()) / m, 1.0)

    def chunks(self, size: int | None = None) -> Iterator[Data]:
        """The data in chunks of `size` samples (default: the memory rule's chunk), or the
        loader's own batches."""
        if self.loader is not None:
            seen = 0
            for b in self.loader:
                xb, yb = check_pair(b)
                seen += int(yb.shape[0])
                yield xb, yb
            if seen != self.n:
                raise DataError(f"the data loader yielded {seen} samples, then {self.n}: it must "
                                "yield the same samples on every pass")
            return
        size = size or self.chunk
        yield from zip(self.x.split(size), self.y.split(size))

    # ------------------------------------------------------------------ the loss
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = theta.split(self.numels)
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes)}

    def batch_loss(self, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The summed loss over one batch (criterion mean x batch size) at `theta`."""
        return self._mean_loss(self.unflatten(theta), xb, yb) * yb.shape[0]

    def _mean_loss(self, own: dict[str, torch.Tensor], xb: torch.Tensor,
                   yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, ({**self.fixed, **own}, self.buffers), (xb,))
        return self.criterion(out, yb)

    def loss(self, theta: torch.Tensor | None = None) -> float:
        th = self.theta if theta is None else theta
        with torch.no_grad():
            tot = sum(float(self.batch_loss(th, xb, yb)) for xb, yb in self.chunks())
        return tot / self.n

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        g = torch.zeros_like(theta)
        tot = 0.0
        for xb, yb in self.chunks():
            th = theta.detach().requires_grad_(True)
            loss = self.batch_loss(th, xb, yb)
            (gc,) = torch.autograd.grad(loss, th)
            g += gc
            tot += float(loss.detach())
        return tot / self.n, g / self.n

    # ------------------------------------------------------------------ Hessian-vector products
    def _leaves(self, theta: torch.Tensor) -> list[torch.Tensor]:
        return [p.detach().requires_grad_(True) for p in self.unflatten(theta).values()]

    def _grads(self, leaves: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
               weight: float) -> tuple[torch.Tensor, ...]:
        loss = self._mean_loss(dict(zip(self.names, leaves)), xb, yb)
        if weight != 1.0:
            loss = loss * weight
        return torch.autograd.grad(loss, leaves, create_graph=True, materialize_grads=True)

    def _double_backward(self, leaves: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
                         V: torch.Tensor, retain: bool) -> torch.Tensor:
        b = V.shape[0]
        if b == 1:
            vs = [p.view(s) for p, s in zip(V[0].split(self.numels), self.shapes)]
            hv = torch.autograd.grad(grads, leaves, vs, retain_graph=retain,
                                     materialize_grads=True)
            return torch.cat([h.reshape(-1) for h in hv])[None]
        vs = [p.reshape(b, *s) for p, s in zip(V.split(self.numels, dim=1), self.shapes)]
        hv = torch.autograd.grad(grads, leaves, vs, retain_graph=retain, materialize_grads=True,
                                 is_grads_batched=True)
        return torch.cat([h.reshape(b, -1) for h in hv], dim=1)

    def cached_graph(self) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The gradient graph over all the data, built on first use and kept ("graph" mode)."""
        if self._graph is None:
            leaves = self._leaves(self.theta)
            with torch.enable_grad():
                self._graph = (leaves, self._grads(leaves, self.x, self.y, 1.0))
        return self._graph

    def max_probes(self) -> int:
        """Probes one double backward carries: `probes_per_pass`, capped by the memory
        budget (at least 1)."""
        fit = int(self.budget // (self.per_sample * min(self.chunk, self.n))) - 1
        return max(1, min(self.probes_per_pass, fit))

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v at the current parameters."""
        return self.hvp_many(v[None])[0]

    def hvp_many(self, V: torch.Tensor) -> torch.Tensor:
        """H v for each row of V [b, n]: the b products share each double backward (and,
        chunked, each chunk's forward and backward), in groups the memory budget allows."""
        V = V.to(self.theta.dtype)
        self.n_hvp += V.shape[0]
        groups = V.split(self.max_probes())
        with torch.enable_grad():
            if self.mode == "graph":
                leaves, grads = self.cached_graph()
                return torch.cat([self._double_backward(leaves, grads, G, True) for G in groups])
            outs = [torch.zeros_like(G) for G in groups]
            for xb, yb in self.chunks():
                leaves = self._leaves(self.theta)
                grads = self._grads(leaves, xb, yb, yb.shape[0] / self.n)
                for i, G in enumerate(groups):
                    outs[i] += self._double_backward(leaves, grads, G, i + 1 < len(groups))
        return torch.cat(outs)
