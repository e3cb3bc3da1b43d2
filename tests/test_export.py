"""Model files to share: `fastvae export`, fastvae.load, VAE.from_pretrained, and torch.export of the decoder."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae.training.config import TrainConfig
from fastvae.io.export import export_decoder, export_run, load_any, save_pretrained
from fastvae.models.vae import VAE
from fastvae.training.trainer import train

pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    trainer, _ = train(TrainConfig(out_dir=str(out), epochs=1, latent_dim=4, arch_config={"hidden": [32]}))
    return trainer.out_dir


def forbid_unpickling(patch):
    """From here on, any unpickling (pickle itself or torch.load) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("loading an exported model unpickled something")

    for name in ("load", "loads", "Unpickler"):
        patch.setattr(pickle, name, refuse)
    patch.setattr(torch, "load", refuse)


@pytest.fixture()
def no_pickle(monkeypatch):
    forbid_unpickling(monkeypatch)


def test_export_writes_safetensors_and_plain_json(run, tmp_path):
    folder = export_run(run, tmp_path / "shared")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_config"]["latent_dim"] == 4 and config["train_config"]["data"] == "digits"


def test_load_rebuilds_the_model_without_pickle(run, tmp_path):
    folder = export_run(run, tmp_path / "shared")
    original, _ = load_any(run)
    x = torch.rand(5, 1, 8, 8)
    expected = original.reconstruct(x)
    with pytest.MonkeyPatch.context() as patch:
        forbid_unpickling(patch)
        for model in (fastvae.load(folder), VAE.from_pretrained(folder)):
            assert not model.training
            torch.testing.assert_close(model.reconstruct(x), expected, rtol=0, atol=0)


def test_save_pretrained_round_trip(tmp_path, no_pickle):
    model = VAE((1, 8, 8), latent_dim=3, encoder="conv", likelihood="gaussian_learned")
    model.save_pretrained(tmp_path / "m")
    loaded = VAE.from_pretrained(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert loaded.config == model.config


def test_export_then_sample_in_a_fresh_process_with_only_the_folder(run, tmp_path):
    folder = export_run(run, tmp_path / "shared")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "fastvae", "sample", str(folder), "--num", "9", "--out", "s.png"],
                            capture_output=True, text=True, timeout=600, cwd=empty, env=env)
    assert result.returncode == 0, result.stderr
    from PIL import Image
    with Image.open(empty / "s.png") as image:
        assert image.size == (3 * (64 + 2) + 2,) * 2  # 3x3 samples of 8x8 digits scaled 8x


def test_commands_accept_an_exported_folder(run, tmp_path):
    folder = export_run(run, tmp_path / "shared")
    for command in (["eval", str(folder), "--limit", "50"],
                    ["reconstruct", str(folder), "--num", "4", "--out", str(tmp_path / "r.png")],
                    ["export", str(folder), "--out", str(tmp_path / "again")]):
        result = subprocess.run([sys.executable, "-m", "fastvae", *command], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (command, result.stderr)
    report = json.loads(subprocess.run([sys.executable, "-m", "fastvae", "eval", str(run), "--limit", "50"],
                                       capture_output=True, text=True, timeout=600).stdout)
    assert report["elbo"] < 0


def test_bad_exported_folders(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastvae.load(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a fastvae model configuration"):
        fastvae.load(folder)
    save_pretrained(VAE((1, 8, 8), latent_dim=3), folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastvae.load(folder)
    save_pretrained(VAE((1, 8, 8), latent_dim=5), tmp_path / "five")
    os.replace(tmp_path / "five" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        fastvae.load(folder)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fastvae.load(tmp_path / "nothing-here")


def test_export_refuses_an_existing_file(run, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        export_run(run, target)


def test_failed_export_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ValueError, match="No space left"):
        save_pretrained(VAE((1, 8, 8), latent_dim=3), tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_torch_export_of_the_decoder_matches_eager(likelihood):
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=3, likelihood=likelihood).eval()
    program = export_decoder(model)
    z = torch.randn(7, 3)  # another batch size than the example: the batch dimension is dynamic
    torch.testing.assert_close(program.module()(z), model.mean_image(model.decode(z)))


def test_torch_export_of_the_decoder_and_fused_likelihood():
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=3).eval()
    program = export_decoder(model, with_likelihood=True)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("fastvae" in op for op in ops), ops  # the fused op is in the graph, not decomposed
    z, x = torch.randn(6, 3), torch.rand(6, 1, 8, 8).round()
    image, rec = program.module()(z, x)
    decoded = model.decode(z)
    torch.testing.assert_close(image, torch.sigmoid(decoded))
    torch.testing.assert_close(rec, torch.distributions.Bernoulli(logits=decoded).log_prob(x).sum((1, 2, 3)))
