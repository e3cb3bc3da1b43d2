"""Pictures of what a VAE does: sample and reconstruction grids, and loss curves.

Only Pillow is required; matplotlib draws nicer curves when it is installed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import one_hot
from .metrics import METRICS_NAME

PAD_VALUE = 1.0  # white borders separate the dark backgrounds of MNIST-like images
X_COLUMNS = ("epoch", "step")


def save_image_grid(
    images: torch.Tensor,
    path,
    *,
    nrow: int | None = None,
    padding: int = 2,
    scale: int = 1,
) -> Path:
    """Write images as one 8-bit PNG grid and return its path.

    ``images`` is (N, C, H, W) or (N, H, W), values in [0, 1] (clamped), C in {1, 3}.
    ``nrow`` is the number of images per row (default ceil(sqrt(N))); ``scale``
    enlarges each pixel to scale x scale so that tiny 8x8 digits stay visible.
    The PNG is rows*(H*scale+padding)+padding high and cols*(W*scale+padding)+padding
    wide, with cols = min(nrow, N).
    """
    grid = _grid_array(_as_nchw(images), nrow, padding, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path, **kw) -> Path:
    """Write each original beside its reconstruction, pairs in reading order.

    ``reconstructions`` may be flat (N, D), as decoders often return them; it is
    reshaped to the originals' shape. ``nrow`` in ``kw`` counts pairs per row
    (default ceil(sqrt(N))); the other keywords go to :func:`save_image_grid`.
    """
    originals = _as_nchw(originals)
    if reconstructions.numel() != originals.numel():
        raise ValueError(
            f"reconstructions {tuple(reconstructions.shape)} do not match originals {tuple(originals.shape)}"
        )
    reconstructions = reconstructions.reshape(originals.shape)
    pairs_per_row = kw.pop("nrow", None) or math.ceil(math.sqrt(len(originals)))
    interleaved = torch.stack([originals.detach().cpu(), reconstructions.detach().cpu()], dim=1).flatten(0, 1)
    return save_image_grid(interleaved, path, nrow=2 * pairs_per_row, **kw)


def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of images; got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N,C,H,W) with C in (1, 3) or (N,H,W); got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no images to draw")
    return images


def _grid_array(images: torch.Tensor, nrow: int | None, padding: int, scale: int) -> np.ndarray:
    """Tile (N,C,H,W) images into a uint8 (H', W') or (H', W', 3) array."""
    if scale < 1 or padding < 0 or (nrow is not None and nrow < 1):
        raise ValueError(f"need scale >= 1, padding >= 0 and nrow >= 1; got scale={scale}, padding={padding}, nrow={nrow}")
    x = torch.nan_to_num(images.detach().cpu().float()).clamp(0.0, 1.0).numpy()
    x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = x.shape
    ncol = min(nrow or math.ceil(math.sqrt(n)), n)
    nrows = math.ceil(n / ncol)
    grid = np.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), PAD_VALUE, np.float32)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    grid = np.round(grid * 255).astype(np.uint8)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


# ---------------------------------------------------------------------------- metrics


def plot_metrics(csv_path, png_path, *, columns=None) -> Path:
    """Plot loss curves from a metrics CSV and return the PNG path.

    Every numeric column except epoch/step (or just ``columns``) is drawn against
    epoch (else step, else row number); empty cells are skipped, so rows logging
    different metrics can share one file. matplotlib is used when importable, else a
    plain Pillow drawing, so a picture is always produced.
    """
    x_name, x, series = _read_metrics(Path(csv_path), columns)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _plot_with_pillow(x_name, x, series, png_path)
    else:
        _plot_with_matplotlib(x_name, x, series, png_path)
    return png_path


def _read_metrics(csv_path: Path, columns) -> tuple[str, list[float], dict[str, list[float]]]:
    """Return the x column's name and values and each series (NaN where a cell is empty)."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"metrics CSV {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: no rows of metrics")
    header = list(rows[0])
    parsed = {name: [_to_float(row.get(name)) for row in rows] for name in header}
    x_name = next((name for name in X_COLUMNS if name in parsed), "row")
    x = parsed.get(x_name, [float(i) for i in range(len(rows))])
    if columns is None:
        columns = [n for n in header if n not in X_COLUMNS and any(not math.isnan(v) for v in parsed[n])]
    missing = [name for name in columns if name not in parsed]
    if missing:
        raise ValueError(f"{csv_path}: no column(s) {missing}; available: {header}")
    if not columns:
        raise ValueError(f"{csv_path}: no numeric columns to plot besides {list(X_COLUMNS)}; header: {header}")
    return x_name, x, {name: parsed[name] for name in columns}


def _to_float(cell: str | None) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan


def _points(x: list[float], y: list[float]) -> list[tuple[float, float]]:
    return [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]


def _plot_with_matplotlib(x_name: str, x, series: dict, png_path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for name, y in series.items():
        points = _points(x, y)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None, label=name)
    ax.set_xlabel(x_name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, format="png")


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot_with_pillow(x_name: str, x, series: dict, png_path: Path, size=(700, 450), margin=60) -> None:
    """A bare line chart: frame, axis ranges as text, one coloured line per series."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    all_points = [p for y in series.values() for p in _points(x, y)]
    if not all_points:
        all_points = [(0.0, 0.0)]
    x0, x1 = min(p[0] for p in all_points), max(p[0] for p in all_points)
    y0, y1 = min(p[1] for p in all_points), max(p[1] for p in all_points)
    left, top, right, bottom = margin, 20, size[0] - 20, size[1] - margin

    def to_pixel(point):
        px = left + (point[0] - x0) / ((x1 - x0) or 1.0) * (right - left)
        py = bottom - (point[1] - y0) / ((y1 - y0) or 1.0) * (bottom - top)
        return (px, py)

    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, bottom + 5), f"{x0:g}", fill="black")
    draw.text((right - 40, bottom + 5), f"{x1:g}", fill="black")
    draw.text(((left + right) // 2, bottom + 20), x_name, fill="black")
    draw.text((5, bottom - 10), f"{y0:.4g}", fill="black")
    draw.text((5, top), f"{y1:.4g}", fill="black")
    for i, (name, y) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pixels = [to_pixel(p) for p in _points(x, y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        elif pixels:
            px, py = pixels[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((left + 10, top + 5 + 14 * i), name, fill=colour)
    image.save(png_path, format="PNG")


def image_scale(shape) -> int:
    """Nearest-neighbour upscaling so that small images (8x8 digits) are visible in PNGs."""
    return max(1, 64 // max(shape[-1], 1))


def write_pictures(model, dataset, out_dir: Path, num_samples: int = 64, seed: int = 0) -> dict:
    """samples.png (one row per class for a conditional model), reconstructions.png, loss.png."""
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    scale = image_scale(model.input_shape)
    written = {}
    if model.condition_dim:
        per_class = 8
        samples = model.sample_per_class(per_class, generator=generator)
        written["samples"] = save_image_grid(samples, out_dir / "samples.png", nrow=per_class, scale=scale)
    else:
        samples = model.sample(num_samples, generator=generator)
        written["samples"] = save_image_grid(samples, out_dir / "samples.png", scale=scale)
    count = min(32, len(dataset))
    x = dataset.images[:count]
    condition = one_hot(dataset.labels[:count], model.condition_dim) if model.condition_dim else None
    written["reconstructions"] = save_reconstruction_grid(
        x, model.reconstruct(x, condition), out_dir / "reconstructions.png", scale=scale
    )
    metrics = out_dir / METRICS_NAME
    if metrics.exists():
        written["loss"] = plot_metrics(metrics, out_dir / "loss.png")
    return written
