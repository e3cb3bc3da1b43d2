"""Data sources for training VAEs: embedded digits, IDX (MNIST-style) folders, numpy
files and folders of image files, all loaded fully into memory as float tensors.

Every source ends up as an :class:`ImageDataset` holding float32 images in [0, 1] of
shape (N, C, H, W). The data sets these models are trained on are small enough to keep
in memory, so batching is a plain index iterator rather than a DataLoader.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

SPLITS = ("train", "test", "all")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
BINARIZE_MODES = ("none", "threshold", "dynamic")

_DIGITS_PATH = Path(__file__).parent / "_data" / "digits.npz"
_DIGITS_TRAIN = 1497  # the last 300 of the 1797 digits are the test split

# IDX file stems per split; each may be stored raw or with a ".gz" suffix.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass
class ImageDataset:
    """Images in memory, ready for a model: float32 in [0, 1], shape (N, C, H, W)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str
    # MNIST-style digits (IDX sets, the embedded digits): the VAE papers model them as binary
    # (dynamically binarized) whatever their grey levels, so likelihood "auto" picks a Bernoulli.
    binary_benchmark: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: what a model's input layer has to match."""
        _, c, h, w = self.images.shape
        return (c, h, w)

    def __len__(self) -> int:
        return self.images.shape[0]


# ---------------------------------------------------------------------------- sources


def load_dataset(source: str, split: str = "train") -> ImageDataset:
    """Load a whole data set split into memory.

    ``source`` is one of:

    - ``"digits"``: the embedded UCI 8x8 digits (1797 images, 10 classes);
      train = first 1497, test = last 300.
    - ``"fashion-mnist"``: the Debian ``dataset-fashion-mnist`` package folder.
    - ``"mnist:<folder>"`` / ``"fashion-mnist:<folder>"`` or a plain folder holding the
      standard IDX files (``train-images-idx3-ubyte[.gz]`` etc.); train and test are
      the files' own splits.
    - a ``.npy`` file: an array (N,H,W), (N,C,H,W) or (N,H,W,C), uint8 0..255 or
      float in [0, 1]; unlabeled.
    - a ``.npz`` file with ``images``/``x`` and optional ``labels``/``y``, or with
      ``x_train``/``x_test`` (and ``y_train``/``y_test``) for its own split.
    - a folder of image files (png, jpg, bmp, ...), optionally one subfolder per class
      (labels are the indices of the sorted subfolder names).

    ``split`` is ``"train"``, ``"test"`` or ``"all"``. Sources without a split of their
    own (npy, npz without split keys, image folders) put every 10th example
    (indices 9, 19, 29, ...) in test and the rest in train: deterministic, and because
    it takes from everywhere, a folder sorted by class still gets every class in both.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if source == "digits":
        return _load_digits(split)
    if source == "fashion-mnist":
        return _load_default_fashion_mnist(split)
    for prefix in ("mnist:", "fashion-mnist:"):
        if source.startswith(prefix):
            return _load_idx_folder(Path(source[len(prefix):]), split, prefix[:-1])
    return _load_path(source, split)


def _load_path(source: str, split: str) -> ImageDataset:
    """Dispatch a file or folder path on what it is."""
    path = Path(source)
    if not path.exists():
        if os.sep in source or path.suffix:
            raise FileNotFoundError(f"data source {source!r} does not exist")
        raise ValueError(
            f"unknown data source {source!r}; expected 'digits', 'fashion-mnist', "
            "'mnist:<folder>', 'fashion-mnist:<folder>', a folder of IDX files, "
            "a .npy or .npz file, or a folder of images"
        )
    if path.is_dir():
        if _has_any_idx_file(path):
            return _load_idx_folder(path, split, path.name)
        return _load_image_folder(path, split)
    if path.suffix == ".npy":
        return _load_npy(path, split)
    if path.suffix == ".npz":
        return _load_npz(path, split)
    raise ValueError(f"{path}: unsupported file type; expected a .npy or .npz file or a folder")


def _load_digits(split: str) -> ImageDataset:
    with np.load(_DIGITS_PATH) as archive:
        images, labels = archive["images"], archive["labels"]
    part = {"train": slice(0, _DIGITS_TRAIN), "test": slice(_DIGITS_TRAIN, None), "all": slice(None)}[split]
    x = torch.from_numpy(images[part].astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(labels[part].astype(np.int64))
    return ImageDataset(x, y, 10, "digits", binary_benchmark=True)


def _load_default_fashion_mnist(split: str) -> ImageDataset:
    if not FASHION_MNIST_DIR.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}; install it with "
            "`apt-get install dataset-fashion-mnist` or pass 'fashion-mnist:<folder>'"
        )
    return _load_idx_folder(FASHION_MNIST_DIR, split, "fashion-mnist")


# ---------------------------------------------------------------------------- IDX


def parse_idx(path) -> np.ndarray:
    """Read one IDX file (raw or gzip), checking its header against its length.

    Truncated downloads are common, so the magic number, type code, dimensions and the
    exact byte count are all validated; anything off raises ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX type code 0x{raw[2]:02X}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated or without dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX file has {len(raw)} bytes but its header {dims} needs {expected} "
            "(truncated or corrupt file?)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: damaged or truncated gzip file ({err})") from err


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_any_idx_file(folder: Path) -> bool:
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    return any(_find_idx(folder, stem) is not None for stem in stems)


