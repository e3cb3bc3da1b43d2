"""Model files to share: model.safetensors plus a plain config.json, loaded without pickle.

    fastvae export runs/digits --out digits-vae       # from a run folder or a checkpoint file
    model = fastvae.load("digits-vae")                # or VAE.from_pretrained("digits-vae")

safetensors holds only named tensors and a JSON header, so loading a folder someone sent you runs
no code from it (a checkpoint.pt is read by torch.load's restricted unpickler; this needs none).
config.json holds the model's constructor arguments and, when exported from a run, its training
configuration (the data source and binarization that `fastvae eval` reuses).

`export_decoder` turns the decoder (optionally with the fused log-likelihood) into a
torch.export program for inference: the fused ops have fake implementations, so they trace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..training.checkpoint import load_model, temporary_name
from ..models.vae import VAE

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "fastvae-pretrained"
FORMAT_VERSION = 1


def is_exported(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def save_pretrained(model: VAE, out_dir, train_config: dict | None = None) -> Path:
    """Write model.safetensors and config.json into out_dir (created); returns the folder.

    Each file goes to a temporary name first and is renamed when complete; on failure the
    temporary files are removed and nothing half-written is left.
    """
    from safetensors.torch import save_file

    from .. import __version__

    if model.config.get("encoder") is None or model.config.get("decoder") is None:
        raise ValueError("only models built from registered architecture names can be exported "
                         "(this one was built from custom modules)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file, not a folder; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory; contiguous copies own theirs.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "fastvae_version": __version__,
              "model_config": model.config, "train_config": train_config}
    _write_atomically(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    _write_atomically(out_dir / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def _write_atomically(path: Path, write) -> None:
    """write(tmp), then rename tmp to path; the file gets the permissions the umask allows (0666 & ~umask)
    like every other file a run writes: safetensors creates its files 0600, which a colleague cannot read."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ValueError(f"could not write {path}: {exc.strerror or exc}") from None
        raise


def current_umask() -> int:
    """This process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_config(folder) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not an exported fastvae model "
                                "(make one with `fastvae export RUN --out DIR`)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model_config" not in config:
        raise ValueError(f"{path} is not a fastvae model configuration (expected \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {config['format_version']}; this fastvae reads "
                         f"{FORMAT_VERSION}: upgrade fastvae")
    return config


def load_pretrained(folder) -> tuple[VAE, dict | None]:
    """(model in eval mode, its training configuration or None) from an exported folder; no pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file ({exc})") from None
    model = VAE.from_config(config["model_config"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not match {folder / CONFIG_NAME}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, config.get("train_config")


def load_any(path) -> tuple[VAE, dict | None]:
    """(model, training configuration or None) from an exported folder, a run folder or a checkpoint file."""
    if is_exported(path):
        return load_pretrained(path)
    if Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file():
        return load_pretrained(path)  # config.json without weights: say what is missing
    model, state = load_model(path)
    return model, state["train_config"]


def load(path) -> VAE:
    """The model in `path`: an exported folder (no pickle), a run folder or a checkpoint file."""
    return load_any(path)[0]


def export_run(source, out_dir) -> Path:
    """`fastvae export`: the model of a run folder or checkpoint, with its training configuration."""
    model, train_config = load_any(source)
    if isinstance(train_config, dict):
        train_config = json.loads(json.dumps(train_config))  # plain JSON values only
    return save_pretrained(model, out_dir, train_config)


class _Decoder(nn.Module):
    """z -> E[x|z], and with x also log p(x|z) through the fused likelihood op."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, z, x=None):
        decoded = self.model.decode(z)
        image = self.model.mean_image(decoded)
        if x is None:
            return image
        return image, self.model.log_likelihood(decoded, x)


def export_decoder(model: VAE, example_batch: int = 4, with_likelihood: bool = False):
    """A torch.export program of the decoder for inference, with a dynamic batch size.

    The program takes z (B, latent_dim) and returns E[x|z] (B, *input_shape); with_likelihood=True
    it takes (z, x) and also returns log p(x|z) (B,) from the fused op. Conditional models are
    not supported here.
    """
    if model.condition_dim:
        raise ValueError("export_decoder supports unconditional models only")
    module = _Decoder(model).eval()
    z = torch.zeros(example_batch, model.latent_dim)
    batch = torch.export.Dim("batch", min=1)
    if not with_likelihood:
        return torch.export.export(module, (z,), dynamic_shapes=({0: batch},))
    x = torch.zeros(example_batch, *model.input_shape)
    return torch.export.export(module, (z, x), dynamic_shapes=({0: batch}, {0: batch}))
