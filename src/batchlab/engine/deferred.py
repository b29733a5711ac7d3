"""Plain SGD over one pass of known data with *deferred* (low-rank, batched) weight updates.

Why: at batch sizes 2-8 an SGD step of the 784-1024-1024-10 MLP is dominated by its weight
update, a rank-B outer product `W -= lr delta^T h` that BLAS runs at a few percent of peak
(measured on one core: a rank-2 update of a 1024x1024 matrix costs 0.64 ms, 8x a matrix-vector
product over the same weights). The update can wait. Within a *chunk* of consecutive steps
(at most `rank` rows sharing one lr / B), the weights the current step sees are

    W_eff = W - (lr / B) U^T V,   U = the chunk's earlier output gradients, V = their inputs,

so the forward product is h W^T - (lr / B)(h V^T) U and the input gradient
g W - (lr / B)(g U^T) V: small products against the chunk's history instead of a rank-B
update of the whole matrix. At the chunk's end the update is applied as ONE rank-R product,
which BLAS runs near peak. The first layer's input is the data, known in advance, so its
forward products for the whole chunk are one product X W^T and its history products a Gram
matrix X X^T. Hidden biases are deferred the same way (a constant input 1); the last layer
(10 x 1024 here) is tiny and is updated directly each step, its weight gradient added to an
accumulator (the gradient-competition experiment's summed gradient).

The arithmetic is exactly SGD's; only the rounding order differs (tested against an autograd
loop in float64, to 1e-12)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Step:
    """One SGD step over rows [start, stop) of the pass at learning rate `lr`; its last-layer
    weight gradient times `scale` is added to `sink`."""

    start: int
    stop: int
    lr: float
    sink: torch.Tensor
    scale: float = 1.0


def chunks(steps: Sequence[Step], rank: int) -> list[list[Step]]:
    """Consecutive steps grouped so each group spans at most `rank` rows (at least one step)
    and shares one per-row learning rate lr / B (a remainder step usually starts a group)."""
    out: list[list[Step]] = []
    for s in steps:
        g = out[-1] if out else None
        if g and s.stop - g[0].start <= rank and _row_lr(s) == _row_lr(g[0]):
            g.append(s)
        else:
            out.append([s])
    return out


def _row_lr(s: Step) -> float:
    return s.lr / (s.stop - s.start)


@torch.no_grad()
def sgd_pass(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, steps: Sequence[Step], rank: int = 64, *,
             final_update: bool = True) -> torch.Tensor:
    """Run `steps` of plain SGD (log-softmax + mean NLL) on K stacked MLPs, in place.

    weights[l]: [K, out, in]; biases[l]: [K, out]; x: [K, n, D]; y: [K, n]. Returns the largest
    per-step mean loss of each model [K] (NaN if any step's loss was NaN). With
    `final_update=False` the last step only records its gradient into its sink: no backward
    through the hidden layers and no update (up to 2/3 of the pass's work at one big step),
    for callers that want the summed gradients and not the weights, which are left stale.

    Per step the work is a handful of kernel launches (a step at b = 1 is ~0.3 ms, so Python
    overhead matters): g = softmax - onehot is kept unnormalized and 1/B folded into the
    learning rates; the hidden layers' bias updates ride on the deferred mechanism (an
    appended constant input 1: the history product gets +1), and the forward writes each
    activation straight into the history buffer V of the next layer.
    """
    W, bias = list(weights), list(biases)
    last = len(W) - 1
    K, n = y.shape
    Wt = [w.transpose(1, 2) for w in W]
    bu = [b.unsqueeze(1) for b in bias]
    y1 = y.unsqueeze(-1)
    logits = x.new_empty(K, n, W[last].shape[1])  # every row's, for the step losses
    one = x.new_ones(1, 1, 1)
    minus_one: dict[int, torch.Tensor] = {}
    relu_grad = torch.ops.aten.threshold_backward.grad_input
    for group in chunks(steps, rank):
        c0, c1 = group[0].start, group[-1].stop
        lr = _row_lr(group[0])  # lr / B, the same for every step of the group
        xc = x[:, c0:c1]
        # the chunk's history: U[i] rows = g of layer i (the update is -lr U^T V), V[i] rows =
        # the layer's inputs; the backward writes U and the forward writes V in place
        U = [W[i].new_empty(K, c1 - c0, W[i].shape[1]) for i in range(last)]
        V = [xc] + [W[i].new_empty(K, c1 - c0, W[i].shape[2]) for i in range(1, last)]
        Ut = [u.transpose(1, 2) for u in U]
        Vt = [v.transpose(1, 2) for v in V]
        if last:
            P0 = torch.baddbmm(bu[0], xc, Wt[0])  # first layer, whole chunk
            # x x^T + 1 (the +1 carries the bias updates); a one-step chunk has no history
            G0 = torch.baddbmm(one, xc, Vt[0]) if len(group) > 1 else xc[:, :, :0]
        for st in group:
            a, e = st.start - c0, st.stop - c0
            B = e - a
            acts = [xc[:, a:e]]
            h = acts[0]
            for i in range(last):  # forward through W_eff = W - lr U^T V (a = 0: no history)
                out = V[i + 1][:, a:e] if i + 1 < last else None
                if i == 0:
                    z = torch.baddbmm(P0[:, a:e], G0[:, a:e, :a], U[0][:, :a], alpha=-lr,
                                      out=out)
                else:
                    hv = torch.baddbmm(one, h, Vt[i][:, :, :a])
                    z = torch.baddbmm(torch.baddbmm(bu[i], h, Wt[i]), hv,
                                      U[i][:, :a], alpha=-lr, out=out)
                h = z.clamp_min_(0.0)
                acts.append(h)
            zl = torch.baddbmm(bu[last], h, Wt[last], out=logits[:, st.start:st.stop])
            g = torch.softmax(zl, -1)
            yb = y1[:, st.start:st.stop]
            if B not in minus_one:
                minus_one[B] = torch.full(yb.shape, -1.0, dtype=g.dtype, device=g.device)
            g.scatter_add_(-1, yb, minus_one[B])  # g = B x the mean-loss logit gradient
            gT = g.transpose(1, 2)
            h = acts[last]
            st.sink.baddbmm_(gT, h, alpha=st.scale / B)
            if st is steps[-1] and not final_update:
                break  # (for-else below: the chunk's update is skipped too)
            gin = torch.bmm(g, W[last]) if last else None  # before W changes
            W[last].baddbmm_(gT, h, alpha=-lr)  # the last layer: updated directly
            bias[last].add_(g.sum(1), alpha=-lr)
            for i in range(last, 0, -1):  # backward; input gradients use the pre-step W_eff
                if i < last:
                    gin = torch.bmm(g, W[i])
                    gin.baddbmm_(torch.bmm(g, Ut[i][:, :, :a]), V[i][:, :a], alpha=-lr)
                g = relu_grad(gin, acts[i], 0.0, grad_input=U[i - 1][:, a:e])
        else:
            for i in range(last):  # apply the chunk: one rank-R update per layer
                W[i].baddbmm_(Ut[i], V[i], alpha=-lr)
                bias[i].sub_(U[i].sum(1), alpha=lr)
    nll = -torch.log_softmax(logits, -1).gather(-1, y1).squeeze(-1)  # [K, n]
    sizes = torch.tensor([st.stop - st.start for st in steps], device=x.device)
    step_of_row = torch.repeat_interleave(torch.arange(len(steps), device=x.device), sizes)
    sums = x.new_zeros(K, len(steps)).index_add_(1, step_of_row, nll)
    return (sums / sizes).amax(1)  # amax propagates NaN
