"""Tests for fastvae.io.data: every source, every documented error, binarize and batches."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.io.data import ImageDataset, batches, binarize, load_dataset, one_hot, parse_idx

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, *, gz: bool, n_train=12, n_test=5, size=(6, 7)) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


# ---------------------------------------------------------------------------- digits


def test_digits_splits():
    train, test, everything = (load_dataset("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (1497, 300, 1797)
    assert train.shape == (1, 8, 8) and train.num_classes == 10 and train.name == "digits"
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() == 0 and train.images.max() == 1
    assert torch.equal(everything.images[1497:], test.images)
    assert set(train.labels.tolist()) == set(range(10))


def test_dataset_shape_and_len():
    ds = ImageDataset(torch.zeros(4, 3, 5, 6), None, 0, "x")
    assert ds.shape == (3, 5, 6) and len(ds) == 4


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path, gz):
    arrays = write_idx_folder(tmp_path / "m", gz=gz)
    train = load_dataset(str(tmp_path / "m"))
    test = load_dataset(f"mnist:{tmp_path / 'm'}", "test")
    both = load_dataset(f"fashion-mnist:{tmp_path / 'm'}", "all")
    assert train.images.shape == (12, 1, 6, 7) and len(test) == 5 and len(both) == 17
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    assert torch.equal(train.images, expected)
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert train.num_classes == 10 and test.name == "mnist" and both.name == "fashion-mnist"


def test_parse_idx_other_dtype(tmp_path):
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes())
    assert parse_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_real_mnist():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not at {MNIST_DIR}")
    ds = load_dataset(f"mnist:{MNIST_DIR}")
    assert ds.images.shape == (60000, 1, 28, 28) and ds.labels.shape == (60000,)
    assert abs(ds.images.mean().item() - 0.1307) < 1e-3
    assert len(load_dataset(str(MNIST_DIR), "test")) == 10000


def test_truncated_idx(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset(str(tmp_path))


def test_truncated_gzip(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        load_dataset(str(tmp_path))


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="bad.*magic"):
        parse_idx(path)


def test_unknown_idx_type_code(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="type code"):
        parse_idx(path)


def test_idx_count_mismatch(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(ValueError, match="12 images.*11 labels"):
        load_dataset(str(tmp_path))


def test_idx_folder_missing_files(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_dataset(str(tmp_path), "train")) == 12
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\[\.gz\], t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset(str(tmp_path), "test")


def test_mnist_prefix_on_folder_without_idx(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"))


def test_default_fashion_mnist():
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        assert load_dataset("fashion-mnist", "test").shape == (1, 28, 28)
    else:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_dataset("fashion-mnist")


def test_unknown_source_and_split():
    with pytest.raises(ValueError, match="unknown data source 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_dataset("digits", "valid")


# ---------------------------------------------------------------------------- numpy files


@pytest.mark.parametrize(
    "shape, expected",
    [((20, 5, 4), (1, 5, 4)), ((20, 3, 5, 4), (3, 5, 4)), ((20, 5, 4, 3), (3, 5, 4)), ((20, 5, 4, 1), (1, 5, 4))],
)
def test_npy_layouts(tmp_path, shape, expected):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    train, test = load_dataset(str(tmp_path / "a.npy")), load_dataset(str(tmp_path / "a.npy"), "test")
    assert train.shape == expected and (len(train), len(test)) == (18, 2)
    assert train.labels is None and train.num_classes == 0 and train.name == "a"


def test_npy_float_kept(tmp_path):
    array = np.random.default_rng(0).random((10, 4, 4))
    np.save(tmp_path / "f.npy", array)
    ds = load_dataset(str(tmp_path / "f.npy"), "all")
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(array).float())


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4), np.uint8), "shape"),
        (np.zeros((2, 5, 4, 4), np.uint8), "shape"),
        (np.zeros((3, 4, 4), np.int32), "dtype int32"),
        (np.full((3, 4, 4), 2.0), r"\[0, 1\]"),
        (np.full((3, 4, 4), np.nan), r"\[0, 1\]"),
    ],
)
def test_bad_npy(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=message):
        load_dataset(str(tmp_path / "bad.npy"))


def test_npz_with_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (30, 6, 6), dtype=np.uint8)
    y = np.arange(30) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    test = load_dataset(str(tmp_path / "d.npz"), "test")
    assert len(test) == 3 and test.labels.tolist() == [1, 3, 1] and test.num_classes == 4


def test_npz_with_split_keys(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "k.npz",
        x_train=rng.integers(0, 256, (8, 5, 5), dtype=np.uint8), y_train=np.arange(8) % 3,
        x_test=rng.integers(0, 256, (3, 5, 5), dtype=np.uint8), y_test=np.array([0, 1, 5]),
    )
    train, test = load_dataset(str(tmp_path / "k.npz")), load_dataset(str(tmp_path / "k.npz"), "test")
    assert (len(train), len(test), len(load_dataset(str(tmp_path / "k.npz"), "all"))) == (8, 3, 11)
    assert train.num_classes == test.num_classes == 6
    assert test.labels.tolist() == [0, 1, 5]


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nokey.npz", pictures=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="'images' or 'x'"):
        load_dataset(str(tmp_path / "nokey.npz"))
    np.savez(tmp_path / "count.npz", images=np.zeros((4, 3, 3), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="expected 4 labels"):
        load_dataset(str(tmp_path / "count.npz"))


def test_unsupported_file(tmp_path):
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_dataset(str(tmp_path / "data.csv"))


# ---------------------------------------------------------------------------- image folders


def save_png(path: Path, value: int, size=(5, 4), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, colour).save(path)


def test_image_folder_with_classes(tmp_path):
    for name, value in (("cat", 10), ("dog", 200)):
        for i in range(10):
            save_png(tmp_path / name / f"{i}.png", value)
    train, test = load_dataset(str(tmp_path)), load_dataset(str(tmp_path), "test")
    assert train.shape == (1, 4, 5) and (len(train), len(test)) == (18, 2)
    assert train.num_classes == 2 and test.labels.tolist() == [0, 1]
    assert abs(test.images[1].max().item() - 200 / 255) < 1e-6


def test_image_folder_unlabeled_colour(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", 50 * i, mode="RGB")
    ds = load_dataset(str(tmp_path), "all")
    assert ds.shape == (3, 4, 5) and ds.labels is None and ds.num_classes == 0


def test_image_folder_mixed_sizes(tmp_path):
    save_png(tmp_path / "a.png", 0, size=(5, 4))
    save_png(tmp_path / "b.png", 0, size=(8, 8))
    with pytest.raises(ValueError, match=r"a.png is 5x4 but .*b.png is 8x8"):
        load_dataset(str(tmp_path))


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="empty data folder.*train-images-idx3-ubyte"):
        load_dataset(str(tmp_path))


def test_folder_with_files_and_class_folders(tmp_path):
    save_png(tmp_path / "a.png", 0)
    save_png(tmp_path / "c" / "b.png", 0)
    with pytest.raises(ValueError, match="both image files and class subfolders"):
        load_dataset(str(tmp_path))


# ---------------------------------------------------------------------------- binarize, batches


def test_binarize_modes():
    x = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert binarize(x, "none") is x
    fixed = binarize(x, "threshold", threshold=0.3)
    assert torch.equal(fixed, (x > 0.3).float()) and torch.equal(fixed, binarize(x, "threshold", threshold=0.3))
    gen = torch.Generator().manual_seed(1)
    first, second = binarize(x, "dynamic", generator=gen), binarize(x, "dynamic", generator=gen)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    assert abs(first.mean().item() - x.mean().item()) < 0.02
    with pytest.raises(ValueError, match="unknown binarize mode 'stochastic'"):
        binarize(x, "stochastic")


def test_batches_cover_epoch_once():
    x, y = torch.arange(23).float().view(23, 1, 1, 1), torch.arange(23)
    seen = []
    for xb, yb in batches(x, y, 5, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(xb.view(-1).long(), yb) and len(yb) <= 5
        seen += yb.tolist()
    assert sorted(seen) == list(range(23)) and seen != list(range(23))


def test_batches_options():
    x = torch.arange(10).float().view(10, 1, 1, 1)
    unshuffled = [xb.view(-1).tolist() for xb, _ in batches(x, None, 4, shuffle=False)]
    assert unshuffled == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(xb) for xb, _ in batches(x, None, 4, drop_last=True)] == [4, 4]
    shard = [int(v) for xb, yb in batches(x, None, 2, indices=[1, 3, 5, 7]) for v in xb.view(-1)]
    assert sorted(shard) == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(x, None, 0))


def test_one_hot():
    out = one_hot(torch.tensor([2, 0]), 3)
    assert out.dtype == torch.float32 and out.tolist() == [[0, 0, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="labels must lie in"):
        one_hot(torch.tensor([3]), 3)
