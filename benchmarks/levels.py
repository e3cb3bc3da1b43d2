"""The latent op's speed at every x86-64 level this CPU runs, in one run: the AVX2 code measured
on an AVX-512 machine too.

    python benchmarks/levels.py                      # default threads, wall clock
    python benchmarks/levels.py --threads 1 --cpu-time

One subprocess per level (FASTVAE_CPU_LEVEL=avx512 / avx2 / baseline; the level is fixed per
process), each timing `fastvae bench`'s latent cases: forward+backward against the eager formulas,
and the forward with in-kernel noise against Tensor.normal_ on as many elements. The subprocess
also sets torch's own ATEN_CPU_CAPABILITY to the same level (avx512, avx2, default), so that the
eager side runs torch's kernels for that ISA too, as on a machine that has no more. With
--rounds N the levels run N times in turn and each ratio is the median over the rounds. Prints a
markdown table whose every row names the CPU and both libraries' kernel levels.

--cpu-time (with --threads 1) times each step by the CPU time of its thread instead of the wall
clock: on a machine shared with other jobs, wall times of multi-threaded steps measure the
scheduler more than the code (a 60 us step with two OpenMP threads can take 20 ms when one of
them is preempted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

LEVELS = ["avx512", "avx2", "baseline"]
ATEN_LEVEL = {"avx512": "avx512", "avx2": "avx2", "baseline": "default"}  # torch's ATEN_CPU_CAPABILITY names

CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from fastvae import bench
clock = time.thread_time if {cpu_time} else time.perf_counter
rows = bench.run({seconds}, clock=clock, latent_only=True)
from fastvae import _C
print(json.dumps({{"machine": bench.machine_description(), "cpu": bench.cpu_model(), "level": _C.cpu_level(),
                  "aten": torch.backends.cpu.get_cpu_capability(), "rows": rows}}))
"""


def run_level(level: str, threads: int, seconds: float, cpu_time: bool) -> dict | None:
    code = CHILD.format(threads=threads, seconds=seconds, cpu_time=cpu_time)
    env = {**os.environ, "FASTVAE_CPU_LEVEL": level, "ATEN_CPU_CAPABILITY": ATEN_LEVEL[level]}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        if "supports at most" in proc.stderr:
            return None  # this CPU cannot run the level
        sys.exit(f"levels.py: the {level} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seconds", type=float, default=1.5, help="time budget per case and level")
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time")
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated levels to run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every level, in turn; ratios are medians")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures one thread: use it with --threads 1")
    threads = args.threads or __import__("torch").get_num_threads()
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"{threads} thread(s), {clock}; ratio = other / fastvae (>= 4 and >= 5 are the fwd+bwd floors at "
          "(128, 32) and (4096, 256); >= 2 is the normal_ floor)\n")
    levels = args.levels.split(",")
    runs = {level: [] for level in levels}
    for _ in range(args.rounds):
        for level in levels:
            runs[level].append(run_level(level, threads, args.seconds, args.cpu_time))
    for level, results in runs.items():
        print(f"- {level}: " + (results[0]["machine"] if results[0] else "not supported by this CPU"))
    print(f"\n| CPU | fastvae kernels | case | fastvae (us) | other (us) | ratio (median of {args.rounds}) |")
    print("|---|---|---|---:|---:|---:|")
    for level, results in runs.items():
        if results[0] is None:
            continue
        first = results[0]
        for i, (name, _, _) in enumerate(first["rows"]):
            fused = statistics.median(r["rows"][i][1] for r in results)
            other = statistics.median(r["rows"][i][2] for r in results)
            ratio = statistics.median(r["rows"][i][2] / r["rows"][i][1] for r in results)
            print(f"| {first['cpu']} | {first['level']} (ATen {first['aten']}) | {name} | {fused * 1e6:.1f} | "
                  f"{other * 1e6:.1f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
