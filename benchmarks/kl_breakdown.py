"""Where the forward+backward time of gaussian_kl with a prior goes, fused against eager.

    python benchmarks/kl_breakdown.py [--batch 4096] [--dim 256] [--threads N] [--budget 1.0]

Rows (float32, all four operands (batch, dim) leaves that require grad):
  forward               the op under no_grad
  backward alone        torch.autograd.grad of a kept graph (fused only: eager's backward
                        is many nodes, not one op)
  fwd+bwd, .grad None   fastvae.bench.run_mode's forward+backward, which the pytest-benchmark
                        group times: the leaves' .grad set to None before each call, as
                        zero_grad() leaves them in a training step
  fwd+bwd, accumulated  each call's gradients added into the last call's .grad (run_mode's
                        definition before 2026-12-04), for the record: the read-modify-write of
                        four (batch, dim) tensors both providers then paid
Each cell: the providers alternate three times within the row, each time the median of batches
of calls (fastvae.bench), and the fastest of the three is kept; the CPU is named.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from priors_memory import PRIOR_KL, gaussian_inputs  # noqa: E402
from train_compare import cpu_description  # noqa: E402

from fastvae.bench import _median_seconds, run_mode  # noqa: E402


def accumulated(fn, inputs):
    ones = torch.ones(inputs[0].shape[0])
    return lambda: fn(*inputs).backward(ones)


def backward_alone(fn, inputs):
    out = fn(*inputs)
    ones = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, inputs, ones, retain_graph=True)


def steps(provider: str, batch: int, dim: int) -> dict:
    fn = PRIOR_KL[provider]
    rows = {
        "forward": run_mode(fn, gaussian_inputs(batch, dim, 4), "forward"),
        "fwd+bwd, .grad None": run_mode(fn, gaussian_inputs(batch, dim, 4), "forward+backward"),
        "fwd+bwd, accumulated": accumulated(fn, gaussian_inputs(batch, dim, 4)),
    }
    if provider == "fastvae":
        rows["backward alone"] = backward_alone(fn, gaussian_inputs(batch, dim, 4))
    return rows


def measure(batch: int, dim: int, budget: float, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Seconds per row and provider: the providers alternate within each row, `rounds` times, and
    each cell keeps its fastest round (as fastvae.bench.compare does)."""
    by_provider = {p: steps(p, batch, dim) for p in PRIOR_KL}
    times: dict[str, dict[str, float]] = {}
    for row in by_provider["fastvae"]:
        runs = {p: s[row] for p, s in by_provider.items() if row in s}
        samples = {p: [] for p in runs}
        for _ in range(rounds):
            for p, step in runs.items():
                samples[p].append(_median_seconds(step, budget / rounds))
        times[row] = {p: min(t) for p, t in samples.items()}
    return times


def table(times: dict[str, dict[str, float]]) -> str:
    lines = ["| | fastvae | eager | eager / fastvae |", "|---|---:|---:|---:|"]
    for row, t in times.items():
        eager = t.get("eager")
        ratio = f"{eager / t['fastvae']:.2f}x" if eager else ""
        eager_ms = f"{eager * 1e3:.3f} ms" if eager else ""
        lines.append(f"| {row} | {t['fastvae'] * 1e3:.3f} ms | {eager_ms} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="rows")
    parser.add_argument("--dim", type=int, default=256, help="latent dimensions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's own choice)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per cell")
    args = parser.parse_args(argv)
    for name in ("batch", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    times = measure(args.batch, args.dim, args.budget)
    print(f"CPU: {cpu_description()}; gaussian_kl with a prior, ({args.batch}, {args.dim}) float32, "
          f"{args.budget} s per cell")
    print(table(times))


if __name__ == "__main__":
    main()
