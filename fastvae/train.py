"""Training: the minibatch SGVB loop (docs/DESIGN.md section 4), on the fused ops.

For each minibatch of M examples: draw M x L noise values (inside the latent op),
compute the estimator's gradient, and take an optimizer step. Around that loop:
a tqdm progress bar with the running ELBO, validation each epoch, a metrics CSV,
atomic checkpoints that resume bit-for-bit, and a guard that stops on the first
non-finite loss or gradient, names the term, and leaves the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import distributed
from .callbacks import Callback, TensorBoardLogger
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import OPTIMIZERS, TrainConfig
from .evaluate import evaluate
from .images import write_pictures
from .metrics import METRICS_NAME, append_metrics, truncate_metrics
from .model import VAE


class TrainingDiverged(RuntimeError):
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
                 callbacks: Sequence[Callback] = ()):
        config.validate()
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = VAE(
                    train_set.shape, config.latent_dim, config.encoder, config.decoder, config.likelihood,
                    encoder_config=config.arch_config, decoder_config=config.arch_config,
                    condition_dim=condition_dim,
                )
        self.model = model.to(self.device)
        self.world = distributed.init_from_environment(self.device)
        # Training steps go through DDP when torchrun started several processes;
        # validation, pictures and checkpoints use the plain module on rank 0.
        self.step_module = self.model
        if self.world.size > 1:
            self.step_module = torch.nn.parallel.DistributedDataParallel(self.model)
        # foreach: one multi-tensor kernel per update term instead of a Python loop over
        # parameters (PyTorch only picks it by default for CUDA tensors).
        self.optimizer = OPTIMIZERS[config.optimizer](self.model.parameters(), lr=config.lr, foreach=True)
        self.named_parameters = list(self.model.named_parameters())
        # fp16 gradients can overflow: the scaler rescales them and skips the steps whose
        # gradients are not finite, so the gradient checks below leave those to it.
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.noise = torch.Generator().manual_seed(config.seed)  # the latent op's eps stream
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
        """One SGVB step on a global minibatch; returns this process's sums (elbo, rec, kl) and example count.

        Under torchrun each process binarizes the whole global batch, then takes its contiguous
        rows, so every process sees exactly the data (and noise) a single process would.
        """
        cfg = self.config
        x, condition = self._prepare(x, y, generator)
        global_size = x.shape[0]
        start, stop = self.world.shard(global_size)
        x = x[start:stop]
        condition = condition[start:stop] if condition is not None else None
        with self._precision():
            out = self.step_module(x, condition, num_samples=cfg.num_samples, objective=cfg.objective,
                                   beta=beta, generator=self.noise, row_offset=start)
        # -mean over the global batch; DDP averages gradients over processes, hence * world size.
        loss = -out.elbo.sum() * (self.world.size / global_size)
        where = f"epoch {epoch}, step {self.step + 1}"
        self._check_finite(loss, out, where)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        with torch.no_grad():
            return torch.stack([out.elbo.sum(), out.rec.mean(0).sum(), out.kl.sum()]), x.shape[0]

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        cfg = self.config
        generator = self._epoch_generator(epoch)
        images, labels = self.train_set.images, self.train_set.labels
        num_batches = max(1, math.ceil(len(images) / cfg.batch_size))
        sums, seen = torch.zeros(3, dtype=torch.float64), 0  # elbo, rec, kl; examples (this process's shard)
        bar = tqdm(data_lib.batches(images, labels, cfg.batch_size, shuffle=True, generator=generator),
                   total=num_batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, mininterval=0.5,
                   disable=not self.world.is_main)
        for i, (x, y) in enumerate(bar):
            beta = self._beta(epoch - 1 + i / num_batches)
            step_sums, count = self.train_step(x, y, epoch=epoch, beta=beta, generator=generator)
            sums += step_sums.to("cpu", torch.float64)
            seen += count
            if i % 20 == 0 and self.world.is_main:  # the running ELBO, without a sync every step
                bar.set_postfix(elbo=f"{sums[0].item() / max(seen, 1):.2f}")
        bar.close()
        elbo, rec, kl, seen = self.world.all_sum([*sums.tolist(), float(seen)])
        return {"train_elbo": elbo / max(seen, 1), "train_rec": rec / max(seen, 1), "train_kl": kl / max(seen, 1)}

    def validate(self, epoch: int) -> dict:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        mode = self.config.binarize_mode
        generator = self._epoch_generator(epoch, salt=1)
        with self._precision():
            results = evaluate(self.model, self.val_set.images, self.val_set.labels, self.val_set.num_classes,
                               binarize=lambda x: data_lib.binarize(x, mode, generator=generator),
                               generator=generator)
        return {"val_elbo": results["elbo"], "val_rec": results["rec"], "val_kl": results["kl"]}

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
        history = []
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
            self._check_gradients(f"epoch {epoch}, step {self.step}")  # never checkpoint a bad update
            self.epoch = epoch
            if self.world.is_main:  # one writer: checkpoint and metrics exist once
                save_checkpoint(self.checkpoint_path, self.state())
                append_metrics(self.metrics_path, row)
                self._notify("on_epoch_end", row)
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            self.world.barrier()
            history.append(row)
            out_of_time = self.config.max_minutes and time.perf_counter() - started > 60 * self.config.max_minutes
            if self.world.all_sum([1.0 if out_of_time else 0.0])[0] > 0:  # all processes stop together
                if self.world.is_main:
                    tqdm.write(f"time budget of {self.config.max_minutes} minutes reached after epoch {epoch}")
                break
        return history


def split_validation(dataset, fraction: float):
    """The last `fraction` of the training set (deterministic) becomes the validation set."""
    count = int(len(dataset) * fraction)
    if count == 0:
        return dataset, None
    cut = len(dataset) - count

    def part(sl):
        labels = dataset.labels[sl] if dataset.labels is not None else None
        return data_lib.ImageDataset(dataset.images[sl], labels, dataset.num_classes, dataset.name)

    return part(slice(0, cut)), part(slice(cut, None))


# What a resumed run takes from the new configuration; everything else comes from its checkpoint.
RESUMABLE_FIELDS = ("epochs", "out_dir", "max_minutes", "tensorboard")


def resumed_config(config: TrainConfig) -> TrainConfig:
    """The configuration of the run in config.out_dir, with only RESUMABLE_FIELDS taken from `config`."""
    saved = load_checkpoint(Path(config.out_dir) / CHECKPOINT_NAME)["train_config"]
    return TrainConfig.from_dict({**saved, **{name: getattr(config, name) for name in RESUMABLE_FIELDS}})


def train(config: TrainConfig, resume: bool = False, callbacks: Sequence[Callback] = ()) -> tuple[Trainer, list[dict]]:
    """Load the data, train (or resume), and write the pictures next to the checkpoint.

    Resuming takes the run's configuration from its checkpoint; only RESUMABLE_FIELDS (`epochs`
    to extend a run, `max_minutes`, `tensorboard`) come from `config`. `config.tensorboard` adds a
    TensorBoardLogger writing to <out_dir>/tensorboard to `callbacks`.
    """
    if resume:
        config = resumed_config(config)
    config.validate()
    full = data_lib.load_dataset(config.data, "train")
    train_set, val_set = split_validation(full, config.val_fraction)
    trainer = Trainer(config, train_set, val_set, callbacks=callbacks)
    if config.tensorboard and trainer.world.is_main:
        trainer.callbacks.append(TensorBoardLogger(trainer.out_dir / "tensorboard"))
    try:
        history = trainer.fit(resume=resume)
        trainer.model.eval()
        if trainer.world.is_main:
            trainer.write_pictures(val_set or train_set)
    finally:
        trainer.close_callbacks()
    return trainer, history