def _load_idx_folder(folder: Path, split: str, name: str) -> ImageDataset:
    if not folder.is_dir():
        raise FileNotFoundError(f"IDX folder {folder} does not exist")
    parts = ("train", "test") if split == "all" else (split,)
    pairs = [_load_idx_pair(folder, part) for part in parts]
    images = np.concatenate([p[0] for p in pairs])
    labels = np.concatenate([p[1] for p in pairs])
    x = _require_images(_to_float_images(images, folder), f"{folder} (split {split!r})")
    y = torch.from_numpy(labels.astype(np.int64))
    # MNIST-style sets have 10 classes; a small split may not show all of them.
    return ImageDataset(x, y, max(10, int(labels.max(initial=0)) + 1), name, binary_benchmark=True)


def _load_idx_pair(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    stems = _IDX_FILES[part]
    paths = [_find_idx(folder, stem) for stem in stems]
    if None in paths:
        expected = ", ".join(f"{stem}[.gz]" for stem in stems)
        raise FileNotFoundError(f"{folder}: missing IDX files for split {part!r}; expected {expected}")
    images, labels = parse_idx(paths[0]), parse_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{folder}: expected images (N,H,W) and labels (N,), got {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images in {paths[0].name} but {len(labels)} labels in {paths[1].name}")
    return images, labels


# ---------------------------------------------------------------------------- numpy


# The first bytes of each kind of file a .npy or .npz name may hold.
_NPY_MAGIC, _ZIP_MAGICS, _PICKLE_MAGIC = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06"), b"\x80"
_SAVE_HINT = "save the images with numpy.save (.npy) or numpy.savez (.npz) as a uint8 (0..255) or float (0..1) array"
_NEVER_UNPICKLED = "fastvae never unpickles data files, since unpickling can run any code"


def _check_numpy_file(path: Path) -> None:
    """Refuse, naming the file and what was expected, a .npy/.npz that cannot be read, holds something
    else than its name says (a CSV, a pickle, the other format), or holds Python objects, which only
    unpickling could load: all before numpy reads it, and never suggesting unsafe loading."""
    expected = "npz" if path.suffix == ".npz" else "npy"
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read this file ({exc.strerror or exc})") from None
    if head.startswith(_NPY_MAGIC):
        kind = "npy"
    elif head.startswith(_ZIP_MAGICS):
        kind = "npz"
    elif not head:
        raise ValueError(f"{path}: empty file; {_SAVE_HINT}")
    elif head.startswith(_PICKLE_MAGIC):
        raise ValueError(f"{path}: holds pickled Python objects, not a NumPy array; {_NEVER_UNPICKLED}: {_SAVE_HINT}")
    else:
        raise ValueError(f"{path}: not a NumPy .{expected} file (it starts with {head!r}: a text or CSV file "
                         f"under a .{expected} name?); {_SAVE_HINT}")
    if kind != expected:
        raise ValueError(f"{path}: a NumPy .{kind} file under a .{expected} name; rename it to {path.stem}.{kind}")
    for name, dtype in _array_dtypes(path, kind):
        if dtype is not None and dtype.hasobject:
            where = path if kind == "npy" else f"{path} ({name})"
            raise ValueError(f"{where}: holds an array of Python objects (dtype {dtype}), stored pickled; "
                             f"{_NEVER_UNPICKLED}: {_SAVE_HINT}")


def _array_dtypes(path: Path, kind: str) -> list[tuple[str, np.dtype | None]]:
    """(name, dtype) of the array in a .npy file or of each array in an .npz archive, from their headers."""
    if kind == "npy":
        with path.open("rb") as f:
            return [(path.name, _npy_dtype(f))]
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".npy")]
            dtypes = []
            for name in names:
                with archive.open(name) as f:
                    dtypes.append((name, _npy_dtype(f)))
            return dtypes
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: damaged or truncated .npz archive ({exc})") from None


