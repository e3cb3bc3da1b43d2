"""Training: the minibatch SGVB loop (docs/DESIGN.md section 4), on the fused ops.

For each minibatch of M examples: draw M x L noise values (inside the latent op),
compute the estimator's gradient, and take a (fused) optimizer step. Around that loop:
a learning-rate schedule, a tqdm progress bar with the running ELBO, validation each
epoch, a metrics CSV, atomic checkpoints that resume bit-for-bit, and a guard that stops
on the first non-finite loss or gradient, names the term and the step, and leaves the
last good checkpoint. The loop never waits on the device inside a step: the guard and
the progress bar look at the kept per-step sums once every CHECK_EVERY steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..io import data as data_lib
from . import distributed, runlock
from ..models import likelihoods
from .. import ops, tuning
from .callbacks import Callback, TensorBoardLogger
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import OPTIMIZERS, TrainConfig
from .evaluate import evaluate
from ..io.images import write_pictures
from .metrics import METRICS_NAME, append_metrics, truncate_metrics
from ..models.hierarchy import HierarchicalVAE, layer_options
from ..models.vae import VAE
from .optim import clear_grads, fused_step
from .schedule import LRSchedule, epochs_that_fit


# The per-step sums kept for the NaN guard and the metrics; the first is the loss's (-elbo).
TERMS = ("elbo", "rec", "kl", "log_q", "log_p")
# Steps between the NaN guard's checks: one host synchronization (and one snapshot to replay
# from, a copy of the parameters, gradients and optimizer state) per window instead of per step.
CHECK_EVERY = 100


def make_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    """The optimizer with its fused kernel where torch has one (the whole update in one pass over
    each parameter), else its foreach form (one multi-tensor kernel per update term)."""
    parameters = list(parameters)
    devices = {p.device.type for p in parameters}
    fused_devices = {"cpu"} if name == "adagrad" else {"cpu", "cuda"}  # torch's fused Adagrad is CPU only
    if devices <= fused_devices and all(p.is_floating_point() for p in parameters):
        return OPTIMIZERS[name](parameters, lr=lr, fused=True)
    return OPTIMIZERS[name](parameters, lr=lr, foreach=True)


class TrainingDiverged(UserError, RuntimeError):
    """A loss or gradient became NaN or infinite; the message says which and where."""


def make_output_folder(path) -> Path:
    """Create the run's folder, or say in one line why --out cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is an existing file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, no permission, read-only file system
        raise ValueError(f"--out {path}: cannot create this folder ({exc.strerror or exc}); choose another --out") \
            from None
    return path


