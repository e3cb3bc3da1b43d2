"""Data-parallel training on torch.distributed: torchrun launches, DDP synchronizes.

`torchrun --nproc_per_node=N -m fastvae train ...` (or `fastvae train --nproc N`, which
runs exactly that) starts N processes; each takes a contiguous shard of every global
minibatch and passes its first row's global index to the latent op, so its noise is
its part of the global batch's noise, and the run matches a single-process run on the
same global batch to float rounding. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of `count` rows (sizes differ by at most 1)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_from_environment(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group, if this process joined one; call it once the DDP model is gone.

    Without it gloo's threads still hold work objects when the interpreter exits, and a rank
    can die in that race with "terminate called without an active exception" (SIGABRT) after
    its work is done, which fails the whole torchrun. wait_for_peers: a barrier first, so no
    rank tears its connections down while another still uses them (rank 0 writes the
    pictures after training); False on the error path, where a peer may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # a DDP wrapper in a reference cycle would otherwise outlive its process group
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device="cpu"):
    """Own the process group for one `with` block: join it on entry, leave it on exit; yields the World.

    A single process (no torchrun) joins nothing and leaves nothing. Everything that holds the
    DDP model (the Trainer) must be gone when the block ends, so create it in a function called
    inside the block rather than in the block itself: gloo's work objects must be freed before
    the group is destroyed (see shutdown). On an exception the group is left without the
    barrier, since a failed peer may never arrive there.
    """
    world = init_from_environment(torch.device(device))
    try:
        yield world
    except BaseException:
        shutdown(wait_for_peers=False)
        raise
    shutdown()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `fastvae <argv>` under torchrun with `nproc` processes on this machine."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastvae", *argv]
    return subprocess.call(command)
