"""Weights on disk in safetensors: a flat table of tensors plus string metadata. Loading parses
a JSON header and copies bytes, so (unlike pickle) it can never execute code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from batchlab.atomic import atomic_path, to_json
from batchlab.errors import BatchlabError


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomic write (temp file + rename): a crash never leaves a half checkpoint."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"batchlab": to_json(meta or {})})


def load_state(path: Path, device: str | torch.device = "cpu", *, sha256: str | None = None,
               allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint. With `sha256` (the digest the store recorded when the file was
    written) the bytes are verified first: a replaced or corrupted file is an error, never
    used. NaN/inf weights are refused too (`allow_nonfinite` for diverged runs on purpose)."""
    from batchlab.atomic import sha256_file

    path = Path(path)
    try:
        if sha256 is not None and sha256_file(path) != sha256:
            raise BatchlabError(f"checkpoint {path} does not match the sha256 recorded in the store "
                                f"(changed or corrupted since it was written); `batchlab runs delete "
                                f"--damaged` deletes such runs, so they are recomputed")
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise BatchlabError(f"cannot load checkpoint {path}: {e}") from None
    if not allow_nonfinite:
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise BatchlabError(f"checkpoint {path} holds NaN or infinite weights ({', '.join(bad[:3])}); "
                                f"it cannot be used")
    return state


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("batchlab", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise BatchlabError(f"cannot read checkpoint {path}: {e}") from None


def save_model(path: Path, model: nn.Module, meta: dict | None = None) -> None:
    save_state(path, model.state_dict(), meta)


def load_into(model: nn.Module, path: Path, sha256: str | None = None) -> nn.Module:
    """Load weights into `model`, with a clear error when the shapes do not fit."""
    state = load_state(path, next(model.parameters()).device, sha256=sha256)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or bad:
        detail = "; ".join(
            s
            for s in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shape mismatch {bad[:3]}" if bad else "",
            )
            if s
        )
        raise BatchlabError(f"checkpoint {path} does not fit the model: {detail}")
    model.load_state_dict(state)
    return model
