"""Per-example squared gradient norms from module hooks, inside an ordinary training step.

`ExampleNormHooks(model)` hooks every layer it knows; during the user's own forward and
`loss.backward()` each hooked layer adds |g_i|^2 (the squared norm of example i's gradient of
that layer's parameters, in the units of the loss that was back-propagated) to a [B] buffer.
No per-example gradient is ever materialised where a cheaper identity exists:

* nn.Linear on [B, in] inputs: the gradient of example i is the outer product delta_i a_i^T, so
  |g_i|^2 = |a_i|^2 |delta_i|^2 (+ |delta_i|^2 for the bias) - O(B (in + out)).
* nn.Linear on [B, T..., in] inputs: g_i = sum_t delta_it a_it^T, so
  |g_i|^2 = sum_{t,s} (a_it . a_is)(delta_it . delta_is), the Gram-matrix form, O(B T^2 (in + out));
  when T (in + out) > in * out the per-example gradient itself is cheaper and is used instead.
* nn.Conv1d / nn.Conv2d: the input is unfolded into patches U_i [K, L] (K = C_in/groups * kernel
  size, L = output positions), g_i = D_i U_i^T per group, with the same choice between the
  Gram form (L x L) and the explicit [C_out, K] gradient; the bias gradient is D_i summed over L.

How: a forward hook keeps the layer's input (for nn.Linear on [B, in] only |a_i|^2, computed
there while the input is in cache) and registers a hook on its output tensor, which
receives the gradient of the output (delta). A tensor hook rather than
`register_full_backward_hook` because the latter wraps the output in a custom autograd Function
that an in-place op downstream (`nn.ReLU(inplace=True)`) refuses, and warns on a first layer whose
input does not require grad.

* nn.LayerNorm: g_i = (sum_t delta_it * xhat_it, sum_t delta_it) with xhat the normalised
  input, recomputed from the kept input.
* nn.Embedding: g_i scatters delta_it into the rows of its tokens, so
  |g_i|^2 = sum_{t,s: id_it = id_is} delta_it . delta_is (padding_idx rows get nothing).
* Hugging Face's `Conv1D` (GPT-2's attention and MLP projections: x @ W + b, W [in, out]): the
  nn.Linear rule (the norm of W^T is that of W).

Everything else that has trainable parameters (BatchNorm - examples are coupled through the batch
statistics -, nn.MultiheadAttention (its projections are used functionally), custom modules,
parameters shared between modules (tied input/output embeddings: the per-example cross terms
between the two uses are not available from norms; `MicroBatchNoiseScale` covers them), an
Embedding with `scale_grad_by_freq`, layers used functionally or called twice in one forward, a
layer whose input broadcasts over the batch, such as GPT-2's position embedding) is reported in
`unsupported`, with the reason, and left out of the norms; `covered_params()` says exactly which parameters the norms
are of, so a caller can restrict everything else it computes to the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from batchlab.errors import BatchlabError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layer types with exact per-example norms; a subclass counts only if it keeps their forward."""

Rule = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], torch.Tensor]
"""(layer, its tensor inputs, gradient of its output) -> [B] squared per-example norms."""


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Per-example sum of squares over every dim but the first, in at least float32: one
    reduction (a row norm, squared in place) and no [B, ...] temporary of squares, which
    costs more than the reduction itself on a CPU."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float32 if low else None).square_()


def _outer_sq(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|sum_t d_t a_t^T|^2 per example for a [B, T, K], d [B, T, O]: Gram form or explicit,
    whichever is cheaper."""
    t, k, o = a.shape[1], a.shape[2], d.shape[2]
    if t == 1:
        return _sq(a) * _sq(d)
    if t * (k + o) <= k * o:
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).flatten(1).sum(1)
    return _sq(torch.bmm(d.transpose(1, 2), a))


def linear_sq_norms(m: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 of an nn.Linear's (or Hugging Face Conv1D's) trainable parameters from its input
    a and output gradient d."""
    if a.dim() < 2:
        raise BatchlabError("per-example norms need batched inputs (a leading batch dimension)")
    if a.dim() == 2:  # the common case
        return linear_sq_from_input(m, linear_input_factor(m, a), d)
    if a.dtype in (torch.float16, torch.bfloat16):
        a, d = a.float(), d.float()
    w, bias = m.weight.requires_grad, m.bias is not None and m.bias.requires_grad
    b = a.shape[0]
    a3, d3 = a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1])
    out = torch.zeros(b, dtype=a3.dtype, device=a.device)
    if w:
        out = out + _outer_sq(a3, d3)
    if bias:
        out = out + _sq(d3.sum(1))
    return out


