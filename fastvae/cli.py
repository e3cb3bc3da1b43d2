"""The `fastvae` command line. Each subcommand is one small function; `main` dispatches.

Bad arguments give a one-line error and exit status 2 (argparse's convention); errors
the library raises on bad input (files, shapes, values) give one line and status 1.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def cmd_info(args) -> int:
    from . import __version__, ops

    print(f"fastvae {__version__}")
    print(f"backend: {ops.backend()} (CUDA kernels built: {ops.cuda_kernels_built()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; GPU available: {torch.cuda.is_available()})")
    print(f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"python {platform.python_version()}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    print(f"fastvae bench: fused ops vs eager PyTorch, forward+backward, float32, {torch.get_num_threads()} threads")
    print(bench.format_rows(bench.run(budget_per_case=args.seconds)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Variational autoencoders on fused C++/CUDA ops.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="version, active backend and build configuration")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="time the fused ops against eager PyTorch on this machine (< 1 minute)")
    bench.add_argument("--seconds", type=float, default=1.5, help="time budget per case (default 1.5)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"fastvae {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
