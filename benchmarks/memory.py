"""Memory: bytes saved for backward by each latent provider, and peak resident memory of a training step.

    python benchmarks/memory.py            # prints both tables (markdown)

Saved bytes are counted with torch.autograd.graph.saved_tensors_hooks (each storage once).
Peak RSS is ru_maxrss of a fresh process that builds the model and runs 20 training steps,
so every provider pays the same interpreter and torch baseline.
"""

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from providers import LATENT  # noqa: E402

SIZES = [(128, 32), (4096, 256)]


def saved_bytes(fn, *inputs) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def saved_table(samples=(None, 5)) -> list[tuple[str, str, int]]:
    rows = []
    for batch, dim in SIZES:
        for num_samples in samples:
            mu = torch.randn(batch, dim, requires_grad=True)
            logvar = torch.randn(batch, dim, requires_grad=True)
            for name in ("fastvae", "eager", "distributions"):
                size = f"B={batch} D={dim} L={num_samples or 1}"
                rows.append((size, name, saved_bytes(LATENT[name], mu, logvar, num_samples)))
    return rows


PEAK_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {bench!r})
import test_bench_train as t
step = t.fastvae_step(__import__("pathlib").Path({tmp!r})) if {provider!r} == "fastvae" else t.plain_step()
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(provider: str, tmp: str) -> int:
    script = PEAK_SCRIPT.format(bench=str(Path(__file__).parent), tmp=tmp, provider=provider)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    import tempfile

    print("| latent op size | provider | saved for backward (KiB) |\n|---|---|---:|")
    for size, name, nbytes in saved_table():
        print(f"| {size} | {name} | {nbytes / 1024:.1f} |")
    print("\n| training step (MLP 784-200-200-50, B=100) | peak RSS (MiB) |\n|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for provider in ("fastvae", "plain"):
            print(f"| {provider} | {peak_rss(provider, tmp) / 2**20:.1f} |")


if __name__ == "__main__":
    main()
