"""The trainer: learning, checkpoints, exact resume, the NaN guard, metrics and pictures."""

import math

import pytest
import torch
from PIL import Image

from fastvae.io import data as data_lib
from fastvae.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model
from fastvae.training.config import TrainConfig
from fastvae.training.metrics import read_metrics
from fastvae.training import trainer as train_module
from fastvae.training.schedule import BURDA_EPOCHS, schedule_factor
from fastvae.training.trainer import Trainer, TrainingDiverged, make_optimizer, split_validation, train


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


# ---------------------------------------------------------------------------- the lean loop


def test_optimizers_use_fused_kernels_and_adamw_trains(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=1, optimizer="adamw"), *digits)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"]
    assert math.isfinite(trainer.fit()[0]["train_elbo"])
    for name in ("adam", "sgd", "adagrad"):
        assert make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], 0.1).defaults["fused"], name
    # Parameters fused kernels do not take fall back to foreach instead of failing.
    meta = make_optimizer("adam", [torch.nn.Parameter(torch.zeros(2, device="meta"))], 0.1)
    assert meta.defaults["foreach"] and not meta.defaults["fused"]


def test_binarize_draws_bernoulli():
    # u < p is a Bernoulli(p) draw: the mean of many draws is p, 0 stays 0 and 1 stays 1.
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).expand(200_000, 5)
    draws = data_lib.binarize(p, "dynamic", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), p[0], atol=4e-3, rtol=0)
    assert draws[:, 0].max() == 0 and draws[:, 4].min() == 1


def test_trainer_batches_are_binarized_in_the_gather_keyed_by_row(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=1), *digits)
    images = trainer.train_set.images
    chosen = torch.tensor([5, 0, 7])
    x, _ = trainer._gather(chosen, torch.Generator().manual_seed(4))
    assert set(x.unique().tolist()) <= {0.0, 1.0} and x.shape == (3, *images.shape[1:])
    # The same seed gives each row the same draw whichever batch it is in (a data-parallel shard, a replay).
    again, _ = trainer._gather(torch.tensor([7, 5]), torch.Generator().manual_seed(4))
    assert torch.equal(again, x[[2, 0]])


@pytest.mark.parametrize("check_every", [1, 4, 1000])
def test_nan_guard_names_the_same_step_whatever_the_check_window(tmp_path, digits, monkeypatch, check_every):
    """The guard checks once per window and replays the window to find and name the first bad step."""
    monkeypatch.setattr(train_module, "CHECK_EVERY", check_every)
    trainer = Trainer(small_config(tmp_path, epochs=2), *digits)
    bad_step = 23  # in epoch 2 (16 steps per epoch)
    original = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        if trainer.step + 1 == bad_step:
            out.kl.data.fill_(float("inf"))
            out.elbo.data.fill_(float("-inf"))
        return out

    trainer.model.forward = poisoned
    with pytest.raises(TrainingDiverged, match=rf"non-finite KL at epoch 2, step {bad_step};.*epoch 1\) is kept"):
        trainer.fit()
    assert load_checkpoint(trainer.checkpoint_path)["epoch"] == 1


# ---------------------------------------------------------------------------- learning-rate schedules


def test_schedule_shapes():
    assert schedule_factor("constant", 0.7) == 1.0
    assert schedule_factor("cosine", 0.0) == 1.0 and schedule_factor("cosine", 1.0) == 0.0
    assert schedule_factor("cosine", 0.5) == pytest.approx(0.5)
    # Burda et al.: 3^i of 3280 epochs at 10^(-i/7).
    assert BURDA_EPOCHS == 3280
    factors = [schedule_factor("burda", (epoch + 0.5) / BURDA_EPOCHS) for epoch in range(BURDA_EPOCHS)]
    expected = [10 ** (-i / 7) for i in range(8) for _ in range(3**i)]
    assert factors == pytest.approx(expected)
    with pytest.raises(ValueError, match="lr_schedule"):
        schedule_factor("linear", 0.5)


def test_cosine_anneals_to_zero_over_the_run(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, epochs=3, lr_schedule="cosine"), *digits)
    history = trainer.fit()
    lrs = [row["lr"] for row in history]
    assert lrs[0] < 3e-3 and lrs == sorted(lrs, reverse=True)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.schedule.lr(trainer.step - 1))
    assert trainer.schedule.lr(trainer.step) == 0.0 and trainer.schedule.finished(trainer.step)


@pytest.mark.parametrize("schedule", ["cosine", "burda"])
def test_resume_with_a_schedule_matches_an_uninterrupted_run(tmp_path, digits, schedule):
    straight = Trainer(small_config(tmp_path / "a", epochs=4, lr_schedule=schedule), *digits)
    straight.fit()

    first = Trainer(small_config(tmp_path / "b", epochs=4, lr_schedule=schedule), *digits)
    run_epoch = first.train_epoch

    def killed_in_epoch_3(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return run_epoch(epoch)

    first.train_epoch = killed_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = Trainer(small_config(tmp_path / "b", epochs=4, lr_schedule=schedule), *digits)
    resumed.fit(resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    a, b = read_metrics(straight.metrics_path), read_metrics(resumed.metrics_path)
    assert [(r["train_elbo"], r["lr"]) for r in a] == [(r["train_elbo"], r["lr"]) for r in b]


def test_time_budget_plans_the_schedule_from_the_epoch_time(tmp_path, digits, monkeypatch):
    """A fake clock: every epoch takes 10 s; a 1-minute budget fits 6 epochs of the 100 asked for."""
    now = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: now[0])
    trainer = Trainer(small_config(tmp_path, epochs=100, lr_schedule="cosine", max_minutes=1.0), *digits)
    run_epoch = trainer.train_epoch

    def ten_second_epoch(epoch):
        now[0] += 10.0
        return run_epoch(epoch)

    trainer.train_epoch = ten_second_epoch
    history = trainer.fit()
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert trainer.schedule.finished(trainer.step) and history[-1]["lr"] < 1e-4
    assert all(later <= earlier for earlier, later in zip([r["lr"] for r in history], [r["lr"] for r in history][1:]))
    # The plan is in the checkpoint: a resumed run goes on from it.
    saved = load_checkpoint(trainer.checkpoint_path)["lr_schedule"]
    assert saved == trainer.schedule.state_dict() and saved["end_step"] == trainer.step


def test_extending_a_scheduled_run_replans_it_for_the_new_epoch_count(tmp_path, digits):
    Trainer(small_config(tmp_path, epochs=2, lr_schedule="cosine"), *digits).fit()
    extended = Trainer(small_config(tmp_path, epochs=4, lr_schedule="cosine"), *digits)
    extended.resume()
    assert extended.schedule.end_step == 4 * extended.num_batches
    assert extended.schedule.lr(extended.step) == pytest.approx(3e-3 * 0.5)


def test_bad_schedule_options(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        small_config(tmp_path, lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="max_minutes"):
        small_config(tmp_path, max_minutes=0.0).validate()
