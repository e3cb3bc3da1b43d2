"""The CLI's error boundary: what users cause is one line, a bug keeps its traceback; --device is checked
against what the machine has; options that do not apply are refused, never ignored."""

import numpy as np
import pytest
import torch

from fastvae import cli
from fastvae.errors import UserError
from fastvae.models.registry import ArchitectureConfigError
from fastvae.ranges import AvailableDevice
from fastvae.training.checkpoint import CheckpointWriteError
from fastvae.training.config import TrainConfig
from fastvae.training.runlock import RunFolderBusy
from fastvae.training.trainer import TrainingDiverged

from cli_helpers import error_line, run_in_process


def failing_info(exc):
    def cmd(args):
        raise exc
    return cmd


def test_a_user_error_is_one_line_with_status_1(monkeypatch):
    monkeypatch.setattr(cli, "cmd_info", failing_info(UserError("the folder x is not a run\n(see fastvae list)")))
    code, _, err = run_in_process("info")
    assert code == 1
    assert err == "fastvae info: error: the folder x is not a run (see fastvae list)\n"


@pytest.mark.parametrize("bug", [KeyError("epoch"), TypeError("unsupported operand"), AttributeError("x"),
                                 RuntimeError("mat1 and mat2 shapes cannot be multiplied"), IndexError("3")])
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    monkeypatch.setattr(cli, "cmd_info", failing_info(bug))
    with pytest.raises(type(bug)):
        run_in_process("info")


def test_the_library_errors_users_cause_are_user_errors():
    for cls in (CheckpointWriteError, TrainingDiverged, RunFolderBusy, ArchitectureConfigError):
        assert issubclass(cls, UserError), cls
    assert issubclass(CheckpointWriteError, RuntimeError) and issubclass(ArchitectureConfigError, TypeError)


def test_an_architecture_keyword_it_does_not_take_is_one_line(tmp_path):
    result = run_in_process("train", "--arch-config", '{"bogus": 1}', "--epochs", "1", "--out", tmp_path / "r")
    error_line(result, "train", "'bogus'", "it accepts")


def test_device_without_a_cuda_build(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = run_in_process("train", "--device", "cuda", "--epochs", "1", "--out", tmp_path / "run")
    error_line(result, "train", "--device cuda is not available", "built without CUDA", "this machine has cpu")
    assert not (tmp_path / "run").exists()


def test_device_without_a_gpu_and_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert AvailableDevice().problem("cuda") == ("cuda is not available: no CUDA GPU is visible to this process; "
                                                 "this machine has cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA cannot use the 2 GPU(s) it sees" in AvailableDevice().problem("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert AvailableDevice().problem("cuda:2") == ("cuda:2 is not available: there are 2 GPUs; this machine has "
                                                   "cpu, cuda:0, cuda:1")
    assert AvailableDevice().problem("cuda:1") is None and AvailableDevice().problem("cuda") is None
    assert AvailableDevice().problem("cpu") is None
    assert "not a torch device" in AvailableDevice().problem("gpu0")


def test_python_api_device_check_names_the_field():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device cuda is not available"):
        TrainConfig(device="cuda").validate()


def digits_npy(tmp_path, levels=256):
    """A small unlabelled set of 8-bit grey images (likelihood auto: not a Bernoulli)."""
    images = np.random.default_rng(0).integers(0, levels, size=(40, 8, 8), dtype=np.uint8)
    path = tmp_path / "grey.npy"
    np.save(path, images)
    return path


@pytest.mark.parametrize("extra,needles", [
    (["--likelihood", "gaussian", "--binarize", "dynamic"], ["--binarize dynamic does not apply", "gaussian"]),
    (["--likelihood", "bernoulli", "--gaussian-logvar", "-5"], ["--gaussian-logvar -5.0 does not apply"]),
])
def test_options_that_do_not_apply_are_refused(tmp_path, extra, needles):
    result = run_in_process("train", *extra, "--epochs", "1", "--hidden", "8", "--out", tmp_path / "run")
    error_line(result, "train", *needles)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_binarize_refused_once_auto_has_chosen_a_likelihood(tmp_path):
    result = run_in_process("train", "--data", digits_npy(tmp_path), "--binarize", "threshold", "--epochs", "1",
                                  "--hidden", "8", "--out", tmp_path / "run")
    error_line(result, "train", "--binarize threshold does not apply", "discretized_logistic")


def test_binarize_left_at_its_default_is_no_choice(tmp_path):
    code, out, err = run_in_process("train", "--likelihood", "gaussian", "--epochs", "1", "--hidden", "8",
                                    "--latent-dim", "2", "--out", tmp_path / "run")
    assert code == 0, err
    assert "trained to epoch 1" in out


def test_nproc_under_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_in_process("train", "--nproc", "2", "--epochs", "1", "--out", tmp_path / "run")
    error_line(result, "train", "--nproc does not apply under torchrun")


def test_condition_must_be_a_class_index_or_numbers():
    for text, needle in (("7.5", "a class index is an integer"), ("1,x", "attribute values are numbers")):
        result = run_in_process("sample", "no-model", "--condition", text)
        assert result[0] == 2
        error_line(result, "sample", "--condition", needle)


@pytest.fixture(scope="module")
def conditional_model(tmp_path_factory):
    from fastvae.io.export import save_pretrained
    from fastvae.models.vae import VAE

    model = VAE((1, 8, 8), 2, "mlp", encoder_config={"hidden": [8]}, decoder_config={"hidden": [8]},
                condition_dim=10)
    return save_pretrained(model, tmp_path_factory.mktemp("cvae") / "model")


@pytest.mark.parametrize("extra,ignored", [(["--num", "64"], "--num"), (["--condition", "3"], "--condition")])
def test_per_class_refuses_what_it_would_ignore(conditional_model, tmp_path, extra, ignored):
    result = run_in_process("sample", conditional_model, "--per-class", "2", *extra, "--out", tmp_path / "s.png")
    error_line(result, "sample", f"{ignored} does not apply with --per-class")
    assert not (tmp_path / "s.png").exists()
    code, _, err = run_in_process("sample", conditional_model, "--per-class", "2", "--out", tmp_path / "s.png")
    assert code == 0, err


def test_one_line_joins_a_multi_line_message():
    assert cli.one_line(ValueError("a\n  b\n\nc")) == "a b c"
    assert cli.one_line(OSError()) == "OSError"
