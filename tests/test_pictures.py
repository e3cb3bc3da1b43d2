"""Every picture a run writes, opened and checked for what its name promises."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.training.config import TrainConfig
from fastvae.io.images import (SPLIT_COLOURS, image_scale, metric_panels, plot_metrics, save_interpolation_grid,
                               save_traversal_grid, y_range)
from fastvae.training.trainer import train

from cli_helpers import run_cli

PAD = 2  # the grids' padding in pixels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short run on the digits; its folder holds every picture `fastvae train` writes."""
    out = tmp_path_factory.mktemp("pictures") / "run"
    config = TrainConfig(out_dir=str(out), epochs=4, latent_dim=4, arch_config={"hidden": [64]}, lr=3e-3)
    trainer, _ = train(config)
    return trainer


def realistic_metrics(path):
    """A run's metrics.csv: the ELBO climbs from -60 to -25 while throughput sits near 2e4 examples/s."""
    rows = ["epoch,train_elbo,train_rec,train_kl,val_elbo,val_rec,val_kl,seconds,examples_per_second"]
    for e in range(1, 31):
        elbo = -25 - 35 * 0.85 ** e
        rows.append(f"{e},{elbo},{elbo - 5},{5 + e / 10},{elbo + 1},{elbo - 4},{5.2 + e / 10},0.08,{20000 + 50 * e}")
    path.write_text("\n".join(rows) + "\n")
    return path


def rows_with_colour(pixels: np.ndarray, colour, tolerance=40) -> int:
    """How many pixel rows hold the colour (a flat line: a few; a curve spanning its axes: most)."""
    near = (np.abs(pixels[..., :3].astype(int) - np.array(colour)) <= tolerance).all(-1)
    return int(near.any(1).sum())