# numpy's public header reader for each .npy format version. Format 3.0 is 2.0 with the header
# text in UTF-8 instead of latin-1: the 2.0 reader parses it (non-ASCII field names come out
# garbled, which does not change whether the dtype holds Python objects).
_NPY_HEADER_READERS = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0,
                       3: np.lib.format.read_array_header_2_0}


def _npy_dtype(f) -> np.dtype | None:
    """The dtype in a .npy header (None where the header is not one numpy's public readers know)."""
    try:
        major, _ = np.lib.format.read_magic(f)
        read_header = _NPY_HEADER_READERS.get(major)
        return None if read_header is None else read_header(f)[2]
    except (ValueError, EOFError, OSError):
        return None  # np.load then names what is damaged


def _read_numpy(path: Path, read):
    """read() of a checked .npy/.npz (see _check_numpy_file), a damaged file named with numpy's reason."""
    _check_numpy_file(path)
    try:
        return read()
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        reason = "" if "pickle" in str(exc) else f" ({str(exc).splitlines()[0]})"
        raise ValueError(f"{path}: damaged or truncated NumPy file{reason}") from None


def _require_images(x: torch.Tensor, where) -> torch.Tensor:
    if len(x) == 0:
        raise ValueError(f"{where}: holds no images (shape {tuple(x.shape)}); expected at least one")
    return x


def _load_npy(path: Path, split: str) -> ImageDataset:
    array = _read_numpy(path, lambda: np.load(path, allow_pickle=False))
    x = _require_images(_to_float_images(array, path), path)
    return _split_dataset(x, None, split, path.stem)


def _load_npz(path: Path, split: str) -> ImageDataset:
    def read():
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    arrays = _read_numpy(path, read)
    if "x_train" in arrays or "x_test" in arrays:
        return _load_npz_splits(arrays, path, split)
    image_key = next((k for k in ("images", "x") if k in arrays), None)
    if image_key is None:
        raise ValueError(f"{path}: expected an array named 'images' or 'x' (or 'x_train'/'x_test'); found {sorted(arrays)}")
    label_key = next((k for k in ("labels", "y") if k in arrays), None)
    x = _require_images(_to_float_images(arrays[image_key], path), f"{path} ({image_key})")
    y = _to_labels(arrays[label_key], len(x), path) if label_key else None
    return _split_dataset(x, y, split, path.stem)


def _load_npz_splits(arrays: dict, path: Path, split: str) -> ImageDataset:
    """An npz that carries its own train/test split (as keras.datasets saves them)."""
    parts = ("train", "test") if split == "all" else (split,)
    missing = [f"x_{p}" for p in parts if f"x_{p}" not in arrays]
    if missing:
        raise ValueError(f"{path}: split {split!r} needs {', '.join(missing)}; found {sorted(arrays)}")
    x = torch.cat([_to_float_images(arrays[f"x_{p}"], path) for p in parts])
    _require_images(x, f"{path} ({' and '.join(f'x_{p}' for p in parts)})")
    has_labels = all(f"y_{p}" in arrays for p in ("train", "test") if f"x_{p}" in arrays)
    if not has_labels:
        return ImageDataset(x, None, 0, path.stem)
    y = _to_labels(np.concatenate([arrays[f"y_{p}"] for p in parts]), len(x), path)
    all_labels = [arrays[k] for k in ("y_train", "y_test") if k in arrays]
    num_classes = int(max(a.max(initial=0) for a in all_labels)) + 1
    return ImageDataset(x, y, num_classes, path.stem)


