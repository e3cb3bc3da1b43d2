"""Data-parallel training: 2 CPU processes under torchrun match one process on the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from fastvae.training.checkpoint import load_checkpoint
from fastvae.training.metrics import read_metrics

ARGS = ["--epochs", "2", "--hidden", "64", "--latent-dim", "4", "--batch-size", "64", "--seed", "3", "--lr", "3e-3"]


def train_cli(out, *extra):
    result = subprocess.run([sys.executable, "-m", "fastvae", "train", "--out", str(out), *ARGS, *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one_process(tmp_path):
    train_cli(tmp_path / "single")
    train_cli(tmp_path / "ddp", "--nproc", "2")
    single = load_checkpoint(tmp_path / "single")
    ddp = load_checkpoint(tmp_path / "ddp")
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    a, b = read_metrics(tmp_path / "single" / "metrics.csv"), read_metrics(tmp_path / "ddp" / "metrics.csv")
    assert [r["epoch"] for r in b] == [1, 2]  # rank 0 alone writes: one row per epoch
    for x, y in zip(a, b):
        assert abs(x["train_elbo"] - y["train_elbo"]) < 1e-3
    leftovers = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert leftovers == ["checkpoint.pt", "interpolations.png", "loss.png", "metrics.csv", "reconstructions.png",
                         "samples.png", "traversal.png"]


def test_resume_under_torchrun(tmp_path):
    train_cli(tmp_path / "run", "--nproc", "2")
    result = subprocess.run(
        [sys.executable, "-m", "fastvae", "train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "3",
         "--nproc", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run")["epoch"] == 3
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [1, 2, 3]


def test_process_group_owns_the_teardown(monkeypatch):
    """The context manager leaves the group after its block: with a barrier normally, without one on an error."""
    from fastvae.training import distributed

    calls = []
    monkeypatch.setattr(distributed, "init_from_environment", lambda device: calls.append("join") or distributed.World())
    monkeypatch.setattr(distributed, "shutdown", lambda wait_for_peers=True: calls.append(("leave", wait_for_peers)))
    with distributed.process_group("cpu") as world:
        calls.append("work")
        assert world.is_main
    assert calls == ["join", "work", ("leave", True)]
    calls.clear()
    with pytest.raises(KeyError):
        with distributed.process_group("cpu"):
            raise KeyError("a rank failed")
    assert calls == ["join", ("leave", False)]


def test_under_torchrun_a_busy_folder_stops_every_rank(tmp_path):
    """Rank 0 cannot lock the folder: every rank stops at once with the same line (no rank trains, none
    waits for a peer that stopped); torchrun started directly, so the launcher's early check is not there."""
    from fastvae.training import runlock

    folder = tmp_path / "run"
    folder.mkdir()
    fd = runlock.acquire(folder)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastvae",
             "train", "--out", str(folder), *ARGS], capture_output=True, text=True, timeout=600)
    finally:
        runlock.release(folder, fd)
    assert result.returncode != 0
    busy = [line for line in result.stderr.splitlines() if "fastvae train: error:" in line]
    assert len(busy) == 2 and all(f"is in use: process {os.getpid()}" in line for line in busy), \
        result.stderr[-3000:]
    assert not (folder / "checkpoint.pt").exists()
