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
from ..training.metrics import METRICS_NAME

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

THROUGHPUT_COLUMNS = ("seconds", "examples_per_second")  # timing, not training: never on the loss axes
SPLIT_COLOURS = {"train": (31, 119, 180), "val": (255, 127, 14)}  # one colour per split in every panel
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
PANEL_TITLES = {"elbo": "ELBO (nats per example)", "rec": "reconstruction log p(x|z)", "kl": "KL(q(z|x) || p(z))"}
# A long run's first epochs climb by 100 nats and the rest by 5 (MNIST: about -209 to -95, then to -90
# over hundreds of epochs): scaled to every point, the part a user watches is one flat line. So each panel's y range
# is that of the points after the first 5% of its x span when the early points would squeeze the rest
# into less than half of the panel's height, on runs with enough points for 5% to be whole epochs; the
# axis label says so, and the early points run off the panel.
EARLY_FRACTION = 0.05
MIN_POINTS_TO_TRIM = 20
SQUEEZE = 0.5


def plot_metrics(csv_path, png_path, *, columns=None, renderer: str | None = None) -> Path:
    """Plot loss curves from a metrics CSV and return the PNG path.

    Each term gets its own panel (axes): train_elbo and val_elbo share the "elbo" panel, *_rec the
    "rec" panel, *_kl the "kl" panel; any other column gets a panel of its own. Timing columns
    (seconds, examples_per_second) are left out unless named in ``columns``. Each panel's y range is
    its own data's; on a run of 20 points or more whose first 5% of the x span would squeeze the rest
    into less than half the height, that of the points after it (y_range; the axis says so), so the
    late curve spans the panel's height. Drawn against epoch (else step, else row number); empty
    cells are skipped. renderer: "matplotlib", "pillow", or None for matplotlib
    when importable, else Pillow, so a picture is always produced.
    """
    x_name, x, series = _read_metrics(Path(csv_path), columns)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if renderer is None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            renderer = "pillow"
        else:
            renderer = "matplotlib"
    if renderer not in ("matplotlib", "pillow"):
        raise ValueError(f"renderer must be 'matplotlib' or 'pillow', got {renderer!r}")
    draw = _plot_with_matplotlib if renderer == "matplotlib" else _plot_with_pillow
    draw(x_name, x, metric_panels(series), png_path)
    return png_path


def metric_panels(series: dict) -> list[tuple[str, dict[str, list[float]]]]:
    """Group columns into panels: [(title, {legend label: values})], ELBO first, then rec, then kl.

    A column of its own that never changes (the lr column of a constant learning rate) gets no
    panel: a flat line says nothing the run's settings do not.
    """
    panels: dict[str, dict[str, list[float]]] = {}
    for column, values in series.items():
        split, _, term = column.partition("_")
        if split in SPLIT_COLOURS and term:
            panels.setdefault(term, {})[split] = values
        elif len(set(values)) > 1:
            panels.setdefault(column, {})[column] = values
    order = [t for t in PANEL_TITLES if t in panels] + [t for t in panels if t not in PANEL_TITLES]
    return [(PANEL_TITLES.get(term, term), panels[term]) for term in order]


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
        columns = [n for n in header if n not in X_COLUMNS and n not in THROUGHPUT_COLUMNS
                   and any(not math.isnan(v) for v in parsed[n])]
    missing = [name for name in columns if name not in parsed]
    if missing:
        raise ValueError(f"{csv_path}: no column(s) {missing}; available: {header}")
    if not columns:
        raise ValueError(f"{csv_path}: no numeric columns to plot besides {list(X_COLUMNS + THROUGHPUT_COLUMNS)}; "
                         f"header: {header}")
    return x_name, x, {name: parsed[name] for name in columns}


def _to_float(cell: str | None) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan


def _points(x: list[float], y: list[float]) -> list[tuple[float, float]]:
    return [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]


def y_range(x: list[float], lines: dict) -> tuple[float, float, float | None]:
    """(low, high, start) of a panel: the range of its points from x = start on, start being where
    the first 5% of the x span ends; start is None, and the range all of the points', when the run
    is short or the later points span at least half of the whole range."""
    points = [p for y in lines.values() for p in _points(x, y)] or [(0.0, 0.0)]
    low, high = min(p[1] for p in points), max(p[1] for p in points)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    if len({p[0] for p in points}) < MIN_POINTS_TO_TRIM:
        return low, high, None
    cut = x0 + EARLY_FRACTION * (x1 - x0)
    late = [p for p in points if p[0] >= cut]
    late_low, late_high = min(p[1] for p in late), max(p[1] for p in late)
    if late_high - late_low >= SQUEEZE * (high - low):
        return low, high, None
    return late_low, late_high, min(p[0] for p in late)


def y_range_note(x_name: str, start: float | None) -> str:
    return "" if start is None else f"y scaled to {x_name} >= {start:g}"


def _colour(label: str, index: int) -> tuple[int, int, int]:
    return SPLIT_COLOURS.get(label, _COLOURS[index % len(_COLOURS)])


def _plot_with_matplotlib(x_name: str, x, panels: list, png_path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4 * len(panels), 4), dpi=100)
    for ax, (title, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for i, (label, y) in enumerate(lines.items()):
            points = _points(x, y)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None,
                    label=label, color=tuple(c / 255 for c in _colour(label, i)))
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
        ax.margins(x=0.02, y=0.05)
        low, high, start = y_range(x, lines)
        if start is not None:
            pad = 0.05 * (high - low) or 1.0
            ax.set_ylim(low - pad, high + pad)
            ax.set_ylabel(y_range_note(x_name, start))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, format="png")


