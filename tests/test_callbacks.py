"""The trainer's callbacks, the TensorBoard writer on them, and the trainer leaving global state alone."""

import subprocess
import sys

import pytest
import torch

from fastvae.io import data as data_lib
from fastvae.training.callbacks import Callback, TensorBoardLogger, scalar_tag
from fastvae.training.config import TrainConfig
from fastvae.training.trainer import Trainer, split_validation, train


def small_config(tmp_path, **overrides):
    values = dict(out_dir=str(tmp_path / "run"), epochs=2, latent_dim=3, arch_config={"hidden": [16]})
    return TrainConfig(**{**values, **overrides})


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_validation(self, epoch, metrics):
        self.calls.append(("validation", epoch, sorted(metrics)))

    def on_epoch_end(self, row):
        self.calls.append(("epoch_end", row["epoch"]))

    def on_picture_written(self, name, path):
        assert path.is_file()
        self.calls.append(("picture", name))

    def close(self):
        self.calls.append(("close",))


def test_hooks_are_called_in_order(tmp_path):
    recorder = Recorder()
    train(small_config(tmp_path), callbacks=[recorder])
    val = ["val_elbo", "val_kl", "val_rec"]
    assert recorder.calls == [
        ("validation", 1, val), ("epoch_end", 1), ("validation", 2, val), ("epoch_end", 2),
        ("picture", "samples"), ("picture", "reconstructions"), ("picture", "interpolations"),
        ("picture", "traversal"), ("picture", "loss"), ("close",),
    ]


def test_close_is_called_when_training_fails(tmp_path):
    class Failing(Recorder):
        def on_epoch_end(self, row):
            raise KeyboardInterrupt

    recorder = Failing()
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tmp_path), callbacks=[recorder])
    assert recorder.calls[-1] == ("close",)


def test_a_fresh_tensorboard_log_replaces_an_earlier_runs_events_and_resuming_keeps_them(tmp_path):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "tensorboard"
    log_dir.mkdir()
    (log_dir / "events.out.tfevents.1.old").write_bytes(b"old run")
    (log_dir / "notes.txt").write_text("not an event file")
    TensorBoardLogger(log_dir).close()  # resuming: the earlier events stay
    assert (log_dir / "events.out.tfevents.1.old").exists()
    TensorBoardLogger(log_dir, fresh=True).close()
    assert not (log_dir / "events.out.tfevents.1.old").exists() and (log_dir / "notes.txt").exists()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # the new run's


def test_scalar_tags():
    assert [scalar_tag(c) for c in ("train_elbo", "val_kl", "seconds", "examples_per_second")] == [
        "train/elbo", "val/kl", "speed/seconds", "speed/examples_per_second"]


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "fastvae", "train", "--epochs", "2", "--out", str(out),
                             "--hidden", "16", "--latent-dim", "3", "--tensorboard"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"train/elbo", "train/rec", "train/kl", "train/lr", "val/elbo", "val/rec", "val/kl",
                                    "speed/seconds", "speed/examples_per_second"}
    assert [e.step for e in events.Scalars("train/elbo")] == [1, 2]
    assert [e.step for e in events.Scalars("val/elbo")] == [1, 2]
    assert events.Scalars("train/elbo")[1].value > events.Scalars("train/elbo")[0].value - 5
    assert {"pictures/samples", "pictures/reconstructions", "pictures/loss"} <= set(tags["images"])
    sample = events.Images("pictures/samples")[-1]
    assert sample.step == 2 and sample.width > 64 and sample.height > 64


def test_trainer_leaves_the_global_rng_alone_and_weights_follow_the_seed(tmp_path):
    digits = split_validation(data_lib.load_dataset("digits"), 0.1)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = Trainer(small_config(tmp_path, seed=7), *digits)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the weights still come from the seed alone
    second = Trainer(small_config(tmp_path, seed=7), *digits)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    third = Trainer(small_config(tmp_path, seed=8), *digits)
    assert not torch.equal(first.model.state_dict()["encoder.net.0.weight"],
                           third.model.state_dict()["encoder.net.0.weight"])


def test_python_resume_refuses_a_setting_that_contradicts_the_run(tmp_path):
    train(small_config(tmp_path, epochs=1, lr=3e-3))
    with pytest.raises(ValueError, match=r"lr=0.1 \(the run has 0.003\).*another out_dir"):
        train(TrainConfig(out_dir=str(tmp_path / "run"), epochs=2, lr=0.1), resume=True)
    # Defaults and the run's own values are not choices against it: the run continues.
    trainer, history = train(TrainConfig(out_dir=str(tmp_path / "run"), epochs=2, lr=3e-3), resume=True)
    assert trainer.epoch == 2 and trainer.config.arch_config == {"hidden": [16]}