@pytest.mark.parametrize("renderer", ["pillow", "matplotlib"])
def test_loss_plot_elbo_spans_its_axes(tmp_path, renderer):
    if renderer == "matplotlib":
        pytest.importorskip("matplotlib")
    path = plot_metrics(realistic_metrics(tmp_path / "metrics.csv"), tmp_path / "loss.png", renderer=renderer)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    elbo_panel = pixels[:, : width // 3]  # panels side by side: ELBO, rec, KL
    for split in ("train", "val"):
        assert rows_with_colour(elbo_panel, SPLIT_COLOURS[split]) > 0.6 * height, split


def long_run_elbo(epoch, epochs=964):
    """A long MNIST run in shape: -209 nats to -95 in the first few dozen epochs, then the
    cosine schedule's 5 nats over the remaining 900."""
    return -95 - 114 * math.exp(-(epoch - 1) / 6) + 2.5 * (1 - math.cos(math.pi * epoch / epochs))


def long_run_metrics(path, epochs=964):
    rows = ["epoch,train_elbo"] + [f"{e},{long_run_elbo(e, epochs)}" for e in range(1, epochs + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def curve_row(pixels: np.ndarray, column: int, colour) -> float:
    """The mean row of the colour's pixels in one column of the picture."""
    near = (np.abs(pixels[:, column, :3].astype(int) - np.array(colour)) <= 40).all(-1)
    rows = np.flatnonzero(near)
    assert rows.size, column
    return float(rows.mean())


@pytest.mark.parametrize("renderer", ["pillow", "matplotlib"])
def test_loss_plot_of_a_long_run_shows_the_late_rise(tmp_path, renderer):
    """964 epochs from -209 to -90 nats: the rise after epoch ~100 (about 5 nats) must take a good part
    of the panel's height, not the ~10 pixels it gets on an axis scaled to all 119 nats."""
    if renderer == "matplotlib":
        pytest.importorskip("matplotlib")
    path = plot_metrics(long_run_metrics(tmp_path / "metrics.csv"), tmp_path / "loss.png", renderer=renderer)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    height = pixels.shape[0]
    pixels = pixels.copy()
    pixels[: height // 10] = 255  # the Pillow legend's sample line sits above the frame
    colour = SPLIT_COLOURS["train"]
    columns = np.flatnonzero((np.abs(pixels[..., :3].astype(int) - np.array(colour)) <= 40).all(-1).any(0))
    first, last = columns.min(), columns.max()
    epoch_100 = int(first + 0.1 * (last - first))
    rise = curve_row(pixels, epoch_100, colour) - curve_row(pixels, last - 1, colour)  # rows grow downwards
    assert rise > 0.25 * height, rise


def test_loss_plot_y_range_skips_the_first_epochs_only_where_they_squeeze_the_rest():
    epochs = [float(e) for e in range(1, 965)]
    low, high, start = y_range(epochs, {"train": [long_run_elbo(e) for e in epochs]})
    assert start == 50 and low == pytest.approx(long_run_elbo(50)) and high == pytest.approx(-90, abs=1e-6)
    short = epochs[:10]
    assert y_range(short, {"train": [long_run_elbo(e) for e in short]})[2] is None  # a short run: every point
    lr = [1e-3 * (1 + math.cos(math.pi * e / 964)) / 2 for e in epochs]
    assert y_range(epochs, {"lr": lr}) == (min(lr), max(lr), None)  # the first epochs squeeze nothing


def test_loss_plot_panels_leave_throughput_out(tmp_path):
    from fastvae.io.images import _read_metrics

    _, _, series = _read_metrics(realistic_metrics(tmp_path / "metrics.csv"), None)
    panels = metric_panels(series)
    assert [title for title, _ in panels] == ["ELBO (nats per example)", "reconstruction log p(x|z)",
                                              "KL(q(z|x) || p(z))"]
    assert all(set(lines) == {"train", "val"} for _, lines in panels)


def test_loss_plot_draws_a_learning_rate_panel_only_when_it_changes():
    losses = {"train_elbo": [-3.0, -2.0, -1.5]}
    assert [title for title, _ in metric_panels({**losses, "lr": [1e-3, 1e-3, 1e-3]})] == ["ELBO (nats per example)"]
    assert [title for title, _ in metric_panels({**losses, "lr": [1e-3, 5e-4, 0.0]})] == [
        "ELBO (nats per example)", "lr"]


def test_loss_plot_unknown_renderer(tmp_path):
    with pytest.raises(ValueError, match="renderer"):
        plot_metrics(realistic_metrics(tmp_path / "metrics.csv"), tmp_path / "x.png", renderer="svg")


def tiles(path, rows, cols, size):
    """The grid's images as an array (rows, cols, size, size), in [0, 1]."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64) / 255
    assert pixels.shape == (rows * (size + PAD) + PAD, cols * (size + PAD) + PAD)
    out = np.empty((rows, cols, size, size))
    for r in range(rows):
        for c in range(cols):
            top, left = PAD + r * (size + PAD), PAD + c * (size + PAD)
            out[r, c] = pixels[top:top + size, left:left + size]
    return out


def small(images, scale):
    """Undo the nearest-neighbour upscaling of a tile."""
    return images[..., ::scale, ::scale]


def test_run_writes_every_picture(run):
    for name in ("samples.png", "reconstructions.png", "interpolations.png", "traversal.png", "loss.png"):
        with Image.open(run.out_dir / name) as image:
            image.verify()


def test_interpolation_rows_run_from_one_reconstruction_to_the_other(run, tmp_path):
    model = run.model.eval()
    x = run.val_set.images[:6]
    path = save_interpolation_grid(model, x, tmp_path / "i.png", steps=7)
    scale = image_scale(model.input_shape)
    grid = small(tiles(path, 3, 7, 8 * scale), scale)
    ends = model.reconstruct(x).squeeze(1).numpy()
    for row in range(3):
        np.testing.assert_allclose(grid[row, 0], ends[2 * row], atol=1 / 255 + 1e-6)
        np.testing.assert_allclose(grid[row, -1], ends[2 * row + 1], atol=1 / 255 + 1e-6)
        # a path, not a jump: each step is closer to the end than the one before
        distance = [np.abs(grid[row, c] - grid[row, -1]).sum() for c in range(7)]
        assert distance[0] > distance[3] > distance[-1] == 0


def test_traversal_rows_change_one_dimension_around_the_image(run, tmp_path):
    model = run.model.eval()
    x = run.val_set.images[3]
    path = save_traversal_grid(model, x, tmp_path / "t.png", steps=5, span=2.0)
    scale = image_scale(model.input_shape)
    grid = small(tiles(path, model.latent_dim, 5, 8 * scale), scale)
    centre = model.reconstruct(x.unsqueeze(0))[0, 0].numpy()
    mu = model.encode(x.unsqueeze(0))[0][0]
    for d in range(model.latent_dim):
        np.testing.assert_allclose(grid[d, 2], centre, atol=1 / 255 + 1e-6)  # offset 0 is the image's code
        z = mu.clone()
        z[d] += 2.0
        expected = model.mean_image(model.decode(z.unsqueeze(0)))[0, 0].detach().numpy()
        np.testing.assert_allclose(grid[d, -1], expected, atol=1 / 255 + 1e-6)


def test_traversal_bad_dims(run, tmp_path):
    with pytest.raises(ValueError, match="latent dimensions in 0..3"):
        save_traversal_grid(run.model, run.val_set.images[0], tmp_path / "t.png", dims=[4])


def test_samples_and_reconstructions_show_digits(run):
    """samples.png: 64 different images; reconstructions.png: each input beside its reconstruction."""
    model = run.model.eval()
    scale = image_scale(model.input_shape)
    samples = tiles(run.out_dir / "samples.png", 8, 8, 8 * scale).reshape(64, -1)
    assert len({tuple(np.round(s, 2)) for s in samples}) == 64
    pairs = small(tiles(run.out_dir / "reconstructions.png", 6, 12, 8 * scale), scale)
    x = run.val_set.images[:32]
    np.testing.assert_allclose(pairs[0, 0], x[0, 0].numpy(), atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(pairs[0, 1], model.reconstruct(x[:1])[0, 0].numpy(), atol=1 / 255 + 1e-6)


def test_interpolate_and_traverse_commands(run, tmp_path):
    result = run_cli("interpolate", str(run.out_dir), "--pairs", "3", "--steps", "6", "--out", str(tmp_path / "i.png"))
    assert result.returncode == 0, result.stderr
    scale = image_scale(run.model.input_shape)
    tiles(tmp_path / "i.png", 3, 6, 8 * scale)  # 3 rows of 6
    result = run_cli("traverse", str(run.out_dir), "--dims", "0,2", "--index", "5", "--out", str(tmp_path / "t.png"))
    assert result.returncode == 0, result.stderr
    tiles(tmp_path / "t.png", 2, 9, 8 * scale)  # 2 rows of 9
    result = run_cli("traverse", str(run.out_dir), "--index", "100000", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1 and "--index must be in" in result.stderr and "Traceback" not in result.stderr


def test_pictures_of_a_conditional_model(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path / "cvae"), epochs=1, latent_dim=3, arch_config={"hidden": [32]},
                         conditional=True)
    trainer, _ = train(config)
    scale = image_scale(trainer.model.input_shape)
    tiles(trainer.out_dir / "traversal.png", 3, 9, 8 * scale)
    tiles(trainer.out_dir / "interpolations.png", 8, 10, 8 * scale)
    assert torch.is_tensor(trainer.model.traverse(trainer.val_set.images[0], [0], condition=torch.eye(10)[3]))
