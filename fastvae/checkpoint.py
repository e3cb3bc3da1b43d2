"""Checkpoints: plain tensors and values only, so torch.load(weights_only=True) reads them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import VAE

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename, so a kill never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