def _plot_with_pillow(x_name: str, x, panels: list, png_path: Path, panel_size=(360, 360)) -> None:
    """Panels side by side, each a bare line chart: frame, title and legend above it, ranges as text."""
    width, height = panel_size
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, lines) in enumerate(panels):
        _draw_panel(draw, (index * width, 0, (index + 1) * width, height), x_name, x, title, lines)
    image.save(png_path, format="PNG")


def _draw_panel(draw, box, x_name: str, x, title: str, lines: dict) -> None:
    left, top, right, bottom = box[0] + 60, box[1] + 40, box[2] - 15, box[3] - 40
    all_points = [p for y in lines.values() for p in _points(x, y)] or [(0.0, 0.0)]
    x0, x1 = min(p[0] for p in all_points), max(p[0] for p in all_points)
    y0, y1, start = y_range(x, lines)
    pad = 0.04 * (y1 - y0)  # the data in range fill 92% of the frame's height

    def to_pixel(point):
        px = left + (point[0] - x0) / ((x1 - x0) or 1.0) * (right - left)
        py = bottom - (point[1] - y0 + pad) / ((y1 - y0 + 2 * pad) or 1.0) * (bottom - top)
        return (px, py)

    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, box[1] + 6), title, fill="black")
    legend_x = left
    for i, label in enumerate(lines):
        draw.line([(legend_x, box[1] + 27), (legend_x + 16, box[1] + 27)], fill=_colour(label, i), width=2)
        draw.text((legend_x + 20, box[1] + 21), label, fill="black")
        legend_x += 30 + 7 * len(label)
    draw.text((left, bottom + 5), f"{x0:g}", fill="black")
    draw.text((right - 30, bottom + 5), f"{x1:g}", fill="black")
    axis_label = x_name if start is None else f"{x_name}   ({y_range_note(x_name, start)})"
    draw.text(((left + right) // 2 - 3 * len(axis_label), bottom + 20), axis_label, fill="black")
    draw.text((box[0] + 4, to_pixel((x0, y0))[1] - 5), f"{y0:.4g}", fill="black")
    draw.text((box[0] + 4, to_pixel((x0, y1))[1] - 5), f"{y1:.4g}", fill="black")
    for i, (label, y) in enumerate(lines.items()):
        pixels = [to_pixel(p) for p in _points(x, y)]
        for a, b in zip(pixels, pixels[1:]):
            segment = _clip_to_rows(a, b, top, bottom)
            if segment:
                draw.line(segment, fill=_colour(label, i), width=2)
        if len(pixels) == 1 and top <= pixels[0][1] <= bottom:
            px, py = pixels[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_colour(label, i))


def _clip_to_rows(a, b, top, bottom):
    """The part of segment a-b between the rows top and bottom (the frame), or None: the early
    points outside the panel's y range run off it instead of over the labels."""
    (ax, ay), (bx, by) = a, b
    if ay == by:
        return [a, b] if top <= ay <= bottom else None
    t0, t1 = sorted(((top - ay) / (by - ay), (bottom - ay) / (by - ay)))
    t0, t1 = max(t0, 0.0), min(t1, 1.0)
    if t0 > t1:
        return None
    return [(ax + t0 * (bx - ax), ay + t0 * (by - ay)), (ax + t1 * (bx - ax), ay + t1 * (by - ay))]


# ---------------------------------------------------------------------------- a model's pictures


def image_scale(shape) -> int:
    """Nearest-neighbour upscaling so that small images (8x8 digits) are visible in PNGs."""
    return max(1, 64 // max(shape[-1], 1))


def save_interpolation_grid(model, images: torch.Tensor, path, *, steps: int = 10, labels=None) -> Path:
    """One row per pair (images[0], images[1]), (images[2], images[3]), ...: the decoded straight
    line between their posterior means, from the first image's reconstruction to the second's.
    labels (conditional models): each row is decoded with its first image's class."""
    if len(images) < 2:
        raise ValueError(f"interpolation needs at least 2 images, got {len(images)}")
    rows = []
    for i in range(0, len(images) - 1, 2):
        condition = one_hot(labels[i], model.condition_dim) if model.condition_dim else None
        rows.append(model.interpolate(images[i], images[i + 1], steps, condition))
    return save_image_grid(torch.cat(rows), path, nrow=steps, scale=image_scale(model.input_shape))


def save_traversal_grid(model, image: torch.Tensor, path, *, steps: int = 9, span: float = 3.0,
                        dims=None, label=None) -> Path:
    """One row per latent dimension: that dimension swept over mu +- span (prior standard deviations)
    with the others held at the image's posterior mean. dims: which dimensions (default all, up to 16)."""
    dims = list(range(min(model.latent_dim, 16))) if dims is None else list(dims)
    condition = one_hot(torch.as_tensor(label), model.condition_dim) if model.condition_dim else None
    grid = model.traverse(image, dims, steps=steps, span=span, condition=condition)
    return save_image_grid(grid.flatten(0, 1), path, nrow=steps, scale=image_scale(model.input_shape))


def write_pictures(model, dataset, out_dir: Path, num_samples: int = 64, seed: int = 0) -> dict:
    """samples.png (one row per class for a conditional model), reconstructions.png, interpolations.png,
    traversal.png and loss.png; returns {name: path}."""
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
    labels = dataset.labels[:16] if dataset.labels is not None else None
    if len(dataset) >= 2:
        written["interpolations"] = save_interpolation_grid(model, dataset.images[:16], out_dir / "interpolations.png",
                                                            labels=labels)
    written["traversal"] = save_traversal_grid(model, dataset.images[0], out_dir / "traversal.png",
                                               label=None if labels is None else labels[0])
    metrics = out_dir / METRICS_NAME
    if metrics.exists():
        written["loss"] = plot_metrics(metrics, out_dir / "loss.png")
    return written
