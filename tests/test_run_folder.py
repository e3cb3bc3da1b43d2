"""One run per output folder (a lock held for the run's life), temporary files named per process, the
disk-full advice only when the disk is full, and exports readable as the umask allows."""

import errno
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from fastvae.io.export import save_pretrained
from fastvae.models.vae import VAE
from fastvae.training import checkpoint as checkpoint_lib
from fastvae.training import distributed, runlock
from fastvae.training.callbacks import Callback
from fastvae.training.config import TrainConfig
from fastvae.training.trainer import train

from cli_helpers import error_line, run_cli, run_in_process

SMALL = ["--epochs", "1", "--hidden", "8", "--latent-dim", "2"]


@pytest.fixture
def held(tmp_path):
    """tmp_path/run locked by this process, as a running `fastvae train` holds its folder."""
    folder = tmp_path / "run"
    folder.mkdir()
    fd = runlock.acquire(folder)
    yield folder
    runlock.release(folder, fd)


def test_a_second_run_into_the_same_folder_is_refused_at_once(held):
    result = run_cli("train", "--out", str(held), *SMALL)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("fastvae train: error: ") and "Traceback" not in result.stderr
    assert f"--out {held} is in use: process {os.getpid()} is training into it" in line
    assert sorted(p.name for p in held.iterdir()) == [runlock.LOCK_NAME]  # nothing of the refused run


def test_a_data_parallel_run_into_a_busy_folder_is_refused_before_it_launches(held):
    result = run_in_process("train", "--out", held, "--nproc", "2", *SMALL)
    error_line(result, "train", f"process {os.getpid()} is training into it")


def test_the_lock_is_released_when_its_process_dies(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastvae.training import runlock; "
                               "runlock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runlock.RunFolderBusy, match=f"process {holder.pid} "):
            runlock.acquire(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / runlock.LOCK_NAME).exists()  # a crash leaves the file, but the kernel dropped the lock
    runlock.release(folder, runlock.acquire(folder))
    assert not (folder / runlock.LOCK_NAME).exists()


class LockProbe(Callback):
    """Tries to take the run's folder at the end of each epoch (another open file: flock refuses it too)."""

    def __init__(self, folder):
        self.folder, self.refused = folder, []

    def on_epoch_end(self, row):
        try:
            runlock.release(self.folder, runlock.acquire(self.folder))
            self.refused.append(False)
        except runlock.RunFolderBusy:
            self.refused.append(True)


def test_a_run_holds_its_folder_while_it_trains_and_leaves_no_lock_file(tmp_path):
    folder = tmp_path / "run"
    probe = LockProbe(folder)
    config = TrainConfig(out_dir=str(folder), epochs=2, latent_dim=2, arch_config={"hidden": [8]})
    train(config, callbacks=[probe])
    assert probe.refused == [True, True]
    assert not (folder / runlock.LOCK_NAME).exists()
    train(config, resume=True)  # the folder is free again


class FakeWorld(distributed.World):
    """A rank of a data-parallel run whose all_sum adds what the other ranks report."""

    def __init__(self, rank, size, others):
        super().__init__(rank, size)
        object.__setattr__(self, "others", others)

    def all_sum(self, values):
        return [v + o for v, o in zip(values, self.others)]


def test_every_rank_learns_that_rank_0_could_not_lock(tmp_path, held):
    with pytest.raises(runlock.RunFolderBusy, match=f"process {os.getpid()} is training"):
        with runlock.hold(held, FakeWorld(1, 2, others=[1.0, float(os.getpid())])):
            pytest.fail("rank 1 trained although rank 0 has no lock")
    with pytest.raises(runlock.RunFolderBusy):  # rank 0 itself, after telling the others
        with runlock.hold(held, FakeWorld(0, 2, others=[0.0, 0.0])):
            pytest.fail("rank 0 trained without the lock")


def test_only_rank_0_takes_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with runlock.hold(folder, FakeWorld(1, 2, others=[0.0, 0.0])):
        assert not (folder / runlock.LOCK_NAME).exists()
    with runlock.hold(folder, FakeWorld(0, 2, others=[0.0, 0.0])):
        assert (folder / runlock.LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (folder / runlock.LOCK_NAME).exists()


def test_temporary_files_are_named_per_process(tmp_path, monkeypatch):
    written = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: written.append(path) or real_save(obj, path))
    checkpoint_lib.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert [p.name for p in written] == [f".checkpoint.pt.{os.getpid()}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("error,full", [(OSError(errno.ENOSPC, "No space left on device"), True),
                                        (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
                                        (PermissionError(errno.EACCES, "Permission denied"), False)])
def test_the_disk_full_advice_only_when_the_disk_is_full(tmp_path, monkeypatch, error, full):
    def failing_save(obj, path, *args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(checkpoint_lib.CheckpointWriteError) as info:
        checkpoint_lib.save_checkpoint(tmp_path / "checkpoint.pt", {"model": {"w": torch.zeros(4)}})
    message = str(info.value)
    assert ("is full" in message) == full and ("free space" in message) == full, message
    assert message.endswith("continue with --resume")


def small_model():
    return VAE((1, 8, 8), 2, "mlp", encoder_config={"hidden": [8]}, decoder_config={"hidden": [8]})


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exports_are_readable_as_the_umask_allows(tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = save_pretrained(small_model(), tmp_path / "shared")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
