"""A data file that cannot be used is refused before any training, in one line naming the file and what
was expected; nothing is ever unpickled, and no message suggests unsafe loading."""

import os
import pickle
import pathlib

import numpy as np
import pytest

from fastvae.io import data as data_lib
from fastvae.training.config import TrainConfig
from fastvae.training.trainer import Trainer

from cli_helpers import error_line, run_in_process


def images(count=5):
    return np.zeros((count, 8, 8), np.uint8)


def object_npy(path):
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def object_npy_format_3(path):  # a header version numpy has no public reader of its own for
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}, None], dtype=object), version=(3, 0), allow_pickle=True)


def object_npz(path):
    np.savez(path, x=np.array([None] * 3, dtype=object))


def pickled(path):
    path.write_bytes(pickle.dumps(images()))


def csv(path):
    path.write_text("0,1,2\n3,4,5\n")


def npz_under_npy_name(path):
    with open(path, "wb") as f:
        np.savez(f, x=images())


def npy_under_npz_name(path):
    with open(path, "wb") as f:
        np.save(f, images())


def truncated(path):
    np.save(path, images(50))
    path.write_bytes(path.read_bytes()[:300])


def broken_zip(path):
    path.write_bytes(b"PK\x03\x04 not really an archive")


CASES = [
    ("objects.npy", object_npy, ["array of Python objects", "never unpickles"]),
    ("objects-v3.npy", object_npy_format_3, ["objects-v3.npy: holds an array of Python objects", "never unpickles"]),
    ("objects.npz", object_npz, ["objects.npz (x.npy)", "array of Python objects", "never unpickles"]),
    ("pickle.npy", pickled, ["pickled Python objects, not a NumPy array", "never unpickles"]),
    ("table.npy", csv, ["not a NumPy .npy file", "CSV"]),
    ("archive.npy", npz_under_npy_name, ["a NumPy .npz file under a .npy name", "rename it to archive.npz"]),
    ("array.npz", npy_under_npz_name, ["a NumPy .npy file under a .npz name", "rename it to array.npy"]),
    ("empty.npy", lambda p: p.write_bytes(b""), ["empty file"]),
    ("cut.npy", truncated, ["damaged or truncated NumPy file"]),
    ("cut.npz", broken_zip, ["damaged or truncated .npz archive"]),
    ("none.npy", lambda p: np.save(p, images(0)), ["holds no images", "expected at least one"]),
    ("none.npz", lambda p: np.savez(p, images=images(0)), ["none.npz (images): holds no images"]),
    ("split.npz", lambda p: np.savez(p, x_train=images(0), x_test=images(3)), ["(x_train): holds no images"]),
    ("flat.npy", lambda p: np.save(p, np.zeros(5, np.uint8)), ["expected images of shape (N,H,W)", "got (5,)"]),
    ("five.npy", lambda p: np.save(p, np.zeros((2, 1, 1, 8, 8), np.uint8)), ["got (2, 1, 1, 8, 8)"]),
]


@pytest.mark.parametrize("name,write,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_data_files_name_the_file_and_what_was_expected(tmp_path, name, write, needles):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as info:
        data_lib.load_dataset(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and all(n in message for n in needles), message
    assert "allow_pickle" not in message and "\n" not in message


def test_train_refuses_before_any_training(tmp_path):
    path = tmp_path / "objects.npy"
    object_npy(path)
    result = run_in_process("train", "--data", path, "--epochs", "1", "--out", tmp_path / "run")
    error_line(result, "train", str(path), "array of Python objects")
    assert not (tmp_path / "run").exists()


def test_pickle_is_never_loaded(tmp_path, monkeypatch):
    """Even a pickle that would run code is only named: nothing unpickles it."""
    path = tmp_path / "evil.npy"
    np.save(path, np.array([None]), allow_pickle=True)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(ValueError, match="never unpickles"):
        data_lib.load_dataset(str(path))


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "locked.npy"
    np.save(path, images())
    real_open = pathlib.Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    with pytest.raises(ValueError, match=r"locked\.npy: cannot read this file \(Permission denied\)"):
        data_lib.load_dataset(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_for_real(tmp_path):
    path = tmp_path / "locked.npy"
    np.save(path, images())
    path.chmod(0)
    with pytest.raises(ValueError, match="cannot read this file"):
        data_lib.load_dataset(str(path))


def test_good_files_still_load(tmp_path):
    np.save(tmp_path / "ok.npy", images(10))
    np.savez(tmp_path / "ok.npz", x_train=images(4), x_test=images(2), y_train=np.arange(4), y_test=np.arange(2))
    assert len(data_lib.load_dataset(str(tmp_path / "ok.npy"), "all")) == 10
    assert len(data_lib.load_dataset(str(tmp_path / "ok.npz"), "test")) == 2


def test_an_empty_training_set_is_refused(tmp_path):
    empty = data_lib.ImageDataset(np.zeros((0, 1, 8, 8), np.float32), None, 0, "nothing")
    with pytest.raises(ValueError, match="the training set 'nothing' has no images"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "run")), empty)