def linear_input_factor(m: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
    """The input's part of a Linear layer's |g_i|^2 on [B, in] inputs, |a_i|^2 (None with a
    frozen weight): computed in the forward hook, while the input is still in cache."""
    return _sq(a) if m.weight.requires_grad else None


def linear_sq_from_input(m: nn.Module, a_sq: torch.Tensor | None, d: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 = |a_i|^2 |delta_i|^2 (+ |delta_i|^2 for a trainable bias) of a Linear layer on
    [B, in] inputs from `linear_input_factor` and the output gradient d [B, out]: one row
    reduction and one fused multiply-add (each op costs microseconds of dispatch on a CPU)."""
    d2 = _sq(d)
    bias = m.bias is not None and m.bias.requires_grad
    if a_sq is not None:
        return torch.addcmul(d2, d2, a_sq) if bias else d2.mul_(a_sq)
    return d2 if bias else d2.zero_()


def conv_sq_norms(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 of a Conv1d/Conv2d's trainable parameters (any stride, dilation, groups, padding
    and padding mode) from its input a and output gradient d, by unfolding the input."""
    spatial = 1 if isinstance(m, nn.Conv1d) else 2
    if a.dim() != spatial + 2:
        raise BatchlabError("per-example norms need batched inputs (a leading batch dimension)")
    if a.dtype in (torch.float16, torch.bfloat16):
        a, d = a.float(), d.float()
    b, g = a.shape[0], m.groups
    out = torch.zeros(b, dtype=a.dtype, device=a.device)
    d = d.reshape(b, g, m.out_channels // g, -1)  # [B, g, O/g, L]
    if m.weight.requires_grad:
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            a = F.pad(a, pad, mode=mode)
        if spatial == 1:
            a = a.unsqueeze(2)
            ks, dil, st = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            ks, dil, st = m.kernel_size, m.dilation, m.stride
        u = F.unfold(a, ks, dilation=dil, stride=st)  # [B, C*k, L]
        u = u.reshape(b, g, -1, u.shape[-1])  # [B, g, K, L]
        # per group: |D U^T|^2 with D [O/g, L], U [K, L]; as [B*g, L, .] for _outer_sq
        out = out + _outer_sq(u.flatten(0, 1).transpose(1, 2),
                              d.flatten(0, 1).transpose(1, 2)).reshape(b, g).sum(1)
    if m.bias is not None and m.bias.requires_grad:
        out = out + _sq(d.sum(-1))
    return out


def layernorm_sq_norms(m: nn.LayerNorm, acts: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 of a LayerNorm's weight and bias: sums over the positions of delta * xhat and
    of delta."""
    a = acts[0]
    if a.dtype in (torch.float16, torch.bfloat16):
        a, d = a.float(), d.float()
    ns = tuple(m.normalized_shape)
    b = a.shape[0]
    out = torch.zeros(b, dtype=a.dtype, device=a.device)
    d3 = d.reshape(b, -1, *ns)
    if m.weight is not None and m.weight.requires_grad:
        xhat = torch.nn.functional.layer_norm(a, ns, None, None, m.eps).reshape(b, -1, *ns)
        out = out + _sq((d3 * xhat).sum(1))
    if m.bias is not None and m.bias.requires_grad:
        out = out + _sq(d3.sum(1))
    return out


def embedding_sq_norms(m: nn.Embedding, acts: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    """|g_i|^2 of an Embedding's weight: delta_it . delta_is summed over pairs of positions that
    look up the same row (O(B T^2 D))."""
    idx = acts[0]
    b = idx.shape[0]
    ids = idx.reshape(b, -1)
    d3 = d.reshape(b, ids.shape[1], -1)
    if d3.dtype in (torch.float16, torch.bfloat16):
        d3 = d3.float()
    if m.padding_idx is not None:
        d3 = d3 * (ids != m.padding_idx).unsqueeze(-1).to(d3.dtype)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(d3.dtype)
    return (same * torch.bmm(d3, d3.transpose(1, 2))).flatten(1).sum(1)


def _hf_conv1d_rule(m: nn.Module, acts: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    return linear_sq_norms(m, acts[0], d)


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's `transformers.pytorch_utils.Conv1D` (recognised without importing it)."""
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and hasattr(m, "nf")


def builtin_rules(model: nn.Module) -> dict[type, Rule]:
    """The per-example rules batchlab has beyond Linear/Conv: LayerNorm, Embedding (not with
    scale_grad_by_freq) and, when the model has them, Hugging Face Conv1D layers."""
    rules: dict[type, Rule] = {nn.LayerNorm: layernorm_sq_norms, nn.Embedding: embedding_sq_norms}
    for m in model.modules():
        if is_hf_conv1d(m):
            rules[type(m)] = _hf_conv1d_rule
    return rules


def opacus_rules() -> dict[type, Rule]:
    """Rules for the layer types Opacus has per-sample rules for and batchlab has not (Embedding,
    EmbeddingBag, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, Conv3d, ...): its norm samplers
    (no per-example gradient stored) where it has one, else its grad samplers, reduced to norms."""
    try:
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    except ImportError as e:
        raise BatchlabError("backend='opacus' needs Opacus: pip install opacus") from e
    norm_samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    grad_samplers = GradSampleModule.GRAD_SAMPLERS

    def rule_for(t: type) -> Rule:
        def rule(m: nn.Module, acts: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
            if t in norm_samplers:
                out = norm_samplers[t](m, acts, d)
                return sum(n.pow(2) for p, n in out.items() if p.requires_grad)
            out = grad_samplers[t](m, acts, d)
            return sum(_sq(g) for p, g in out.items() if p.requires_grad)
        return rule

    return {t: rule_for(t) for t in {*norm_samplers, *grad_samplers} if t not in SUPPORTED}


def _is_supported(m: nn.Module, extra: dict[type, Rule]) -> bool:
    if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.max_norm is not None):
        return False  # the gradient is rescaled per batch / the weights renormed in forward
    if type(m) in extra:
        return True
    base = next((t for t in SUPPORTED if isinstance(m, t)), None)
    if base is None or type(m).forward is not base.forward:
        return False
    own = {n for n, p in m.named_parameters(recurse=False)}
    return own <= {"weight", "bias"}


def _trainable(m: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]


class ExampleNormHooks:
    """Hooks that accumulate per-example squared gradient norms during backward passes.

    `take()` returns them (a [B] tensor per layer that took part) and resets; `unsupported` maps
    module names to why their parameters are not in the norms."""

    def __init__(self, model: nn.Module, extra: dict[type, Rule] | None = None) -> None:
        self.model, self.extra = model, {**builtin_rules(model), **(extra or {})}
        self.unsupported: dict[str, str] = {}
        self.layers: dict[str, nn.Module] = {}
        owners: dict[int, list[str]] = {}
        for name, m in model.named_modules():
            for _, p in _trainable(m):
                owners.setdefault(id(p), []).append(name or type(m).__name__)
        for name, m in model.named_modules():
            own = _trainable(m)
            if not own:
                continue
            label = name or "(root)"
            shared = [o for _, p in own for o in owners[id(p)] if o != (name or type(m).__name__)]
            if shared:
                self.unsupported[label] = f"{type(m).__name__} shares a parameter with {shared[0]}"
            elif not _is_supported(m, self.extra):
                self.unsupported[label] = f"{type(m).__name__} (no per-example rule for this layer)"
            else:
                self.layers[label] = m
        self._sums: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self.active = True
        self._handles = [m.register_forward_hook(self._forward_hook(name))
                         for name, m in self.layers.items()]

    def _forward_hook(self, name: str):  # noqa: ANN202 - returns a torch forward hook
        def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (self.active and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return  # (a layer that never reports is caught by the caller's gradient check)
            acts = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
            rule = self.extra.get(type(m))
            fast = rule is None and isinstance(m, nn.Linear) and bool(acts) and acts[0].dim() == 2
            if fast:  # nn.Linear on [B, in]: the input's part now, no reference kept
                factor = linear_input_factor(m, acts[0])
                acts = []

            def on_grad(d: torch.Tensor) -> None:
                d = d.detach()
                if fast:
                    sq = linear_sq_from_input(m, factor, d)
                elif rule is not None:
                    sq = rule(m, acts, d)
                elif isinstance(m, nn.Linear):
                    sq = linear_sq_norms(m, acts[0], d)
                else:
                    sq = conv_sq_norms(m, acts[0], d)
                prev = self._sums.get(name)
                if prev is not None and prev.shape != sq.shape:
                    raise BatchlabError(f"layer {name} was called with batches of {prev.shape[0]} and "
                                        f"{sq.shape[0]} examples in one step")
                self._sums[name] = sq if prev is None else prev + sq
                self._calls[name] = self._calls.get(name, 0) + 1

            output.register_hook(on_grad)
        return hook

    def take(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(per-layer [B] squared norms, per-layer number of backward calls) since the last take."""
        sums, calls = self._sums, self._calls
        self._sums, self._calls = {}, {}
        return sums, calls

    def drop(self, name: str, reason: str) -> None:
        """Stop covering a layer found unsupported at run time (e.g. called twice per forward)."""
        idx = list(self.layers).index(name)
        self._handles.pop(idx).remove()
        del self.layers[name]
        self.unsupported[name] = reason

    def params(self, names: list[str] | None = None) -> Iterator[nn.Parameter]:
        """The trainable parameters of the covered layers (or of `names` among them)."""
        for name in names if names is not None else list(self.layers):
            # the module's own parameter dict (named_parameters' generator machinery costs
            # more than the rest of gns.step() on a small model)
            yield from (p for p in self.layers[name]._parameters.values()
                        if p is not None and p.requires_grad)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
