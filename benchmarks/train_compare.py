"""The whole training step: `fastvae train`'s loop against a plain PyTorch loop doing the same work.

    python benchmarks/train_compare.py --mnist DIR [--rounds 3] [--examples 60000]   (DIR: an MNIST IDX folder)
    python benchmarks/train_compare.py --threads 1 --cpu-time      # on a shared machine

Prints two markdown tables: examples per second of whole epochs (best epoch of each provider,
the providers interleaved round by round in this one process), and where the time of a training
step goes (torch.profiler over one epoch of each: matrix products, optimizer, fastvae's fused ops,
batch gathering and binarization, everything else).

- fastvae: `Trainer.train_epoch`, the loop `fastvae train` runs, with its defaults (the MLP
  784-200-200-50 tanh of Burda et al., SGVB-B with L=1, Adam 1e-3, batches of 100, dynamic
  binarization).
- plain: the loop a user writes from the pytorch/examples VAE: MNIST in memory, minibatches of 100
  shuffled with torch.randperm, torch.bernoulli per batch, the same MLP (plain_vae.py), the
  default torch.optim.Adam, the example's loss, and its `loss.item()` per step.
- plain, Adam(fused=True): the same loop with the one keyword a careful user adds, torch's fused
  Adam kernel (the fair baseline for the trainer, which calls that kernel itself).
- pythae: pythae's VAE with the same encoder and decoder networks and the same loop as plain
  (only when pythae is importable).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_vae import PlainVAE, plain_loss  # noqa: E402

from fastvae.io import data as data_lib  # noqa: E402
from fastvae.training.config import TrainConfig  # noqa: E402
from fastvae.training.trainer import Trainer  # noqa: E402

BATCH = 100
# The MNIST IDX folder the benchmarks read: FASTVAE_MNIST, or --mnist DIR; none by default.
DEFAULT_MNIST = Path(os.environ["FASTVAE_MNIST"]) if os.environ.get("FASTVAE_MNIST") else None


def cpu_description() -> str:
    """CPU model, the widest x86 vector ISA it has, and torch's thread count."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({isa}), {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=1)
def _mnist_train(folder: Path) -> torch.Tensor:
    return data_lib.load_dataset(f"mnist:{folder}", "train").images


def mnist_images(folder: Path, examples: int) -> torch.Tensor:
    return _mnist_train(Path(folder))[:examples]


# ---------------------------------------------------------------------------- providers
# Each returns a function that runs one epoch over `images`.


def fastvae_epoch(images: torch.Tensor, out_dir: str):
    # likelihood named: "auto" would pick the discretized logistic for 8-bit images it is not told are MNIST.
    config = TrainConfig(out_dir=out_dir, latent_dim=50, arch_config={"hidden": [200, 200]}, batch_size=BATCH,
                         likelihood="bernoulli")
    trainer = Trainer(config, data_lib.ImageDataset(images, None, 0, "mnist"))
    epoch = iter(range(1, 1_000_000))
    return lambda: trainer.train_epoch(next(epoch))


def plain_loop_epoch(model, loss_of, images: torch.Tensor, fused_adam: bool = False):
    """The ten-line loop, shared by the plain and pythae providers (fused_adam: the keyword a careful user adds)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None)

    def epoch():
        model.train()
        total = 0.0
        for chosen in torch.randperm(len(images)).split(BATCH):
            x = torch.bernoulli(images[chosen])
            loss = loss_of(model, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total

    return epoch


def plain_epoch(images: torch.Tensor, fused_adam: bool = False):
    torch.manual_seed(0)

    def loss_of(model, x):
        recon, mu, logvar = model(x)
        return plain_loss(recon, x, mu, logvar)

    return plain_loop_epoch(PlainVAE(), loss_of, images, fused_adam)


def pythae_available() -> bool:
    try:
        import pythae.models  # noqa: F401
    except ImportError:
        return False
    return True


def pythae_epoch(images: torch.Tensor):
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from torch import nn

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh())
            self.mu, self.logvar = nn.Linear(200, 50), nn.Linear(200, 50)

        def forward(self, x):
            h = self.body(x.flatten(1))
            return ModelOutput(embedding=self.mu(h), log_covariance=self.logvar(h))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                                      nn.Linear(200, 784))

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.body(z)).reshape(-1, 1, 28, 28))

    torch.manual_seed(0)
    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=50, reconstruction_loss="bce"),
                encoder=Encoder(), decoder=Decoder())
    return plain_loop_epoch(model, lambda m, x: m({"data": x}).loss, images)


def providers(images: torch.Tensor, out_dir: str) -> dict:
    made = {"fastvae": fastvae_epoch(images, out_dir), "plain": plain_epoch(images),
            "plain, Adam(fused=True)": plain_epoch(images, fused_adam=True)}
    if pythae_available():
        made["pythae"] = pythae_epoch(images)
    return made


# ---------------------------------------------------------------------------- examples per second


def best_epochs(epochs: dict, examples: int, rounds: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Examples per second of every epoch, the providers taking turns within each round.

    clock=time.thread_time (--cpu-time, one thread): an epoch's CPU time, which the host's other
    jobs do not stretch the way they stretch its wall time.
    """
    rates = {name: [] for name in epochs}
    for _ in range(rounds):
        for name, run in epochs.items():
            tick = clock()
            run()
            rates[name].append(examples / (clock() - tick))
    return rates


