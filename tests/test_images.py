"""Tests for fastvae.io.images: grids and metric plots."""

import sys

import pytest
import torch
from PIL import Image

from fastvae.io.images import plot_metrics, save_image_grid, save_reconstruction_grid


@pytest.mark.parametrize(
    "n, nrow, padding, scale, expected_wh",
    [
        (16, None, 2, 1, (4 * 10 + 2, 4 * 10 + 2)),  # 8x8 images, 4x4 grid
        (10, 4, 1, 4, (4 * 33 + 1, 3 * 33 + 1)),  # 3 rows, scaled to 32x32
        (3, 5, 0, 2, (3 * 16, 16)),  # fewer images than nrow: only as wide as needed
    ],
)
def test_grid_size(tmp_path, n, nrow, padding, scale, expected_wh):
    path = save_image_grid(torch.rand(n, 1, 8, 8), tmp_path / "sub" / "g.png", nrow=nrow, padding=padding, scale=scale)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "L"
        assert image.size == expected_wh


def test_grid_content_and_clamping(tmp_path):
    images = torch.tensor([[[-1.0, 0.5], [2.0, 1.0]]])  # (N, H, W)
    path = save_image_grid(images, tmp_path / "g.png", padding=1, scale=2)
    with Image.open(path) as image:
        pixels = image.load()
        assert image.size == (6, 6)
        assert (pixels[0, 0], pixels[1, 1], pixels[3, 1], pixels[1, 3], pixels[4, 4]) == (255, 0, 128, 255, 255)


def test_colour_grid(tmp_path):
    path = save_image_grid(torch.rand(4, 3, 5, 6), tmp_path / "c.png", padding=0)
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (12, 10)


@pytest.mark.parametrize("shape", [(8, 8), (2, 2, 8, 8), (2, 1, 1, 8, 8), (0, 1, 8, 8)])
def test_grid_bad_shapes(tmp_path, shape):
    with pytest.raises(ValueError):
        save_image_grid(torch.rand(shape), tmp_path / "bad.png")


def test_grid_bad_options(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(torch.rand(2, 1, 8, 8), tmp_path / "bad.png", scale=0)


def test_reconstruction_grid(tmp_path):
    originals = torch.zeros(6, 1, 8, 8)
    reconstructions = torch.ones(6, 64)  # flat decoder output
    path = save_reconstruction_grid(originals, reconstructions, tmp_path / "r.png", nrow=3, padding=0)
    with Image.open(path) as image:
        assert image.size == (6 * 8, 2 * 8)
        pixels = image.load()
        assert [pixels[8 * i, 0] for i in range(6)] == [0, 255] * 3  # original, reconstruction, ...
    with pytest.raises(ValueError, match="do not match"):
        save_reconstruction_grid(originals, torch.ones(5, 64), tmp_path / "bad.png")


def write_metrics(path):
    rows = ["epoch,step,train_elbo,val_elbo,lr"]
    rows += [f"{e},{100 * e},{-200 + 10 * e},{-210 + 9 * e if e % 2 else ''},0.001" for e in range(1, 8)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_plot_metrics_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_metrics(write_metrics(tmp_path / "m.csv"), tmp_path / "plots" / "m.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_plot_metrics_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = plot_metrics(write_metrics(tmp_path / "m.csv"), tmp_path / "m.png", columns=["train_elbo", "val_elbo"])
    with Image.open(path) as image:
        assert image.size == (360, 360)  # one panel: train and validation ELBO share it
        assert len(image.getcolors(maxcolors=10000)) > 3  # lines were drawn


def test_plot_metrics_errors(tmp_path):
    csv_path = write_metrics(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="no column"):
        plot_metrics(csv_path, tmp_path / "x.png", columns=["kl"])
    (tmp_path / "only_epoch.csv").write_text("epoch\n1\n2\n")
    with pytest.raises(ValueError, match="no numeric columns"):
        plot_metrics(tmp_path / "only_epoch.csv", tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_metrics(tmp_path / "missing.csv", tmp_path / "x.png")
