"""Checkpoints: plain tensors and values only, so torch.load(weights_only=True) reads them."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..models.vae import VAE

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointWriteError(UserError, RuntimeError):
    """The checkpoint could not be written; the message says why, where, and what was kept."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename, so a kill never leaves a half-written checkpoint.

    On failure the temporary file is removed and the previous checkpoint stays as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, state, exc)) from None


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: named per process, so that two
    processes writing the same file never write into, or remove, each other's temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_failure(path: Path, state: dict, exc: BaseException) -> str:
    """One sentence: why the write failed, where, which checkpoint is kept, and what to do."""
    if _disk_full(path, state, exc):
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        reason, advice = f"the disk holding {path.parent} is full ({free} bytes free)", "free space"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
        advice = "fix that"
    try:
        kept = f"the previous checkpoint (epoch {load_checkpoint(path)['epoch']}) is kept at {path}"
    except (FileNotFoundError, ValueError):
        kept = "no earlier checkpoint exists"
    return f"could not write the checkpoint {path}: {reason}; {kept}; {advice} and continue with --resume"


def _disk_full(path: Path, state: dict, exc: BaseException) -> bool:
    """ENOSPC, or torch's short write (a RuntimeError without an errno) with less room left than the tensors need."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return path.parent.exists() and shutil.disk_usage(path.parent).free < _tensor_bytes(state)


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
