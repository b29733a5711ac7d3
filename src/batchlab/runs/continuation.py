"""Where continued runs meet the store (the mechanism is `batchlab.engine.continuation`).

A run trained with `keep_state` saves its end state beside its checkpoints: one safetensors
file (`state.safetensors`: weights, optimizer tensors, the shuffle generator's state; the
counters, probe states and optimizer scalars in its JSON metadata), written atomically and
recorded as the run's artifact `state`, so it is covered by the run's checksum and verified
(sha256) before use like every checkpoint. A small table, `prefix_states`, indexes those runs
by `prefix_key`: a lookup hint only - a row whose run is gone, damaged, or no longer a prefix is
passed over.

`find_resume` gives a config the longest stored run it can continue from; `prefix_epochs` is
the same question without loading any tensor (the planner's).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from batchlab.atomic import sha256_file
from batchlab.config import TrainConfig, make_config
from batchlab.engine.continuation import Resume, State, continuable, prefix_key, prefix_reason, rows_for
from batchlab.engine.result import TrainResult
from batchlab.errors import BatchlabError
from batchlab.nn.checkpoint import load_state, read_meta, save_state
from batchlab.probes import make_probes
from batchlab.runs.store import DamagedRow, RunRecord, Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS prefix_states (
    config_hash TEXT PRIMARY KEY,
    prefix_key TEXT NOT NULL,
    epochs INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS prefix_states_key ON prefix_states (prefix_key);
"""
STATE_ARTIFACT = "state"
KeepState = bool | Callable[[TrainConfig], bool]
"""Which runs keep their end state: all, none, or those a predicate picks."""


def probes_continuable(cfg: TrainConfig) -> bool:
    """Whether every probe of the config can save its state (`Probe.save_state`)."""
    try:
        return all(p.save_state() is not None for p in make_probes(cfg.probes))
    except BatchlabError:
        return False


def save_state_file(store: Store, result: TrainResult) -> tuple[str, str] | None:
    """Write the run's kept state as its `state` artifact: (path, sha256), or None."""
    st: State | None = result.state
    if st is None:
        return None
    path = store.artifacts_dir / result.run_id / "state.safetensors"
    save_state(path, st.tensors(), {"run_id": result.run_id, **st.meta()})
    return str(path), sha256_file(path)


def index_state(store: Store, result: TrainResult, fingerprint: str) -> None:
    """Make a saved run with a state findable by the configs that continue it."""
    if STATE_ARTIFACT not in result.artifacts:
        return
    store.ensure_schema(SCHEMA)
    with store.transaction() as c:
        c.execute("INSERT OR REPLACE INTO prefix_states VALUES (?, ?, ?)",
                  (result.key, prefix_key(result.config, fingerprint), result.config.epochs))


def drop_states(store: Store, run_ids: Sequence[str]) -> tuple[int, int]:
    """Remove the kept end state of these runs: its file, its artifact row (the run is saved
    again, so its checksum covers what is left) and its index row. The runs, their metrics
    and their checkpoints stay; a state only lets a longer config skip the epochs it holds.
    Returns (states removed, bytes freed). A damaged run is left as it is: saving it again
    would sign what was tampered with."""
    store.ensure_schema(SCHEMA)
    n, freed = 0, 0
    for rid in run_ids:
        try:
            rec = store.get(rid)
        except DamagedRow:  # never re-signed here: `runs check` / `runs delete --damaged`
            continue
        if rec is None or STATE_ARTIFACT not in rec.artifacts:
            continue
        path = Path(rec.artifacts[STATE_ARTIFACT][0])
        rec.artifacts = {k: v for k, v in rec.artifacts.items() if k != STATE_ARTIFACT}
        store.save_run(rec)
        with store.transaction() as c:
            c.execute("DELETE FROM prefix_states WHERE config_hash = ?", (rec.config_hash,))
        if path.is_file():  # once no row names it: a crash in between leaves a stray file,
            freed += path.stat().st_size  # never a row naming a missing one
            path.unlink()
        n += 1
    return n, freed