# ----------------------------------------------------------------------
class Trainer:
    """Runs the SGVB loop for one model on in-memory data."""

    def __init__(self, config: TrainConfig, train_set, val_set=None, model: VAE | None = None,
                 callbacks: Sequence[Callback] = (), chosen=None):
        """chosen: the names of the fields the caller chose (default: those that differ from their
        defaults); one that does not apply to this run (binarize for a Gaussian, ...) is refused."""
        config.validate()
        if len(train_set) == 0:
            raise ValueError(f"the training set {train_set.name!r} has no images")
        config, self.likelihood_choice = resolve_likelihood(config, train_set)
        config.check_applies(config.set_fields() if chosen is None else chosen)
        self.config = config
        self.train_set = train_set
        self.val_set = val_set
        self.out_dir = make_output_folder(config.out_dir)
        self.device = torch.device(config.device)
        self.callbacks = list(callbacks)
        condition_dim = train_set.num_classes if config.conditional else 0
        if config.conditional and not condition_dim:
            raise ValueError(f"--conditional needs a labelled data set; {train_set.name} has no labels")
        if model is None:
            # The initial weights come from the seed on a forked generator: the caller's global
            # RNG state is left as it was, and the same seed still gives the same weights.
            # A CPU calibration (FASTVAE_TUNING=calibrate) says nothing about another device, and torchrun's
            # processes, timing at once, could each decide differently: the rules decide there.
            calibrate = self.device.type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) == 1
            tuned = contextlib.nullcontext() if calibrate else tuning.rules_only()
            with torch.random.fork_rng(devices=[]), tuned:
                torch.manual_seed(config.seed)
                model = (HierarchicalVAE if config.stochastic_layers > 1 else VAE)(
                    train_set.shape, config.latent_dim, config.encoder, config.decoder, config.likelihood,
                    encoder_config=config.arch_config, decoder_config=config.arch_config,
                    condition_dim=condition_dim, gaussian_logvar=config.gaussian_logvar,
                    prior=config.prior, prior_components=config.prior_components, **layer_options(config),
                )
        self.model = model.to(self.device)
        self.model.likelihood_spec.check_data(train_set.images, f"the training set {train_set.name!r}")
        self.world = distributed.init_from_environment(self.device)
        # Training steps go through DDP when torchrun started several processes;
        # validation, pictures and checkpoints use the plain module on rank 0.
        self.step_module = self.model
        if self.world.size > 1:
            self.step_module = torch.nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr)
        self.num_batches = max(1, math.ceil(len(train_set) / config.batch_size))
        self.objective_settings = config.objective_settings(len(train_set))
        self.schedule = LRSchedule(self.optimizer, config.lr_schedule, config.lr, config.epochs * self.num_batches)
        self.named_parameters = list(self.model.named_parameters())
        self.parameters = [p for _, p in self.named_parameters]
        # fp16 gradients can overflow: the scaler rescales them and skips the steps whose
        # gradients are not finite, so the gradient checks below leave those to it.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        # The latent op's eps stream, on the training device (a CUDA kernel draws from a CUDA generator).
        self.noise = torch.Generator(device=self.device).manual_seed(config.seed)
        self.epoch = 0
        self.step = 0

    # -- state ----------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_NAME

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "noise_rng": self.noise.get_state(),
            "lr_schedule": self.schedule.state_dict(),
            "model_config": self.model.config,
            "train_config": asdict(self.config),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise_rng"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        if "lr_schedule" in state:
            self.schedule.load_state_dict(state["lr_schedule"])
        if self.config.max_minutes is None and self.schedule.end_step != self.config.epochs * self.num_batches:
            # An extended (or formerly time-planned) run: the schedule of a run asked for these epochs.
            self.schedule.plan(self.config.epochs * self.num_batches)
        if self.world.is_main:
            truncate_metrics(self.metrics_path, self.epoch)
        self.world.barrier()

    # -- the loop -------------------------------------------------------
    def _precision(self):
        """Autocast for --precision bf16/fp16 (the fused ops accumulate in float32); nothing for fp32."""
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.config.precision in dtypes:
            return torch.autocast(self.device.type, dtype=dtypes[self.config.precision])
        return contextlib.nullcontext()

    def _epoch_generator(self, epoch: int, salt: int = 0) -> torch.Generator:
        """Shuffling and binarization depend only on (seed, epoch): resuming replays them exactly."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch * 7919 + salt)

    def _beta(self, epoch_progress: float) -> float:
        if self.config.warmup_epochs <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, epoch_progress / self.config.warmup_epochs)

    def _prepare(self, x, y, generator):
        x = x.to(self.device)
        x = data_lib.binarize(x, self.config.binarize_mode, generator=generator)
        condition = None
        if self.config.conditional:
            condition = data_lib.one_hot(y, self.train_set.num_classes).to(self.device)
        return x, condition

    def _gather(self, chosen: torch.Tensor, generator):
        """The minibatch of training rows `chosen`, binarized, and its condition.

        Dynamic binarization draws in the pass that gathers the rows (ops.gather_bernoulli: one
        seed per batch from the epoch generator, each row's draw keyed by its index in the
        training set), so a replayed or resumed epoch, and every data-parallel process, sees
        the same binary batch.
        """
        images, labels = self.train_set.images, self.train_set.labels
        mode = self.config.binarize_mode
        if mode == "dynamic":
            x = ops.gather_bernoulli(images, chosen, generator=generator)
        else:
            x = data_lib.binarize(images[chosen], mode)
        condition = None
        if self.config.conditional:
            condition = data_lib.one_hot(labels[chosen], self.train_set.num_classes).to(self.device)
        return x.to(self.device), condition

    def _check_finite(self, loss, out, where: str) -> None:
        finite = bool(torch.isfinite(loss))
        # Every process must stop together, or the others would wait forever in DDP's all-reduce.
        if self.world.all_sum([0.0 if finite else 1.0])[0] == 0:
            return
        # The previous step's gradients are still in .grad: a non-finite one there made the
        # parameters non-finite, and is the cause to report.
        self._check_gradients(f"epoch {self.epoch + 1}, step {self.step}")
        if finite:
            raise TrainingDiverged(f"non-finite loss in another process at {where}; {self._kept_message()}")
        for name, value in (("reconstruction log-likelihood", out.rec), ("KL", out.kl),
                            ("log q(z|x)", out.log_q), ("log p(z)", out.log_p)):
            if not torch.isfinite(value).all():
                term = name
                break
        else:
            term = "loss"
        raise TrainingDiverged(f"non-finite {term} at {where}; {self._kept_message()}")

    def _check_gradients(self, where: str) -> None:
        """Raise if a gradient of the last step is non-finite.

        Not run every step: a non-finite gradient makes the parameters non-finite, so the next
        step's loss check catches it and calls this on the gradients still in .grad; and it runs
        before every checkpoint, so a checkpoint never holds the result of such a step.
        """
        if self.scaler is not None:
            return
        grads = [(name, p.grad) for name, p in self.named_parameters if p.grad is not None]
        if not grads or torch.isfinite(torch.stack([g.sum() for _, g in grads]).sum()):  # NaN/inf survive a sum
            return
        name = next(name for name, g in grads if not torch.isfinite(g).all())
        raise TrainingDiverged(f"non-finite gradient of {name} at {where}; {self._kept_message()}")

    def _kept_message(self) -> str:
        if self.checkpoint_path.exists():
            return f"training stopped, the last good checkpoint (epoch {self.epoch}) is kept at {self.checkpoint_path}"
        return "training stopped before the first checkpoint was written"

    def train_step(self, x, y, *, epoch: int, beta: float, generator=None) -> tuple[torch.Tensor, int]:
        """One SGVB step on a global minibatch, checked at once; returns this process's sums
        (elbo, rec, kl) and example count.

        Under torchrun each process binarizes the whole global batch, then takes its contiguous
        rows, so every process sees exactly the data (and noise) a single process would.
        """
        x, condition = self._prepare(x, y, generator)
        terms, count = self._step(x, condition, epoch=epoch, beta=beta, check_now=True)
        return terms[:3], count

    def _step(self, x, condition, *, epoch: int, beta: float, check_now: bool) -> tuple[torch.Tensor, int]:
        """The step itself; returns the sums of TERMS over this process's rows, still on the device.

        check_now=False leaves the NaN guard to the caller (train_epoch checks the returned
        sums every CHECK_EVERY steps): no host synchronization inside the step.
        """
        cfg = self.config
        global_size = x.shape[0]
        start, stop = self.world.shard(global_size)
        x = x[start:stop]
        condition = condition[start:stop] if condition is not None else None
        self.schedule.apply(self.step)
        with self._precision():
            out = self.step_module(x, condition, num_samples=cfg.num_samples, objective=cfg.objective,
                                   beta=beta, generator=self.noise, row_offset=start,
                                   objective_settings=self.objective_settings)
        elbo_sum = out.elbo.sum()
        # -mean over the global batch; DDP averages gradients over processes, hence * world size.
        loss = -elbo_sum * (self.world.size / global_size)
        if check_now:
            self._check_finite(loss, out, f"epoch {epoch}, step {self.step + 1}")
        clear_grads(self.parameters)
        if self.scaler is None:
            loss.backward()
            fused_step(self.optimizer)
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        with torch.no_grad():
            return torch.stack([elbo_sum, out.rec.mean(0).sum(), out.kl.sum(), out.log_q.sum(),
                                out.log_p.sum()]), x.shape[0]

    # -- the epoch: steps checked in windows -------------------------------
    def _snapshot(self, generator: torch.Generator) -> dict:
        """What a window of steps changes, so that a diverged window can be replayed exactly."""
        def clone(value):
            return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)

        optimizer_state = self.optimizer.state_dict()
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": {"state": {k: {n: clone(v) for n, v in s.items()}
                                    for k, s in optimizer_state["state"].items()},
                          "param_groups": copy.deepcopy(optimizer_state["param_groups"])},
            "grads": [None if p.grad is None else p.grad.clone() for _, p in self.named_parameters],
            "noise_rng": self.noise.get_state(),
            "epoch_rng": generator.get_state(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
        }

    def _restore(self, snapshot: dict, generator: torch.Generator) -> None:
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        for (_, p), grad in zip(self.named_parameters, snapshot["grads"]):
            p.grad = grad
        self.noise.set_state(snapshot["noise_rng"])
        generator.set_state(snapshot["epoch_rng"])
        if self.scaler is not None:
            self.scaler.load_state_dict(snapshot["grad_scaler"])
        self.step = snapshot["step"]

    def _replay_diverged(self, snapshot, generator, epoch: int, steps: list, records: torch.Tensor) -> None:
        """A window held a non-finite loss: replay it from its snapshot with the guard checking
        every step, which stops at the first bad one and names the term (or the gradient before it)."""
        self._restore(snapshot, generator)
        for chosen, beta in steps:
            x, condition = self._gather(chosen, generator)
            self._step(x, condition, epoch=epoch, beta=beta, check_now=True)
        # The replay ran clean (a nondeterministic kernel?): report what the window recorded.
        bad = int(torch.nonzero(~torch.isfinite(records[:, 0]))[0, 0])
        where = f"epoch {epoch}, step {snapshot['step'] + bad + 1}"
        raise TrainingDiverged(f"non-finite loss at {where}; {self._kept_message()}")

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        cfg = self.config
        generator = self._epoch_generator(epoch)
        order = torch.randperm(len(self.train_set), generator=generator)  # then the binarization draws
        num_batches = math.ceil(len(self.train_set) / cfg.batch_size)  # 0 for an empty set: no steps
        records = torch.zeros(num_batches, len(TERMS), dtype=torch.float64, device=self.device)
        counts = 0  # examples of this process's shards
        bar = tqdm(total=num_batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, mininterval=0.5,
                   disable=not self.world.is_main)
        window_start, snapshot, window = 0, self._snapshot(generator), []
        for i in range(num_batches):
            chosen = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            beta = self._beta(epoch - 1 + i / num_batches)
            window.append((chosen, beta))
            x, condition = self._gather(chosen, generator)
            step_terms, count = self._step(x, condition, epoch=epoch, beta=beta, check_now=False)
            records[i] = step_terms
            counts += count
            if len(window) == CHECK_EVERY or i == num_batches - 1:
                # One host synchronization per window: the NaN guard and the progress bar.
                recorded = records[window_start:i + 1]
                finite = bool(torch.isfinite(recorded[:, 0]).all())
                if self.world.all_sum([0.0 if finite else 1.0])[0] > 0:
                    self._replay_diverged(snapshot, generator, epoch, window, recorded)
                bar.update(len(window))
                if self.world.is_main:
                    bar.set_postfix(elbo=f"{records[:i + 1, 0].sum().item() / max(counts, 1):.2f}")
                window_start, window = i + 1, []
                if i < num_batches - 1:
                    snapshot = self._snapshot(generator)
        bar.close()
        elbo, rec, kl = records[:, :3].sum(0).tolist()
        elbo, rec, kl, seen = self.world.all_sum([elbo, rec, kl, float(counts)])
        row = {"train_elbo": elbo / max(seen, 1), "train_rec": rec / max(seen, 1), "train_kl": kl / max(seen, 1)}
        return {**row, **self._bits_per_dim("train_bpd", row["train_elbo"])}

    def _bits_per_dim(self, column: str, elbo: float) -> dict:
        """{column: -elbo in bits per dimension} for likelihoods that report it (8-bit images), else {}."""
        if not self.model.likelihood_spec.bits_per_dim:
            return {}
        return {column: likelihoods.bits_per_dim(-elbo, self.model.input_shape)}

    def validate(self, epoch: int) -> dict:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        mode = self.config.binarize_mode
        generator = self._epoch_generator(epoch, salt=1)
        with self._precision():
            results = evaluate(self.model, self.val_set.images, self.val_set.labels, self.val_set.num_classes,
                               binarize=lambda x: data_lib.binarize(x, mode, generator=generator),
                               generator=generator)
        return {"val_elbo": results["elbo"], "val_rec": results["rec"], "val_kl": results["kl"],
                **self._bits_per_dim("val_bpd", results["elbo"])}

    def _notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def write_pictures(self, dataset) -> dict:
        """The run's pictures (rank 0), each announced to the callbacks; returns {name: path}."""
        written = write_pictures(self.model, dataset, self.out_dir, seed=self.config.seed)
        for name, path in written.items():
            self._notify("on_picture_written", name, path)
        return written

    def close_callbacks(self) -> None:
        self._notify("close")

    def fit(self, resume: bool = False) -> list[dict]:
        if resume:
            self.resume()
        elif self.world.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh metrics file
        started = time.perf_counter()
        history, epoch_seconds = [], []
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            tick = time.perf_counter()
            row = {"epoch": epoch, **self.train_epoch(epoch)}
            train_seconds = time.perf_counter() - tick
            if self.world.is_main:
                val_metrics = self.validate(epoch)
                row.update(val_metrics)
                if val_metrics:
                    self._notify("on_validation", epoch, val_metrics)
            row["seconds"] = round(train_seconds, 3)
            row["examples_per_second"] = round(len(self.train_set) / max(train_seconds, 1e-9), 1)
            row["lr"] = self.schedule.lr(self.step - 1) if self.schedule.annealing else self.config.lr
            epoch_seconds.append(time.perf_counter() - tick)
            # Planned before the checkpoint, which keeps the plan.
            stop = self._plan_after_epoch(epoch, time.perf_counter() - started, epoch_seconds)
            self._check_gradients(f"epoch {epoch}, step {self.step}")  # never checkpoint a bad update
            self.epoch = epoch
            if self.world.is_main:  # one writer: checkpoint and metrics exist once
                save_checkpoint(self.checkpoint_path, self.state())
                append_metrics(self.metrics_path, row)
                self._notify("on_epoch_end", row)
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            self.world.barrier()
            history.append(row)
            if stop:
                if self.world.is_main:
                    tqdm.write(stop)
                break
        return history

    def _plan_after_epoch(self, epoch: int, elapsed: float, epoch_seconds: list[float]) -> str | None:
        """Re-plan the learning-rate schedule for the time left; the reason to stop now, if any.

        Without --max-minutes the schedule spans --epochs and nothing changes here. With it, a
        constant rate runs until the epoch that crosses the budget (as it always did); cosine and
        burda end where the epochs that still fit end, judged from the recent epochs' time, so
        the last epoch before the budget runs at the schedule's end. Process 0's clock decides for all.
        """
        budget = self.config.max_minutes
        if budget is None:
            return None
        seconds_left = 60 * budget - elapsed
        reached = f"time budget of {budget} minutes reached after epoch {epoch}"
        if not self.schedule.annealing:
            out_of_time = self.world.all_sum([1.0 if seconds_left < 0 else 0.0])[0] > 0
            return reached if out_of_time else None
        fits = epochs_that_fit(seconds_left, epoch_seconds) if self.world.is_main else 0
        fits = int(self.world.all_sum([float(fits)])[0])
        if self.schedule.finished(self.step):
            return (f"{self.config.lr_schedule} schedule annealed after epoch {epoch}, "
                    f"in the time budget of {budget} minutes")
        if fits == 0:
            return f"{reached} (the {self.config.lr_schedule} schedule was at {self.schedule.progress(self.step):.0%})"
        remaining = min(self.config.epochs - epoch, fits)
        if remaining > 0:
            self.schedule.replan(self.step, remaining * self.num_batches)
        return None