def _to_float_images(array: np.ndarray, path: Path) -> torch.Tensor:
    """Bring an image array of any accepted layout and dtype to float (N,C,H,W) in [0,1]."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(
            f"{path}: expected images of shape (N,H,W), (N,C,H,W) or (N,H,W,C) with C in (1, 3); got {array.shape}"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: expected uint8 (0..255) or float (0..1) images; got dtype {array.dtype}")
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(
            f"{path}: float images must lie in [0, 1]; got range [{array.min()}, {array.max()}]"
        )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _to_labels(array: np.ndarray, count: int, path: Path) -> torch.Tensor:
    if array.shape != (count,):
        raise ValueError(f"{path}: expected {count} labels of shape ({count},); got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        raise ValueError(f"{path}: labels must be non-negative integers; got dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def _split_dataset(x: torch.Tensor, y: torch.Tensor | None, split: str, name: str) -> ImageDataset:
    """Every 10th example to test, the rest to train (see load_dataset)."""
    num_classes = int(y.max()) + 1 if y is not None and len(y) else 0
    if split != "all":
        is_test = torch.arange(len(x)) % 10 == 9
        keep = is_test if split == "test" else ~is_test
        x = x[keep]
        y = y[keep] if y is not None else None
    return ImageDataset(x, y, num_classes, name)


# ---------------------------------------------------------------------------- image folders


def _load_image_folder(folder: Path, split: str) -> ImageDataset:
    files, labels, class_names = _list_image_files(folder)
    images = _read_images(files)
    x = _to_float_images(images, folder)
    y = torch.tensor(labels, dtype=torch.int64) if class_names else None
    return _split_dataset(x, y, split, folder.name)


def _list_image_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files in a folder, or in its per-class subfolders with their class index."""
    def images_in(directory: Path) -> list[Path]:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    top = images_in(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and images_in(p))
    if top and classes:
        raise ValueError(
            f"{folder}: has both image files and class subfolders {classes}; use one layout"
        )
    if top:
        return top, [], []
    if not classes:
        expected = ", ".join(f"{stem}[.gz]" for pair in _IDX_FILES.values() for stem in pair)
        raise ValueError(
            f"{folder}: empty data folder; expected the IDX files ({expected}) or image files "
            f"({', '.join(IMAGE_SUFFIXES)}), optionally in one subfolder per class"
        )
    files, labels = [], []
    for index, name in enumerate(classes):
        class_files = images_in(folder / name)
        files += class_files
        labels += [index] * len(class_files)
    return files, labels, classes


def _read_images(files: list[Path]) -> np.ndarray:
    """Decode image files to uint8 (N,H,W) grey or (N,H,W,3) colour; all must be one size."""
    from PIL import Image

    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: not a readable image ({type(exc).__name__}); "
                             "replace or remove this file from the image folder") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"images of mixed sizes: {files[0]} is {_size(arrays[0])} but {path} is {_size(arrays[-1])}; "
                "resize them to one size first"
            )
    rgb = np.stack(arrays)
    is_grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0] if is_grey else rgb


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


# ---------------------------------------------------------------------------- batching


def binarize(
    images: torch.Tensor,
    mode: str,
    *,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Make images binary for a Bernoulli likelihood.

    ``"dynamic"`` draws fresh Bernoulli samples with the pixel intensities as
    probabilities on every call (as in Burda et al., IWAE), which regularises far
    better than a fixed ``"threshold"``; ``"none"`` returns the images unchanged.
    A Bernoulli(p) draw is taken as u < p with u uniform on [0, 1): the law of
    torch.bernoulli, at about a third of its CPU cost (torch.bernoulli with a tensor
    of probabilities draws element by element through a scalar distribution).
    """
    if mode == "none":
        return images
    if mode == "threshold":
        return (images > threshold).to(images.dtype)
    if mode == "dynamic":
        uniforms = torch.rand(images.shape, generator=generator, dtype=images.dtype, device=images.device)
        return torch.lt(uniforms, images).to(images.dtype)
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {', '.join(BINARIZE_MODES)}")


def batches(
    dataset_images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (x, y or None) minibatches covering the examples once (one epoch).

    ``indices`` restricts the epoch to a subset, e.g. a distributed worker's shard;
    shuffling permutes within it, reproducibly when a ``generator`` is given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if labels is not None and len(labels) != len(dataset_images):
        raise ValueError(f"{len(dataset_images)} images but {len(labels)} labels")
    order = torch.arange(len(dataset_images)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        chosen = order[start:start + batch_size]
        yield dataset_images[chosen], (labels[chosen] if labels is not None else None)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows, the form a conditional VAE concatenates to its inputs."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]")
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
