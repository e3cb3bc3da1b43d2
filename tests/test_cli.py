"""Every CLI command end to end, in a subprocess, as a user runs it."""

import json

import pytest
from PIL import Image

from cli_helpers import run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train", "--epochs", "3", "--out", str(out), "--hidden", "64", "--latent-dim", "4")
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_checkpoint_metrics_and_pngs(run_dir):
    for name in ("checkpoint.pt", "metrics.csv", "samples.png", "reconstructions.png", "loss.png"):
        assert (run_dir / name).exists(), name


def test_train_resume_extends_the_run(run_dir):
    result = run_cli("train", "--out", str(run_dir), "--resume", "--epochs", "4")
    assert result.returncode == 0, result.stderr
    assert "trained to epoch 4" in result.stdout


def test_eval_prints_elbo_and_is_log_likelihood(run_dir):
    result = run_cli("eval", str(run_dir), "--is-samples", "50", "--limit", "100")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["examples"] == 100 and report["log_likelihood"] >= report["elbo"] - 0.5


def test_sample_and_reconstruct_write_pngs(run_dir, tmp_path):
    result = run_cli("sample", str(run_dir), "--num", "16", "--out", str(tmp_path / "s.png"))
    assert result.returncode == 0, result.stderr
    Image.open(tmp_path / "s.png").verify()
    result = run_cli("reconstruct", str(run_dir), "--num", "8", "--out", str(tmp_path / "r.png"))
    assert result.returncode == 0, result.stderr
    Image.open(tmp_path / "r.png").verify()


def test_list_shows_the_registry():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    assert "mlp" in result.stdout and "conv" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--epochs", "zero"], "invalid int value"),
        (["train", "--objective", "elbo"], "invalid choice"),
        (["train", "--hidden", "a,b"], "comma-separated integers"),
        (["train", "--arch-config", "{bad"], "JSON object"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/no/such/folder", "--epochs", "1"], "/no/such/folder"),
        (["train", "--epochs", "0"], "epochs must be >= 1"),
        (["eval", "/no/such/run"], "no checkpoint"),
        (["sample", "/no/such/run"], "no checkpoint"),
    ],
)
def test_bad_values_exit_1_with_one_line(args, message, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "x")) if args[0] == "train" else run_cli(*args)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_conditional_train_and_sample(tmp_path):
    out = tmp_path / "cvae"
    result = run_cli("train", "--conditional", "--epochs", "2", "--out", str(out), "--hidden", "64")
    assert result.returncode == 0, result.stderr
    result = run_cli("sample", str(out), "--condition", "7", "--num", "8", "--out", str(tmp_path / "sevens.png"))
    assert result.returncode == 0, result.stderr
    result = run_cli("sample", str(out), "--per-class", "4", "--out", str(tmp_path / "classes.png"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "classes.png") as image:
        assert image.size[1] > image.size[0]  # 10 rows of 4
    for bad, message in ((["--condition", "12"], "class in 0..9"), (["--condition", "1,0"], "10 attribute values")):
        result = run_cli("sample", str(out), *bad, "--out", str(tmp_path / "bad.png"))
        assert result.returncode == 1 and message in result.stderr


def test_sample_condition_on_unconditional_model_is_an_error(run_dir, tmp_path):
    result = run_cli("sample", str(run_dir), "--condition", "7", "--out", str(tmp_path / "c.png"))
    assert result.returncode == 1 and "not conditional" in result.stderr