def resolve_likelihood(config: TrainConfig, dataset) -> tuple[TrainConfig, str | None]:
    """config with likelihood "auto" replaced by the likelihood that fits the data set (what the
    checkpoint then stores), and a line saying which and why; (config, None) when it names one."""
    if config.likelihood != likelihoods.AUTO:
        return config, None
    name, reason = likelihoods.resolve_auto(dataset.images, dataset.binary_benchmark)
    return dataclasses.replace(config, likelihood=name), f"likelihood: {name} (auto: {dataset.name} is {reason})"


def split_validation(dataset, fraction: float):
    """The last `fraction` of the training set (deterministic) becomes the validation set."""
    count = int(len(dataset) * fraction)
    if count == 0:
        return dataset, None
    cut = len(dataset) - count

    def part(sl):
        labels = dataset.labels[sl] if dataset.labels is not None else None
        return data_lib.ImageDataset(dataset.images[sl], labels, dataset.num_classes, dataset.name,
                                     dataset.binary_benchmark)

    return part(slice(0, cut)), part(slice(cut, None))


# What a resumed run takes from the new configuration; everything else comes from its checkpoint.
RESUMABLE_FIELDS = ("epochs", "out_dir", "max_minutes", "tensorboard")


def resumed_config(config: TrainConfig) -> TrainConfig:
    """The configuration of the run in config.out_dir, with only RESUMABLE_FIELDS taken from `config`."""
    saved = load_checkpoint(Path(config.out_dir) / CHECKPOINT_NAME)["train_config"]
    return TrainConfig.from_dict({**saved, **{name: getattr(config, name) for name in RESUMABLE_FIELDS}})


