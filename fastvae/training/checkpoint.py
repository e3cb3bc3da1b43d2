"""Checkpoints: plain tensors and values only, so torch.load(weights_only=True) reads them."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from ..models.vae import VAE

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointWriteError(RuntimeError):
    """The checkpoint could not be written; the message says why, where, and what was kept."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename, so a kill never leaves a half-written checkpoint.

    On failure the temporary file is removed and the previous checkpoint stays as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, state, exc)) from None


def _write_failure(path: Path, state: dict, exc: BaseException) -> str:
    """One sentence: why the write failed, where, and which checkpoint is kept."""
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    if getattr(exc, "errno", None) == errno.ENOSPC or free < _tensor_bytes(state):
        reason = f"the disk holding {path.parent} is full ({free} bytes free)"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    try:
        kept = f"the previous checkpoint (epoch {load_checkpoint(path)['epoch']}) is kept at {path}"
    except (FileNotFoundError, ValueError):
        kept = "no earlier checkpoint exists"
    return f"could not write the checkpoint {path}: {reason}; {kept}; free space and continue with --resume"


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a nested state (what torch.save needs at least)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def load_checkpoint(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, foreign formats
        raise ValueError(f"{path} is not a readable fastvae checkpoint: {exc}") from exc
    missing = {"model", "model_config", "train_config", "epoch"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a fastvae checkpoint (missing {sorted(missing)})")
    return state


def load_model(path) -> tuple[VAE, dict]:
    """Rebuild a model from a checkpoint alone; returns (model, checkpoint)."""
    state = load_checkpoint(path)
    model = VAE.from_config(state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, state
