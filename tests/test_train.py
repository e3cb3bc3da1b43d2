"""The trainer: learning, checkpoints, exact resume, the NaN guard, metrics and pictures."""

import math

import pytest
import torch
from PIL import Image

from fastvae import data as data_lib
from fastvae.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model
from fastvae.config import TrainConfig
from fastvae.metrics import read_metrics
from fastvae.train import Trainer, TrainingDiverged, split_validation, train


def small_config(tmp_path, **overrides):
    values = dict(data="digits", out_dir=str(tmp_path / "run"), latent_dim=4, arch_config={"hidden": [64]},
                  epochs=3, batch_size=100, lr=3e-3, seed=0, val_fraction=0.1)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def digits():
    return split_validation(data_lib.load_dataset("digits", "train"), 0.1)


def test_training_lowers_the_loss(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=8), *digits)
    history = trainer.fit()
    assert history[-1]["train_elbo"] > history[0]["train_elbo"] + 3
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]
    rows = read_metrics(trainer.metrics_path)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert {"train_elbo", "train_rec", "train_kl", "val_elbo", "seconds", "examples_per_second"} <= set(rows[0])


@pytest.mark.parametrize("objective,samples", [("monte_carlo", 2), ("iwae", 3)])
def test_other_objectives_train(tmp_path, digits, objective, samples):
    trainer = Trainer(small_config(tmp_path, epochs=2, objective=objective, num_samples=samples), *digits)
    history = trainer.fit()
    assert all(math.isfinite(r["train_elbo"]) for r in history)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_optimizers(tmp_path, digits, optimizer):
    trainer = Trainer(small_config(tmp_path, epochs=1, optimizer=optimizer, lr=0.01), *digits)
    assert math.isfinite(trainer.fit()[0]["train_elbo"])


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, digits):
    straight = Trainer(small_config(tmp_path / "a", epochs=4, warmup_epochs=2), *digits)
    straight.fit()

    first = Trainer(small_config(tmp_path / "b", epochs=2, warmup_epochs=2), *digits)
    first.fit()  # "killed" after epoch 2: only its checkpoint survives
    resumed = Trainer(small_config(tmp_path / "b", epochs=4, warmup_epochs=2), *digits)
    resumed.fit(resume=True)

    assert resumed.epoch == 4
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a, b = read_metrics(straight.metrics_path), read_metrics(resumed.metrics_path)
    assert [r["train_elbo"] for r in a] == [r["train_elbo"] for r in b]
    # The rows kept across the resume are rewritten as they were: "2" stays "2", not "2.0".
    epochs = [line.split(",")[0] for line in resumed.metrics_path.read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3", "4"]


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=1), *digits)
    trainer.fit()
    good = trainer.checkpoint_path.read_bytes()
    trainer.config.epochs = 3
    with torch.no_grad():
        next(trainer.model.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"non-finite reconstruction log-likelihood at epoch 2, step \d+.*kept"):
        trainer.fit()
    assert trainer.checkpoint_path.read_bytes() == good
    assert load_checkpoint(trainer.checkpoint_path)["epoch"] == 1


def test_non_finite_gradient_is_named(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=1), *digits)
    param = next(trainer.model.encoder.parameters())
    param.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(TrainingDiverged, match="non-finite gradient of encoder"):
        trainer.fit()
    assert not trainer.checkpoint_path.exists()


def test_checkpoint_rebuilds_the_model_alone(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=1), *digits)
    trainer.fit()
    model, state = load_model(trainer.checkpoint_path)
    x = digits[1].images[:5]
    torch.testing.assert_close(model.reconstruct(x), trainer.model.eval().reconstruct(x))
    assert state["train_config"]["data"] == "digits"
    # Plain tensors and values only: the safe loader reads it.
    torch.load(trainer.checkpoint_path, weights_only=True)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fastvae checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a fastvae checkpoint"):
        load_checkpoint(other)


@pytest.mark.parametrize(
    "override,match",
    [({"objective": "elbo"}, "objective"), ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
     ({"optimizer": "lbfgs"}, "optimizer"), ({"val_fraction": 1.5}, "val_fraction"),
     ({"binarize": "maybe"}, "binarize"), ({"precision": "fp8"}, "precision"),
     ({"precision": "fp16"}, "fp16 needs a CUDA device")],
)
def test_bad_configuration(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        small_config(tmp_path, **override).validate()


def test_train_writes_pictures(tmp_path):
    trainer, _ = train(small_config(tmp_path, epochs=2))
    for name in ("samples.png", "reconstructions.png", "loss.png", CHECKPOINT_NAME, "metrics.csv"):
        assert (trainer.out_dir / name).exists(), name
    with Image.open(trainer.out_dir / "samples.png") as image:
        assert image.size[0] > 64


def test_conditional_training_and_class_rows(tmp_path):
    trainer, _ = train(small_config(tmp_path, epochs=1, conditional=True))
    assert trainer.model.condition_dim == 10
    assert (trainer.out_dir / "samples.png").exists()


def test_bf16_training_stays_close_to_float32(tmp_path, digits):
    fp32 = Trainer(small_config(tmp_path / "fp32", epochs=3), *digits).fit()
    bf16 = Trainer(small_config(tmp_path / "bf16", epochs=3, precision="bf16"), *digits).fit()
    assert bf16[-1]["train_elbo"] == pytest.approx(fp32[-1]["train_elbo"], abs=1.0)