def resume_conflicts(config: TrainConfig, run: TrainConfig, names) -> list[str]:
    """The fields among `names`, other than RESUMABLE_FIELDS, whose value in config is not the run's."""
    return [name for name in sorted(names) if name not in RESUMABLE_FIELDS and getattr(config, name) != getattr(run, name)]


def train(config: TrainConfig, resume: bool = False, callbacks: Sequence[Callback] = (),
          chosen=None) -> tuple[Trainer, list[dict]]:
    """Load the data, train (or resume), and write the pictures next to the checkpoint.

    The run holds its output folder's lock (training/runlock.py) from before the Trainer is built until
    it returns: a second run into the same folder is refused (RunFolderBusy) instead of mixing its files
    in. chosen: as for Trainer (default: the fields `config` sets to other than their defaults).

    Resuming takes the run's configuration from its checkpoint; only RESUMABLE_FIELDS (`epochs`
    to extend a run, `max_minutes`, `tensorboard`) come from `config`, and any other field that
    `config` sets to a non-default value different from the run's is refused (ValueError). `config.tensorboard` adds a
    TensorBoardLogger writing to <out_dir>/tensorboard to `callbacks` (a fresh run replaces the
    event files an earlier run left there; a resumed one appends).
    """
    chosen = config.set_fields() if chosen is None else set(chosen)
    if resume:
        run = resumed_config(config)
        # A field set to something else than its default is a choice: refuse it rather than drop it.
        conflicts = resume_conflicts(config, run, config.set_fields())
        if conflicts:
            differ = "; ".join(f"{name}={getattr(config, name)!r} (the run has {getattr(run, name)!r})"
                               for name in conflicts)
            raise ValueError(f"resume=True continues the run in {config.out_dir} as it was trained, but config "
                             f"sets {differ}. Leave them at their defaults (only {', '.join(RESUMABLE_FIELDS)} "
                             "may change on resume), or start a new run in another out_dir")
        config = run
    config.validate()
    full = data_lib.load_dataset(config.data, "train")
    train_set, val_set = split_validation(full, config.val_fraction)
    world = distributed.init_from_environment(torch.device(config.device))
    with runlock.hold(make_output_folder(config.out_dir), world):
        return _train_holding_the_folder(config, resume, callbacks, chosen, train_set, val_set)


def _train_holding_the_folder(config, resume, callbacks, chosen, train_set, val_set):
    trainer = Trainer(config, train_set, val_set, callbacks=callbacks, chosen=chosen)
    if trainer.likelihood_choice and trainer.world.is_main:
        tqdm.write(trainer.likelihood_choice)
    if config.tensorboard and trainer.world.is_main:
        trainer.callbacks.append(TensorBoardLogger(trainer.out_dir / "tensorboard", fresh=not resume))
    try:
        history = trainer.fit(resume=resume)
        trainer.model.eval()
        if trainer.world.is_main:
            trainer.write_pictures(val_set or train_set)
    finally:
        trainer.close_callbacks()
    return trainer, history
