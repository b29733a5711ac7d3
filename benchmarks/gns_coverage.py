"""Which layers get exact per-example gradient norms: batchlab's hooks (alone and with its
optional Opacus backend) vs BackPACK vs Opacus.

    python benchmarks/gns_coverage.py

For each layer type, a tiny float64 model (the layer, then a Linear head) and a sum-reduced
squared-error loss on 4 examples; per-example squared gradient norms of all parameters from
each backend are compared with one autograd backward per example:
  exact        matches to 1e-8 (relative)
  reported     batchlab: listed in `unsupported` (left out of B_simple, with a warning)
  missing      the backend ran but produced no norms for the layer
  WRONG        the backend produced norms that do not match
  error        the backend raised (first words of the message)
  numbers (undefined)  norms where no per-example gradient exists (BatchNorm in training
               mode couples the examples of a batch)
BackPACK and Opacus are optional: a backend that is not importable is shown as "-".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from batchlab.errors import BatchlabError
from batchlab.measure.gns import GradientNoiseScale

B = 4


class Net(nn.Module):
    def __init__(self, layer: nn.Module, shape: tuple[int, ...], pick: Callable | None = None) -> None:
        super().__init__()
        self.layer, self.shape, self.pick = layer, shape, pick
        with torch.no_grad():
            n = self._body(self.example()).flatten(1).shape[1]
        self.head = nn.Linear(n, 2)

    def example(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        if isinstance(self.layer, nn.Embedding):
            return torch.randint(0, self.layer.num_embeddings, (B, *self.shape), generator=g)
        return torch.randn(B, *self.shape, generator=g, dtype=torch.float64)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x) if self.pick is None else self.pick(self.layer, x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._body(x).flatten(1))


def cases() -> dict[str, Net]:
    def mha(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x, x, x, need_weights=False)

    return {
        "Linear [B, d]": Net(nn.Linear(5, 3), (5,)),
        "Linear [B, T, d]": Net(nn.Linear(5, 3), (4, 5)),
        "Conv1d": Net(nn.Conv1d(2, 3, 3), (2, 8)),
        "Conv2d": Net(nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 6)),
        "Conv3d": Net(nn.Conv3d(2, 3, 2), (2, 4, 4, 4)),
        "ConvTranspose2d": Net(nn.ConvTranspose2d(2, 3, 3), (2, 4, 4)),
        "Embedding": Net(nn.Embedding(10, 3), (4,)),
        "LayerNorm": Net(nn.LayerNorm(5), (4, 5)),
        "GroupNorm": Net(nn.GroupNorm(2, 4), (4, 5)),
        "BatchNorm1d (train)": Net(nn.BatchNorm1d(5), (5,)),
        "LSTM": Net(nn.LSTM(5, 3, batch_first=True), (4, 5)),
        "MultiheadAttention": Net(nn.MultiheadAttention(4, 2, batch_first=True), (3, 4), mha),
    }


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum()


def reference(model: Net, x: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    return torch.stack([sum(g.pow(2).sum() for g in torch.autograd.grad(loss_of(model, x[i:i + 1]), params))
                        for i in range(len(x))])


def by_gns(model: Net, x: torch.Tensor, backend: str = "hooks") -> torch.Tensor | str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gns = GradientNoiseScale(model, reduction="sum", backend=backend)
        except BatchlabError as e:
            if "pip install" in str(e):
                raise ImportError(str(e)) from e
            raise
    if any(name.startswith("layer") for name in gns.unsupported):
        return "reported"
    loss_of(model, x).backward()
    gns.step()
    return "reported" if gns.unsupported else gns.last_sq_norms


def by_backpack(model: Net, x: torch.Tensor) -> torch.Tensor | str:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)
    with backpack(BatchL2Grad()):
        loss_of(model, x).backward()
    norms = [getattr(p, "batch_l2", None) for p in model.parameters()]
    return "missing" if any(n is None for n in norms) else sum(norms)


def by_opacus(model: Net, x: torch.Tensor, ghost: bool) -> torch.Tensor | str:
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    if ghost:
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", use_ghost_clipping=True)
    else:
        gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(x).pow(2).sum().backward()
    if ghost:
        norms = [getattr(p, "_norm_sample", None) for p in model.parameters()]
        return "missing" if any(n is None for n in norms) else sum(n.pow(2) for n in norms)
    gs = [getattr(p, "grad_sample", None) for p in model.parameters()]
    return "missing" if any(g is None for g in gs) else sum(g.flatten(1).pow(2).sum(1) for g in gs)


def verdict(fn: Callable[[], torch.Tensor | str], want: torch.Tensor | None) -> str:
    try:
        got = fn()
    except ImportError:
        return "-"
    except Exception as e:  # a backend's refusal is a result here
        return "error: " + " ".join(str(e).split()[:3])[:15]
    if isinstance(got, str):
        return got
    if want is None:
        return "numbers (undefined)"
    ok = torch.allclose(got.double(), want, rtol=1e-8, atol=1e-12)
    return "exact" if ok else "WRONG"


def main() -> None:
    torch.set_default_dtype(torch.float64)
    backends: dict[str, Callable[[Net, torch.Tensor], torch.Tensor | str]] = {
        "batchlab": by_gns,
        "batchlab+opacus": lambda m, x: by_gns(m, x, backend="opacus"),
        "backpack": by_backpack,
        "opacus": lambda m, x: by_opacus(m, x, ghost=False),
        "opacus-ghost": lambda m, x: by_opacus(m, x, ghost=True),
    }
    print(f"{'layer':20s}" + "".join(f"{k:23s}" for k in backends))
    for name in cases():
        row = []
        for fn in backends.values():
            torch.manual_seed(0)
            model = cases()[name]
            x = model.example()
            try:
                want = reference(model, x)
            except ValueError:  # BatchNorm in training mode: a per-example gradient is not defined
                want = None
            model.zero_grad()
            row.append(verdict(lambda fn=fn, model=model, x=x: fn(model, x), want))
        print(f"{name:20s}" + "".join(f"{v:23s}" for v in row))


if __name__ == "__main__":
    main()