def speed_table(rates: dict[str, list[float]]) -> str:
    fast = max(rates["fastvae"])
    lines = ["| loop | best epoch (examples/s) | all epochs (examples/s) | fastvae train speed-up |",
             "|---|---:|---:|---:|"]
    for name, values in rates.items():
        ratio = "" if name == "fastvae" else f"{fast / max(values):.2f}x"
        lines.append(f"| {name} | {max(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- profile split

CATEGORIES = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
    "batch gather + binarization": ("aten::index", "aten::index_select", "aten::bernoulli_", "aten::uniform_",
                                    "aten::lt", "aten::randperm", "fastvae::gather_bernoulli"),
}


# The fused optimizer kernels fastvae's trainer calls without Optimizer.step (fastvae/training/optim.py).
DIRECT_OPTIMIZER_OPS = ("aten::_fused_adam_", "aten::_fused_adamw_", "aten::_foreach_add_")


def profile_split(run_epoch) -> dict[str, float]:
    """Milliseconds of one epoch per category; the optimizer counts everything under its step, or
    the fused kernels called directly where no Optimizer.step ran (fastvae's trainer)."""
    from torch.profiler import ProfilerActivity, profile

    tick = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_epoch()
    wall = (time.perf_counter() - tick) * 1e3
    split = dict.fromkeys([*CATEGORIES, "optimizer step", "fastvae fused ops"], 0.0)
    events = prof.key_averages()
    direct_optimizer = not any(event.key.startswith("Optimizer.step#") for event in events)
    for event in events:
        if event.key.startswith("Optimizer.step#") or (direct_optimizer and event.key in DIRECT_OPTIMIZER_OPS):
            split["optimizer step"] += (event.cpu_time_total if not direct_optimizer else event.self_cpu_time_total) / 1e3
            continue
        category = next((c for c, names in CATEGORIES.items() if event.key in names), None)
        if category is None and event.key.startswith("fastvae::"):
            category = "fastvae fused ops"
        if category is not None:
            split[category] += event.self_cpu_time_total / 1e3
    split["everything else (elementwise, autograd, Python)"] = wall - sum(split.values())
    split["epoch under the profiler"] = wall
    return split


def split_table(splits: dict[str, dict[str, float]]) -> str:
    names = list(splits)
    lines = ["| share of the epoch | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for category in next(iter(splits.values())):
        cells = []
        for name in names:
            ms, wall = splits[name][category], splits[name]["epoch under the profiler"]
            cells.append(f"{ms:,.0f} ms" + ("" if category.startswith("epoch") else f" ({ms / wall:.0%})"))
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="MNIST IDX folder (default: $FASTVAE_MNIST)")
    parser.add_argument("--examples", type=int, default=60_000, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each loop, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time epochs by the thread's CPU time instead of the wall clock (needs --threads 1)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile split")
    parser.add_argument("--profile-examples", type=int, default=10_000, help="images in the profiled epoch")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time needs --threads 1: the CPU time of one thread misses the work of the others")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mnist is None or not args.mnist.is_dir():
        sys.exit(f"no MNIST folder at {args.mnist} (pass --mnist DIR or set FASTVAE_MNIST)")
    images = mnist_images(args.mnist, args.examples)
    with tempfile.TemporaryDirectory() as out_dir:
        epochs = providers(images, out_dir)
        for run in epochs.values():  # warm-up: first-call allocations and kernel selection
            run()
        rates = best_epochs(epochs, len(images), args.rounds, time.thread_time if args.cpu_time else time.perf_counter)
        print(f"CPU: {cpu_description()}; {len(images)} MNIST images per epoch, batches of {BATCH}, "
              f"{args.rounds} interleaved rounds, timed by {'CPU time' if args.cpu_time else 'wall clock'}\n")
        print(speed_table(rates))
    if not args.no_profile:  # a shorter epoch: the profiler's event list grows with every op
        with tempfile.TemporaryDirectory() as out_dir:
            epochs = providers(images[:args.profile_examples], out_dir)
            for run in epochs.values():
                run()
            splits = {name: profile_split(run) for name, run in epochs.items()}
        print(f"\nWhere an epoch of {min(len(images), args.profile_examples)} images goes (torch.profiler, "
              "self time; the optimizer with everything under its step):\n")
        print(split_table(splits))


if __name__ == "__main__":
    main()
