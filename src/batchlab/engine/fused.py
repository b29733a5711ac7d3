"""A lean SGD path for K stacked MLPs: manual forward/backward with batched matmuls and
in-place updates, no autograd graph and no optimizer objects.

Why: at small batch sizes a step of the 1.9M-parameter MLP is bound by memory traffic over the
weights, and autograd + `torch.optim` move every weight about six times per step (forward read,
input-gradient read, gradient write, then read param + read grad + write param). Here plain SGD
folds the update into the backward matmul (`baddbmm_` into the weight), four passes instead of
six, and the Python overhead per step is a handful of kernel launches. K > 1 trains K models
(seeds, learning rates, trials) in one pass with `bmm`; each model has its own batch indices
and learning rate.

The math is the textbook one for log-softmax + mean NLL: dL/dlogits = (softmax - onehot) / B.
Results equal the autograd path up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FusedMLPSGD:
    """SGD (momentum, Nesterov, weight decay as in `torch.optim.SGD`) over K stacked MLPs.

    weights[l]: [K, out, in], biases[l]: [K, out]. They may be views of real `nn.Linear`
    parameters (K = 1), in which case the module is updated in place.
    """

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.W = list(weights)
        self.b = list(biases)
        self.K = self.W[0].shape[0]
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self._buf_W: list[torch.Tensor | None] = [None] * len(self.W)
        self._buf_b: list[torch.Tensor | None] = [None] * len(self.b)

    @classmethod
    def from_mlps(cls, models: Sequence[nn.Module], **kw) -> FusedMLPSGD:
        """Stack K MLPs. K == 1: views onto the module's own parameters (updated in place)."""
        linears = [[m for m in model.modules() if isinstance(m, nn.Linear)] for model in models]
        n_layers = len(linears[0])
        if len(models) == 1:
            W = [lin.weight.data.unsqueeze(0) for lin in linears[0]]
            b = [lin.bias.data.unsqueeze(0) for lin in linears[0]]
        else:
            W = [torch.stack([ls[i].weight.data for ls in linears]) for i in range(n_layers)]
            b = [torch.stack([ls[i].bias.data for ls in linears]) for i in range(n_layers)]
        return cls(W, b, **kw)

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy the stacked parameters into K modules (no-op for the K == 1 view case)."""
        for k, model in enumerate(models):
            lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
            for i, lin in enumerate(lins):
                if lin.weight.data.data_ptr() != self.W[i][k].data_ptr():
                    lin.weight.data.copy_(self.W[i][k])
                    lin.bias.data.copy_(self.b[i][k])

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: [K, B, D] -> (log-probs [K, B, C], activations entering each layer)."""
        acts = [x]
        h = x
        last = len(self.W) - 1
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))
            if i < last:
                h = z.clamp_min_(0.0)
                acts.append(h)
            else:
                h = z
        return torch.log_softmax(h, dim=-1), acts

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192):
        """Summed NLL and correct counts per model over (x [N, D], y [N]), chunked."""
        loss = torch.zeros(self.K, device=x.device)
        correct = torch.zeros(self.K, device=x.device)
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            logp, _ = self.forward(xs.unsqueeze(0).expand(self.K, -1, -1))
            yk = ys.unsqueeze(0).expand(self.K, -1)
            loss += -logp.gather(-1, yk.unsqueeze(-1)).squeeze(-1).sum(1)
            correct += (logp.argmax(-1) == yk).sum(1)
        return loss, correct

    # -- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: torch.Tensor | float,
        grad_sink: dict[int, torch.Tensor] | None = None,
        grad_scale: float = 1.0,
    ) -> torch.Tensor:
        """One SGD step on batch x [K, B, D], y [K, B]; returns the per-model mean loss [K].

        `lr` is a float or a [K] tensor. `grad_sink` maps a layer index to a [K, out, in]
        accumulator to which this step's weight gradient (times `grad_scale`) is added: the
        gradient-competition experiment sums last-layer gradients this way without a copy of
        the weights.
        """
        K, B = y.shape
        logp, acts = self.forward(x)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [K, B]
        loss = nll.mean(1)
        delta = logp.exp_()  # softmax, reusing logp's storage
        delta.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(y, -1, dtype=delta.dtype).unsqueeze(-1))
        delta.mul_(1.0 / B)
        lr_t = lr.view(K, 1, 1) if isinstance(lr, torch.Tensor) else None
        plain = self.momentum == 0.0 and self.weight_decay == 0.0
        for i in range(len(self.W) - 1, -1, -1):
            W, b, h = self.W[i], self.b[i], acts[i]
            gin = torch.bmm(delta, W) if i > 0 else None  # before W changes
            if grad_sink is not None and i in grad_sink:
                grad_sink[i].baddbmm_(delta.transpose(1, 2), h, alpha=grad_scale)
            if plain:
                d = delta * lr_t if lr_t is not None else delta
                alpha = -1.0 if lr_t is not None else -float(lr)
                W.baddbmm_(d.transpose(1, 2), h, alpha=alpha)
                b.add_(d.sum(1), alpha=alpha)
            else:
                gW = torch.bmm(delta.transpose(1, 2), h)
                gb = delta.sum(1)
                self._update(i, W, b, gW, gb, lr, lr_t)
            if gin is not None:
                delta = gin.mul_(h > 0)
        return loss

    def _update(self, i, W, b, gW, gb, lr, lr_t) -> None:
        wd, mu = self.weight_decay, self.momentum
        if wd:
            gW.add_(W, alpha=wd)
            gb.add_(b, alpha=wd)
        if mu:
            if self._buf_W[i] is None:
                self._buf_W[i], self._buf_b[i] = gW.clone(), gb.clone()
            else:
                self._buf_W[i].mul_(mu).add_(gW)
                self._buf_b[i].mul_(mu).add_(gb)
            if self.nesterov:
                gW = gW.add_(self._buf_W[i], alpha=mu)
                gb = gb.add_(self._buf_b[i], alpha=mu)
            else:
                gW, gb = self._buf_W[i], self._buf_b[i]
        if lr_t is not None:
            W.sub_(gW * lr_t)
            b.sub_(gb * lr_t.view(-1, 1))
        else:
            W.add_(gW, alpha=-float(lr))
            b.add_(gb, alpha=-float(lr))

    def select(self, positions: Sequence[int]) -> FusedMLPSGD:
        """A stepper over the models at stacked `positions` (copies), momentum buffers
        included: the others stopped training and leave the stack."""
        sel = torch.tensor(list(positions), device=self.W[0].device)
        new = FusedMLPSGD([w.index_select(0, sel) for w in self.W],
                          [b.index_select(0, sel) for b in self.b], momentum=self.momentum,
                          nesterov=self.nesterov, weight_decay=self.weight_decay)
        for i, (bw, bb) in enumerate(zip(self._buf_W, self._buf_b)):
            if bw is not None:
                new._buf_W[i], new._buf_b[i] = bw.index_select(0, sel), bb.index_select(0, sel)
        return new

    def model_state(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's momentum buffers (copies, unstacked): what a continued run starts from."""
        out = {}
        for i, (bw, bb) in enumerate(zip(self._buf_W, self._buf_b)):
            if bw is not None:
                out[f"{i}.weight"] = bw[k].clone()
                out[f"{i}.bias"] = bb[k].clone()
        return out

    def load_state(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Momentum buffers of the K models (`model_state` of each, in stacked order), as
        their prefixes left them; a model without buffers (no momentum) leaves them unset."""
        if not any(states):
            return
        dev = self.W[0].device
        for i in range(len(self.W)):
            self._buf_W[i] = torch.stack([s[f"{i}.weight"] for s in states]).to(dev)
            self._buf_b[i] = torch.stack([s[f"{i}.bias"] for s in states]).to(dev)

    def state(self) -> dict[str, torch.Tensor]:
        """Momentum buffers (for checkpoints)."""
        out = {}
        for i, (bw, bb) in enumerate(zip(self._buf_W, self._buf_b)):
            if bw is not None:
                out[f"momentum.{i}.weight"] = bw
                out[f"momentum.{i}.bias"] = bb
        return out