def _candidates(store: Store, cfg: TrainConfig, fingerprint: str, n_train: int
                ) -> list[tuple[TrainConfig, RunRecord]]:
    """Stored runs with a state that `cfg` can continue, longest first."""
    if continuable(cfg) is not None or not probes_continuable(cfg):
        return []
    store.ensure_schema(SCHEMA)
    with store.transaction() as c:
        rows = c.execute("SELECT p.config_hash, r.config_json FROM prefix_states p JOIN runs r "
                         "ON r.config_hash = p.config_hash WHERE p.prefix_key = ? AND "
                         "p.epochs < ? ORDER BY p.epochs DESC",
                         (prefix_key(cfg, fingerprint), cfg.epochs)).fetchall()
    out = []
    for chash, config_json in rows:
        try:  # the cheap test first: the stored config (verified below with its whole run)
            short = make_config(**json.loads(config_json))
        except (BatchlabError, ValueError, TypeError):
            continue
        if prefix_reason(short, cfg, n_train) is not None:
            continue
        rec = store.finished(chash)  # verifies the row's checksum and every artifact's sha256
        if (rec is None or rec.status != "completed" or STATE_ARTIFACT not in rec.artifacts
                or "target_epoch" in rec.final or make_config(**rec.config) != short):
            continue
        out.append((short, rec))
    return out


def prefix_epochs(store: Store | None, cfg: TrainConfig, data: Any) -> int:
    """Epochs of the longest stored run `cfg` would continue from (0: none)."""
    if store is None:
        return 0
    found = _candidates(store, cfg, data.fingerprint, data.n_train)
    return found[0][0].epochs if found else 0


def find_resume(store: Store, cfg: TrainConfig, data: Any) -> Resume | None:
    """The longest stored prefix of `cfg` as a `Resume` (its state verified and loaded, its
    rows as `cfg` records them), or None."""
    for short, rec in _candidates(store, cfg, data.fingerprint, data.n_train):
        path, sha = rec.artifacts[STATE_ARTIFACT]
        try:
            tensors = load_state(Path(path), sha256=sha)
            state = State.from_parts(tensors, read_meta(Path(path)))
            ckpts = {}
            for e in cfg.checkpoint_epochs:
                if e == short.epochs:
                    ckpts[e] = state.weights
                elif 0 < e < short.epochs:
                    name = f"epoch{e:04d}"
                    p, s = rec.artifacts[name]
                    ckpts[e] = load_state(Path(p), sha256=s)
        except (BatchlabError, KeyError, ValueError):
            continue  # a state that cannot be read is no prefix: train from scratch
        if len(state.probes) != len(cfg.probes) or state.epoch != short.epochs:
            continue
        return Resume(state=state, rows=rows_for(rec.epochs, cfg, data), checkpoints=ckpts,
                      source=rec.run_id)
    return None


def in_call_prefixes(cfgs: Sequence[TrainConfig], n_train: int) -> dict[int, int]:
    """For configs trained together: index -> index of the longest other config in the list
    whose training is its prefix (so that one is trained first, keeps its state, and this one
    continues it)."""
    out: dict[int, int] = {}
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        if continuable(c) is None and probes_continuable(c):
            by_key.setdefault(prefix_key(c, ""), []).append(i)
    for idxs in by_key.values():
        for i in idxs:
            best = None
            for j in idxs:
                if (j != i and prefix_reason(cfgs[j], cfgs[i], n_train) is None
                        and (best is None or cfgs[j].epochs > cfgs[best].epochs)):
                    best = j
            if best is not None:
                out[i] = best
    return out


def waves(n: int, after: dict[int, int]) -> list[list[int]]:
    """Indices 0..n-1 in training order: first those continuing no other config of the list,
    then those whose prefix is in the wave before, and so on."""
    depth: dict[int, int] = {}

    def d(i: int) -> int:
        if i not in depth:
            depth[i] = 0 if i not in after else d(after[i]) + 1
        return depth[i]

    out: list[list[int]] = [[] for _ in range(max((d(i) for i in range(n)), default=-1) + 1)]
    for i in range(n):
        out[d(i)].append(i)
    return out



def continued_epochs(cfgs: Sequence[TrainConfig], store: Store | None,
                     kept: Sequence[TrainConfig] = ()) -> dict[int, int]:
    """For a plan: index -> epochs a config will not train because it continues a prefix -
    trained first in the same call (`in_call_prefixes`, assuming it runs its whole length: the
    worst case), planned earlier to keep its state (`kept`), or stored with its state
    (`prefix_epochs`)."""
    from batchlab.engine.setup import get_data

    if not cfgs:
        return {}
    td = get_data(cfgs[0], torch.device("cpu"))
    if getattr(td, "streamed", False) or not td.n_train:
        return {}
    out = {i: cfgs[j].epochs for i, j in in_call_prefixes(cfgs, td.n_train).items()}
    for i, c in enumerate(cfgs):
        n = get_data(c, torch.device("cpu")).n_train
        earlier = [k.epochs for k in kept if k.target_metric is None
                   and prefix_reason(k, c, n) is None]
        best = max([prefix_epochs(store, c, get_data(c, torch.device("cpu"))), *earlier])
        if best > out.get(i, 0):
            out[i] = best
    return out
