"""Hooks into a training run, for experiment trackers.

The trainer calls them on the process that writes the run's files (rank 0 under torchrun):

    on_validation(epoch, metrics)      after each epoch's validation: {"val_elbo": ..., "val_rec": ..., "val_kl": ...}
    on_epoch_end(row)                  after each epoch, with the row just appended to metrics.csv
    on_picture_written(name, path)     after each picture of the run (samples, reconstructions, loss, ...)
    close()                            once, when the run is over (also after a failure)

Subclass Callback and override what you need; pass instances to Trainer(callbacks=...) or
fastvae.training.trainer.train(callbacks=...). `fastvae train --tensorboard` adds a TensorBoardLogger.
"""

from __future__ import annotations

from pathlib import Path


class Callback:
    """Does nothing; override the hooks you need."""

    def on_validation(self, epoch: int, metrics: dict) -> None:
        pass

    def on_epoch_end(self, row: dict) -> None:
        pass

    def on_picture_written(self, name: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


# metrics.csv columns that are neither a train_ nor a val_ term, and their TensorBoard group.
OTHER_TAGS = {"seconds": "speed/seconds", "examples_per_second": "speed/examples_per_second", "lr": "train/lr"}


def scalar_tag(column: str) -> str:
    """metrics.csv column -> TensorBoard tag, grouped by split: train_elbo -> train/elbo, lr -> train/lr."""
    split, _, term = column.partition("_")
    if split in ("train", "val") and term:
        return f"{split}/{term}"
    return OTHER_TAGS.get(column, f"other/{column}")


class TensorBoardLogger(Callback):
    """Scalars of every epoch and the run's pictures, as TensorBoard event files in `log_dir`.

    Tags: train/elbo, train/rec, train/kl, train/lr, val/elbo, val/rec, val/kl, speed/seconds,
    speed/examples_per_second (and train/bpd, val/bpd for 8-bit image likelihoods); pictures under pictures/<name> (pictures/samples, ...).
    """

    def __init__(self, log_dir, fresh: bool = False):
        """fresh: a new run in log_dir; the event files an earlier run left there are deleted first,
        so TensorBoard does not draw two runs' curves as one. A resumed run (fresh=False) appends."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install 'fastvae[tensorboard]' "
                              "(or pip install tensorboard)") from None
        self.log_dir = Path(log_dir)
        if fresh:
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.epoch = 0

    def on_validation(self, epoch: int, metrics: dict) -> None:
        for column, value in metrics.items():
            self.writer.add_scalar(scalar_tag(column), value, epoch)

    def on_epoch_end(self, row: dict) -> None:
        self.epoch = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch" and not column.startswith("val_"):  # validation came in on_validation
                self.writer.add_scalar(scalar_tag(column), value, self.epoch)

    def on_picture_written(self, name: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(f"pictures/{name}", pixels, self.epoch, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
