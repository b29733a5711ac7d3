"""Vectorized runs: several configurations that share a batch-size schedule trained in one pass.

Why: at small batch sizes one step of the MLP is a few skinny matmuls ([B, 1024] x [1024, 1024])
that leave the cores partly idle and re-read every weight from memory per step. Stacking K models
(seeds, learning rates, inits, lr schedules) into `FusedMLPSGD` turns every layer into one `bmm`
over K independent problems, which keeps both cores busy. Each model keeps its own init
(`build_model`), its own shuffle stream (`shuffle_generator(seed)`) and its own per-step lr, so a
vectorized run equals the sequential `train()` of the same config up to float rounding (it is the
same loop, `engine/loop.py`, with K > 1), and it is stored under the same key with the same
record layout (a later `train()` finds it cached).

When to vectorize (`stack_groups`) — the rule, from measurements on the 2-core CPU (see
`benchmarks/vectorized.py`): configs are grouped when they can share a pass (`group_key`), and
a group of K >= 2 is vectorized only when every batch size in its schedule is at most
`MAX_VECTORIZED_BATCH`; larger batches already saturate the matmul units one model at a time, so
there the runs go one after another through `train()`. Why a config runs alone is logged
(`logging`, logger `batchlab.engine.vectorized`). Groups are cut into chunks of at most
`MAX_K` models (K = 8 measured slower per sample than K = 4).

A model that diverges (non-finite loss) or reaches its target is recorded at that epoch and
dropped from the stack, so it never affects the others (the bmm problems are independent anyway).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from batchlab.config import TrainConfig
from batchlab.data import TensorData
from batchlab.engine import schedules
from batchlab.engine.choice import refusal_or_choice
from batchlab.engine.continuation import Resume
from batchlab.engine.loop import Loop, train_one
from batchlab.engine.result import TrainResult
from batchlab.engine.setup import build_model, check_batch_sizes, resolve_device
from batchlab.errors import BatchlabError, ConfigError
from batchlab.probes import make_probes
from batchlab.probes.geometry import snapshot

log = logging.getLogger(__name__)

MAX_VECTORIZED_BATCH = 128
"""Largest batch size vectorized. Measured (2-core CPU, lightly loaded): at batch 64 one model
runs at 84% of the matmul roofline and K = 2..4 stacked models at 94-96% (1.12-1.14x); from
batch 256 on a single model already runs at ~100% of the roofline (fused.py), so stacking has
nothing left to gain there; on one thread, stacking 4 models gained nothing at 64 or 256
(0.98-0.99x) and lost at 1024 (0.81x: the stacked activations leave the cache). 128 is the
conservative cut; re-check it with `benchmarks/vectorized.py` (its rule table) when quiet."""
MAX_K = 4
"""Models per pass: K = 2 and 4 measured equally good at batch 64, K = 8 slower per sample."""


# -- grouping ---------------------------------------------------------------------------------
def ineligible(cfg: TrainConfig) -> str | None:
    """Why `cfg` cannot join a vectorized pass (None: it can): it must train on the fused
    engine (`choose_engine`, the one decision) with no probe that runs every few steps."""
    try:
        probes = make_probes(cfg.probes)
    except ConfigError as e:
        return str(e)
    choice = refusal_or_choice(cfg, probes)
    if not choice.fused:
        return choice.reason
    hooked = [p.name for p in probes if p.every_steps]
    if hooked:
        return f"probe {hooked[0]} runs every few steps (not vectorized)"
    return None


def group_key(cfg: TrainConfig) -> tuple[Any, ...] | None:
    """What configs must share to be trained in one pass, or None when `cfg` cannot be
    vectorized (`ineligible` says why)."""
    if ineligible(cfg) is not None:
        return None
    return (
        cfg.dataset, cfg.data, cfg.data_dir, cfg.normalize, cfg.val_fraction, cfg.max_train, cfg.max_test,
        tuple(cfg.hidden), cfg.momentum, cfg.nesterov, cfg.weight_decay,
        tuple(e.batch_size for e in schedules.epoch_settings(cfg)), cfg.device,
    )


def worth_vectorizing(cfg: TrainConfig, k: int) -> bool:
    """The measured rule: K >= 2 and every batch size <= MAX_VECTORIZED_BATCH."""
    return k >= 2 and cfg.epochs > 0 and max(cfg.batch_sizes()) <= MAX_VECTORIZED_BATCH


def stack_groups(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of `configs` cut into work units, in first-appearance order: a unit of >= 2 is
    trained in one vectorized pass, a unit of 1 by `train()`. Named for what it decides -
    which runs stack into one pass - and not "plan", which is the `--plan` cost projection's
    word (that projection calls this to count the same passes the training will make)."""
    by_key: dict[tuple[Any, ...], list[int]] = {}
    units: list[list[int]] = []
    for i, cfg in enumerate(configs):
        key = group_key(cfg)
        if key is None:
            units.append([i])
            continue
        if key not in by_key:
            by_key[key] = []
            units.append(by_key[key])
        by_key[key].append(i)
    out: list[list[int]] = []
    alone: Counter[str] = Counter()  # why configs run one by one, logged once per reason
    for unit in units:
        if len(unit) >= 2 and worth_vectorizing(configs[unit[0]], len(unit)):
            chunks = [unit[j : j + MAX_K] for j in range(0, len(unit), MAX_K)]
            for c in chunks:
                out.extend([c] if len(c) >= 2 else [[i] for i in c])
            continue
        out.extend([i] for i in unit)
        cfg = configs[unit[0]]
        if len(unit) >= 2:
            alone[f"batch size {max(cfg.batch_sizes())} > MAX_VECTORIZED_BATCH "
                  f"{MAX_VECTORIZED_BATCH} (stacking measured no faster)"
                  if cfg.epochs > 0 else "no epochs to train"] += len(unit)
        elif (why := ineligible(cfg)) is not None:
            alone[why] += 1
    for reason, count in alone.items():
        log.info("%d config(s) trained one by one, not vectorized: %s", count, reason)
    return out


