"""Bad input a user runs into ends in one sentence naming the file or flag and what to do."""

import errno

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.training import checkpoint as checkpoint_lib
from fastvae.training.config import TrainConfig
from fastvae.training.trainer import Trainer, split_validation
from fastvae.io import data as data_lib

from cli_helpers import run_cli


def one_line_error(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert any(all(n in line for n in needles) for line in lines), result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "run"
    result = run_cli("train", "--epochs", "1", "--out", str(out), "--hidden", "16", "--latent-dim", "4")
    assert result.returncode == 0, result.stderr
    return out


def test_image_folder_with_a_corrupt_png(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    with pytest.raises(ValueError, match=r"3\.png: not a readable image"):
        data_lib.load_dataset(str(folder))
    one_line_error(run_cli("train", "--data", str(folder), "--epochs", "1", "--out", str(tmp_path / "run")),
                   "3.png", "not a readable image", "remove")


def test_out_naming_an_existing_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    one_line_error(run_cli("train", "--epochs", "1", "--out", str(target)), f"--out {target}", "existing file")
    assert target.read_text() == "mine"


def test_resume_with_contradicting_flags_refuses_and_names_them(run_dir):
    before = (run_dir / "checkpoint.pt").read_bytes()
    result = run_cli("train", "--out", str(run_dir), "--resume", "--epochs", "2", "--latent-dim", "3",
                     "--hidden", "16", "--objective", "iwae")
    one_line_error(result, "--latent-dim 3 (the run has 4)", "--objective iwae (the run has analytic)", "--epochs")
    assert "--hidden" not in result.stderr  # the same value as the run's is no contradiction
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_resume_with_the_run_default_value_spelled_out(run_dir):
    """--latent-dim 8 is the parser's default, but not this run's (4): typed, it contradicts."""
    one_line_error(run_cli("train", "--out", str(run_dir), "--resume", "--latent-dim", "8"),
                   "--latent-dim 8 (the run has 4)")


def test_resume_applies_epochs_and_says_so(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--epochs", "1", "--out", str(out), "--hidden", "16").returncode == 0
    result = run_cli("train", "--out", str(out), "--resume", "--epochs", "2", "--hidden", "16")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr and "--epochs 2" in result.stderr
    assert "trained to epoch 2" in result.stdout


def small_trainer(tmp_path, **overrides):
    config = TrainConfig(out_dir=str(tmp_path / "run"), epochs=2, latent_dim=3, arch_config={"hidden": [16]},
                         **overrides)
    return Trainer(config, *split_validation(data_lib.load_dataset("digits"), 0.1))


def test_full_disk_while_writing_the_checkpoint(tmp_path, monkeypatch):
    trainer = small_trainer(tmp_path)
    trainer.config.epochs = 1
    trainer.fit()
    kept = trainer.checkpoint_path.read_bytes()
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # a partial file is there when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    trainer.config.epochs = 2
    with pytest.raises(checkpoint_lib.CheckpointWriteError) as info:
        trainer.fit(resume=True)
    message = str(info.value)
    assert "\n" not in message
    assert "is full" in message and str(trainer.out_dir) in message
    assert f"previous checkpoint (epoch 1) is kept at {trainer.checkpoint_path}" in message
    assert trainer.checkpoint_path.read_bytes() == kept
    assert sorted(p.name for p in trainer.out_dir.iterdir()) == ["checkpoint.pt", "metrics.csv"]


def test_torch_short_write_error_is_read_as_a_full_disk(tmp_path, monkeypatch):
    """torch reports a short write as a RuntimeError ("unexpected pos ..."); with no room left it is a full disk."""
    def short_write(obj, path, *args, **kwargs):
        open(path, "wb").write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4246")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(checkpoint_lib.CheckpointWriteError, match="is full .10 bytes free.; no earlier checkpoint"):
        checkpoint_lib.save_checkpoint(path, {"model": {"w": torch.zeros(100)}})
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_named(tmp_path, monkeypatch):
    def denied(obj, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(checkpoint_lib.CheckpointWriteError, match="PermissionError: .* Permission denied"):
        checkpoint_lib.save_checkpoint(tmp_path / "c.pt", {"epoch": 1})
