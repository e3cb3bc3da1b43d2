"""The training configuration: one dataclass, validated in one place.

The command line, the checkpoint and the Python API all read their choices and defaults from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from ..models import likelihoods, objectives
from ..models.hierarchy import check_layers

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "adagrad": torch.optim.Adagrad}
LR_SCHEDULES = ("constant", "cosine", "burda")
PRECISIONS = ("fp32", "bf16", "fp16")
BINARIZE_MODES = ("dynamic", "threshold", "none")


def option(default, help: str, *, flag: str | None = None, choices=None, parse=None, factory=None):
    """A TrainConfig field that also declares its command-line option.

    flag: the option's name when it is not the field's name with dashes (e.g. --out for out_dir);
    choices: the allowed values (a tuple, or a callable returning them when they can grow, such as
    registered names); parse: argparse's type= when it differs from the default's type.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every training option with its default; `fastvae train` builds its options from these fields."""

    data: str = option("digits", "digits (embedded), mnist:DIR, fashion-mnist[:DIR], an IDX folder, "
                                 ".npy/.npz, or an image folder")
    out_dir: str = option("runs/fastvae", "output folder: checkpoint, metrics.csv, PNGs", flag="--out")
    encoder: str = option("mlp", "registered encoder name (see `fastvae list`)")
    decoder: str | None = option(None, "registered decoder name (default: same as --encoder)")
    arch_config: dict = option(None, 'architecture keyword configuration as JSON, e.g. \'{"activation": "relu"}\'',
                               factory=dict, parse="json")
    latent_dim: int = option(8, "latent dimensions")
    stochastic_layers: int = option(1, "stochastic layers z1 .. zN (Burda et al. 2016): 2 adds q(z2|z1) and "
                                       "p(z1|z2) above --latent-dim's z1 (docs/hierarchy.md)")
    upper_latent_dims: list = option(None, "latent sizes of z2 .. zN, one per stochastic layer above the first, "
                                           "e.g. 50 or 50,25", parse="int_list", factory=lambda: [50])
    upper_hidden: list = option(None, "hidden widths of every network between z_i and z_i+1 (each direction)",
                                parse="int_list", factory=lambda: [100, 100])
    layer_architecture: str = option("mlp", "registered encoder building q(z_i+1|z_i) and p(z_i|z_i+1) on flat "
                                            "vectors (see `fastvae list`)")
    likelihood: str = option(likelihoods.AUTO, "decoder likelihood (see `fastvae list`); auto: one that fits the "
                                               "data (bernoulli for binary and MNIST-style sets, discretized_logistic "
                                               "for 8-bit images, ...)",
                             choices=lambda: (likelihoods.AUTO, *likelihoods.names()))
    gaussian_logvar: float = option(0.0, "log-variance of the fixed-variance gaussian likelihood (pixels in [0, 1]: "
                                         "try -5)")
    binarize: str = option("dynamic", "for bernoulli: resample binary images each epoch (dynamic), threshold at "
                                      "0.5, or none", choices=BINARIZE_MODES)
    objective: str = option("analytic", "SGVB-B (analytic KL), SGVB-A (monte_carlo), the IWAE bound, or a plugin's "
                                        "(see `fastvae list`)", choices=objectives.names)
    num_samples: int = option(1, "L: latent samples per example (k for iwae)", flag="--samples")
    beta: float = option(1.0, "weight of the KL term")
    warmup_epochs: float = option(0.0, "epochs of linear KL warm-up from 0 to beta", flag="--warmup")
    optimizer: str = option("adam", "optimizer", choices=tuple(OPTIMIZERS))
    lr: float = option(1e-3, "learning rate")
    lr_schedule: str = option("constant", "learning-rate schedule: constant; cosine to zero; burda, the steps of "
                                          "Burda et al. 2016 (lr * 10^(-i/7) for 3^i of every 3280 epochs, i = 0..7). "
                                          "cosine and burda span --epochs, or with --max-minutes the epochs that fit "
                                          "in it (planned from the measured epoch time)", choices=LR_SCHEDULES)
    batch_size: int = option(100, "minibatch size M")
    epochs: int = option(120, "training epochs")
    seed: int = option(0, "seed of weights, shuffling, binarization and noise")
    val_fraction: float = option(0.1, "share of the training set held out for validation")
    conditional: bool = option(False, "condition encoder and decoder on the labels")
    precision: str = option("fp32", "bf16 autocast (CPU or GPU), fp16 autocast with gradient scaling (GPU only)",
                            choices=PRECISIONS)
    max_minutes: float | None = option(None, "stop after the epoch that crosses this time budget", parse=float)
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    tensorboard: bool = option(False, "also log scalars and pictures to OUT/tensorboard (needs the tensorboard "
                                      "package: pip install 'fastvae[tensorboard]')")

    def validate(self) -> None:
        if self.likelihood != likelihoods.AUTO:
            likelihoods.get(self.likelihood)  # unknown names raise, naming the known ones
        objectives.get(self.objective)
        # One stochastic layer has nothing above it: the (default) upper sizes are not read.
        check_layers(self.stochastic_layers, self.upper_latent_dims if self.stochastic_layers > 1 else ())
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.precision != "fp16" or self.device.startswith("cuda"),
             "precision fp16 needs a CUDA device (--device cuda); on CPU use bf16"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (math.isfinite(self.gaussian_logvar), f"gaussian_logvar must be finite, got {self.gaussian_logvar}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}"),
            (self.binarize in BINARIZE_MODES, f"binarize must be one of {BINARIZE_MODES}, got {self.binarize!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def binarize_mode(self) -> str:
        """The binarization the data actually gets: only a likelihood declared binarize=True (Bernoulli) gets it."""
        return self.binarize if likelihoods.get(self.likelihood).binarize else "none"

    def set_fields(self) -> set[str]:
        """The names of the fields whose value differs from their default: what a caller chose."""
        def default(f):
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

        return {f.name for f in fields(self) if getattr(self, f.name) != default(f)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