# -- the K > 1 entry point --------------------------------------------------------------------
def train_group(configs: Sequence[TrainConfig], data: TensorData,
                keep_state: Sequence[bool] | None = None) -> list[TrainResult]:
    """Train configs that share a `group_key` together in one pass over `data` (no store:
    see `batchlab.runs.training.train_many`). A crash inside the pass comes back as `failed`
    results (with `exception`); it is never retried. If the built modules cannot be stacked
    (not batchlab's MLP), the reason is logged and each config is trained on its own."""
    if not configs:
        return []
    keys = {group_key(c) for c in configs}
    if None in keys or len(keys) != 1:
        raise BatchlabError("train_group needs fused-eligible SGD configs that share data, "
                            "model shape, optimizer settings and batch-size schedule")
    check_batch_sizes(configs[0], data)
    device = resolve_device(configs[0].device)
    nets = [build_model(c, data).to(device) for c in configs]
    probes = [make_probes(c.probes) for c in configs]
    blocked = [ch.reason for ch in (refusal_or_choice(c, p, model=n)
                                    for c, n, p in zip(configs, nets, probes)) if not ch.fused]
    if blocked:
        log.warning("%d configs cannot share a vectorized pass (%s); training them one by one",
                    len(configs), blocked[0])
        keep = list(keep_state) if keep_state is not None else [False] * len(configs)
        return [train_one(c, data=data, keep_state=kp) for c, kp in zip(configs, keep)]
    run_keys = [c.key(data.fingerprint) for c in configs]
    return Loop(configs, nets, data, device, probes, run_keys, keep_state=keep_state).run()


def continue_runs(cfgs: Sequence[TrainConfig], resumes: Sequence[Resume], keys: Sequence[str],
                  data: Any, *, keep_state: Sequence[bool] | None = None) -> list[TrainResult]:
    """Train built-in-model configs from the states of their prefixes (`engine.continuation`;
    found by `batchlab.runs.continuation`), in one pass (K > 1: vectorized, the caller groups
    them as `stack_groups` does). Each model is built from its seed as a fresh run's is (its
    init is the geometry probes' reference), then takes its prefix's weights."""
    device = resolve_device(cfgs[0].device)
    nets, probes = [], []
    for cfg, rs in zip(cfgs, resumes, strict=True):
        check_batch_sizes(cfg, data)
        torch.manual_seed(cfg.seed)
        net = build_model(cfg, data).to(device)
        rs.init_state = snapshot(net)
        if 0 in cfg.checkpoint_epochs:
            rs.checkpoints[0] = rs.init_state
        net.load_state_dict(rs.state.weights)
        nets.append(net)
        probes.append(make_probes(cfg.probes))
    return Loop(cfgs, nets, data, device, probes, keys, resume=resumes,
                keep_state=keep_state).run()
