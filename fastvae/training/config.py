"""The training configuration: one dataclass, validated in one place.

The command line, the checkpoint and the Python API all read their choices and defaults from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch

from ..models import likelihoods, objectives, priors
from ..models.hierarchy import MAX_LAYERS, check_layers
from ..ranges import SEED, AvailableDevice, CommaSeparated, Range

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "adagrad": torch.optim.Adagrad}
LR_SCHEDULES = ("constant", "cosine", "burda")
PRECISIONS = ("fp32", "bf16", "fp16")
BINARIZE_MODES = ("dynamic", "threshold", "none")
COUNTS = CommaSeparated(Range(ge=1, integer=True))  # sizes given as a list, e.g. --upper-hidden 100,100
# Objective settings (objectives.Objective.settings) and the TrainConfig fields that give them.
OBJECTIVE_SETTING_FIELDS = {"alpha": "tc_alpha", "gamma": "tc_gamma"}


def option(default, help: str, *, flag: str | None = None, choices=None, parse=None, factory=None, check=None,
           applies=None):
    """A TrainConfig field that also declares its command-line option.

    flag: the option's name when it is not the field's name with dashes (e.g. --out for out_dir);
    choices: the allowed values (a tuple, or a callable returning them when they can grow, such as
    registered names); parse: argparse's type= when it differs from the default's type;
    check: a fastvae.ranges check (a Range, AvailableDevice) that validate() applies to the value
    (None skips it) and --help shows; applies: config -> None when the field means something in
    that configuration, else the reason it does not (a field chosen where it does not apply is refused).
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse, "check": check, "applies": applies}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(f: dataclasses.Field) -> str:
    """The command-line option of a TrainConfig field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class ConfigError(ValueError):
    """A field's value is refused: `detail` completes a sentence that starts with the field's name
    (the command line puts the option's flag there instead)."""

    def __init__(self, field_name: str, detail: str):
        super().__init__(f"{field_name} {detail}")
        self.field_name, self.detail = field_name, detail


def _binarize_applies(config) -> str | None:
    if config.binarize == "none" or config.likelihood == likelihoods.AUTO or likelihoods.get(config.likelihood).binarize:
        return None
    return f"only likelihoods for binary data (bernoulli) are binarized, and this run's is {config.likelihood}"


def _gaussian_logvar_applies(config) -> str | None:
    if config.likelihood in (likelihoods.AUTO, "gaussian"):
        return None
    return f"it is the gaussian likelihood's log-variance, and this run's likelihood is {config.likelihood}"


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
    latent_dim: int = option(8, "latent dimensions", check=Range(ge=1, integer=True))
    stochastic_layers: int = option(1, "stochastic layers z1 .. zN (Burda et al. 2016): 2 adds q(z2|z1) and "
                                       "p(z1|z2) above --latent-dim's z1 (docs/hierarchy.md)",
                                    check=Range(ge=1, le=MAX_LAYERS, integer=True))
    upper_latent_dims: list = option(None, "latent sizes of z2 .. zN, one per stochastic layer above the first, "
                                           "e.g. 50 or 50,25", check=COUNTS, factory=lambda: [50])
    upper_hidden: list = option(None, "hidden widths of every network between z_i and z_i+1 (each direction)",
                                check=COUNTS, factory=lambda: [100, 100])
    layer_architecture: str = option("mlp", "registered encoder building q(z_i+1|z_i) and p(z_i|z_i+1) on flat "
                                            "vectors (see `fastvae list`)")
    likelihood: str = option(likelihoods.AUTO, "decoder likelihood (see `fastvae list`); auto: one that fits the "
                                               "data (bernoulli for binary and MNIST-style sets, discretized_logistic "
                                               "for 8-bit images, ...)",
                             choices=lambda: (likelihoods.AUTO, *likelihoods.names()))
    gaussian_logvar: float = option(0.0, "log-variance of the fixed-variance gaussian likelihood (pixels in [0, 1]: "
                                         "try -5)", check=Range(finite=True), applies=_gaussian_logvar_applies)
    binarize: str = option("dynamic", "for bernoulli: resample binary images each epoch (dynamic), threshold at "
                                      "0.5, or none", choices=BINARIZE_MODES, applies=_binarize_applies)
    objective: str = option("analytic", "SGVB-B (analytic KL), SGVB-A (monte_carlo), the IWAE bound, or a plugin's "
                                        "(see `fastvae list`)", choices=objectives.names)
    prior: str = option(priors.STANDARD, "prior p(z) (see `fastvae list`): standard N(0, I); mog, a learned "
                                         "mixture of K Gaussians; vamp, the VampPrior of K pseudo-inputs. Without "
                                         "an analytic KL the analytic objective uses the Monte Carlo KL (warned)",
                        choices=priors.names)
    prior_components: int | None = option(None, "K: mixture components (mog) or pseudo-inputs (vamp); default: "
                                                "the prior's own (see `fastvae list`); refused for standard",
                                          parse=int, check=Range(ge=1, integer=True))
    num_samples: int = option(1, "L: latent samples per example (k for iwae)", flag="--samples",
                              check=Range(ge=1, integer=True))
    beta: float = option(1.0, "weight of the KL term (beta_tcvae: of the total correlation)", check=Range(ge=0))
    tc_alpha: float = option(1.0, "beta_tcvae: weight alpha of the index-code mutual information",
                             check=Range(ge=0, finite=True))
    tc_gamma: float = option(1.0, "beta_tcvae: weight gamma of the dimension-wise KL", check=Range(ge=0, finite=True))
    warmup_epochs: float = option(0.0, "epochs of linear KL warm-up from 0 to beta", flag="--warmup",
                                  check=Range(ge=0))
    optimizer: str = option("adam", "optimizer", choices=tuple(OPTIMIZERS))
    lr: float = option(1e-3, "learning rate", check=Range(gt=0))
    lr_schedule: str = option("constant", "learning-rate schedule: constant; cosine to zero; burda, the steps of "
                                          "Burda et al. 2016 (lr * 10^(-i/7) for 3^i of every 3280 epochs, i = 0..7). "
                                          "cosine and burda span --epochs, or with --max-minutes the epochs that fit "
                                          "in it (planned from the measured epoch time)", choices=LR_SCHEDULES)
    batch_size: int = option(100, "minibatch size M", check=Range(ge=1, integer=True))
    epochs: int = option(120, "training epochs", check=Range(ge=1, integer=True))
    seed: int = option(0, "seed of weights, shuffling, binarization and noise", check=SEED)
    val_fraction: float = option(0.1, "share of the training set held out for validation", check=Range(ge=0, lt=1))
    conditional: bool = option(False, "condition encoder and decoder on the labels")
    precision: str = option("fp32", "bf16 autocast (CPU or GPU), fp16 autocast with gradient scaling (GPU only)",
                            choices=PRECISIONS)
    max_minutes: float | None = option(None, "stop after the epoch that crosses this time budget", parse=float,
                                      check=Range(gt=0))
    device: str = option("cpu", "torch device, e.g. cpu or cuda", check=AvailableDevice())
    tensorboard: bool = option(False, "also log scalars and pictures to OUT/tensorboard (needs the tensorboard "
                                      "package: pip install 'fastvae[tensorboard]')")

    def validate(self) -> None:
        self._check_declared()
        if self.likelihood != likelihoods.AUTO:
            likelihoods.get(self.likelihood)  # unknown names raise, naming the known ones
        objectives.get(self.objective)
        priors.components_of(self.prior, self.prior_components)  # unknown priors and bad counts raise
        self._check_objective_settings()
        # One stochastic layer has nothing above it: the (default) upper sizes are not read.
        check_layers(self.stochastic_layers, self.upper_latent_dims if self.stochastic_layers > 1 else ())
        if self.stochastic_layers > 1 and objectives.get(self.objective).settings is not None:
            raise ValueError(f"objective {self.objective!r} is not supported with stochastic_layers >= 2; use "
                             "analytic, monte_carlo or iwae")
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.precision != "fp16" or self.device.startswith("cuda"),
             "precision fp16 needs a CUDA device (--device cuda); on CPU use bf16"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (self.binarize in BINARIZE_MODES, f"binarize must be one of {BINARIZE_MODES}, got {self.binarize!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_declared(self) -> None:
        """Each field's declared check (option(check=...)): a new field is checked by declaring one."""
        for f in fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            problem = None if check is None or value is None else check.problem(value)
            if problem is not None:
                raise ConfigError(f.name, problem)

    def check_applies(self, chosen) -> None:
        """Refuse a field among `chosen` (names) that means nothing in this configuration
        (option(applies=...)), e.g. binarize for a Gaussian: a choice is applied or refused, never ignored."""
        for f in fields(self):
            applies = f.metadata.get("applies")
            reason = applies(self) if applies is not None and f.name in chosen else None
            if reason is not None:
                raise ConfigError(f.name, f"{getattr(self, f.name)} does not apply: {reason}")

    def _check_objective_settings(self) -> None:
        declared = objectives.get(self.objective).settings or {}
        for setting, name in OBJECTIVE_SETTING_FIELDS.items():
            flag = "--" + name.replace("_", "-")
            if setting not in declared and name in self.set_fields():
                users = [o for o in objectives.names() if setting in (objectives.get(o).settings or {})]
                raise ValueError(f"{name} ({flag}) is a setting of objective {', '.join(users)}, not of "
                                 f"{self.objective!r}")

    def objective_settings(self, dataset_size: int) -> dict:
        """The values of the objective's declared settings this configuration gives (see OBJECTIVE_SETTING_FIELDS);
        dataset_size: the training set's size N, for the estimators that need it."""
        declared = objectives.get(self.objective).settings or {}
        values = {setting: getattr(self, name) for setting, name in OBJECTIVE_SETTING_FIELDS.items()}
        values["dataset_size"] = dataset_size
        return {setting: value for setting, value in values.items() if setting in declared}

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
