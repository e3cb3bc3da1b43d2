#!/usr/bin/env bash
# The whole GPU check of fastvae in one call, for a machine with one NVIDIA GPU, nvcc, a
# preinstalled CUDA build of torch (2.11 or newer) and no network. In about 10 minutes it
# builds the extension in place against that torch, runs the CUDA tests, times the CUDA ops
# and the MNIST training step (benchmarks/gpu/check.py), and writes one markdown table.
#
#   bash benchmarks/gpu/run.sh --prepare MNIST_DIR   # before: copy the MNIST IDX files into
#                                                    # benchmarks/gpu/data/mnist (git-ignored),
#                                                    # which then travels with the working tree
#   bash benchmarks/gpu/run.sh                       # on the GPU machine
#   bash benchmarks/gpu/run.sh --dry-run             # anywhere: check.py on the CPU, tiny sizes
#
# Stages are time-boxed (build 270 s, tests 150 s, the rest what is left of 570 s), so one
# call of the device tool (600 s at most) always comes back with the table.
#
# Environment: PYTHON (the interpreter with torch; default python3, else python); OUT (a
# folder: the table is also written to $OUT/gpu_check.md, the logs beside it); FASTVAE_GPU_DATA
# (the MNIST folder, default benchmarks/gpu/data/mnist); TORCH_CUDA_ARCH_LIST (default: the
# GPU's own); FASTVAE_GPU_COMPILE=0 leaves torch.compile out of the op benchmarks.
# Exit status: 0 when every stage ran (the table says which floors were met), 2 without a
# GPU, 1 when a stage failed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="${FASTVAE_GPU_DATA:-$HERE/data/mnist}"
MNIST_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

say() { printf '\n=== gpu check: %s (%s) ===\n' "$*" "$(date -u +%H:%M:%S)"; }
die() { echo "run.sh: $*" >&2; exit 1; }

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  die "no python with torch found (set PYTHON)"
}

prepare() {
  local source="$1"
  [ -d "$source" ] || die "--prepare: $source is not a folder"
  mkdir -p "$DATA"
  for f in "${MNIST_FILES[@]}"; do
    [ -f "$source/$f" ] || die "--prepare: $source has no $f"
    cp "$source/$f" "$DATA/$f"
  done
  echo "run.sh: copied MNIST into $DATA ($(du -sh "$DATA" | cut -f1)); it travels with the working tree when"
  echo "        the device tool's carry names benchmarks/gpu/data"
}

case "${1:-}" in
  --prepare)
    [ $# -eq 2 ] || die "usage: run.sh --prepare MNIST_DIR"
    prepare "$2"
    exit 0
    ;;
  --dry-run)
    PY="$(pick_python)"
    cd "$REPO"
    data_arg=()
    [ -d "$DATA" ] && data_arg=(--data "$DATA")
    exec "$PY" "$HERE/check.py" --device cpu --tiny "${data_arg[@]}" ${OUT:+--out "$OUT/gpu_check.md"}
    ;;
  "") ;;
  *) die "unknown argument $1 (expected --prepare MNIST_DIR, --dry-run, or nothing)" ;;
esac

# 0. A GPU, or stop at once: no nvidia-smi and no device node means no NVIDIA GPU here.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  echo "run.sh: no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia*): this check needs one; stopping." >&2
  echo "run.sh: (bash benchmarks/gpu/run.sh --dry-run runs its python parts on the CPU)" >&2
  exit 2
fi
PY="$(pick_python)"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)'; then
  echo "run.sh: torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA GPU; stopping." >&2
  exit 2
fi
cd "$REPO"
LOGS="${OUT:-$REPO/benchmarks/gpu}"
mkdir -p "$LOGS"
start=$(date +%s)
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")'
[ -d "$DATA" ] || echo "run.sh: no MNIST at $DATA (run --prepare first); training uses random images"

# 1. Build in place against this torch, for this GPU's architecture.
say "build"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# pip's CUDA torch keeps some CUDA headers in nvidia/cu*/include (see .ci/cuda_build.sh).
for inc in $("$PY" -c 'import glob, sysconfig; print(" ".join(glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/cu*/include")))'); do
  export CPATH="$inc${CPATH:+:$CPATH}"
done
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"$PY" -c 'import ninja' 2>/dev/null || command -v ninja >/dev/null 2>&1 ||
  echo "run.sh: no ninja: the build compiles one file at a time (slower)"
rm -f fastvae/_C*.so
FASTVAE_CUDA=1 timeout 270 "$PY" setup.py build_ext --inplace >"$LOGS/gpu_build.log" 2>&1 || {
  tail -n 60 "$LOGS/gpu_build.log" >&2
  die "the CUDA build failed (log: $LOGS/gpu_build.log)"
}
"$PY" -c 'import fastvae, sys; sys.exit(0 if fastvae.cuda_kernels_built() else 1)' || die "built, but without CUDA kernels"
echo "built in $(( $(date +%s) - start )) s"

# 2. The CUDA tests: every test family's "cuda" cases (tests/devices.py) and the CUDA-only tests.
say "CUDA tests"
summary="$LOGS/gpu_tests_summary.txt"
if "$PY" -c 'import pytest' 2>/dev/null; then
  set +e
  timeout 150 "$PY" -m pytest tests -k cuda -q -p no:cacheprovider -rfE >"$LOGS/gpu_tests.log" 2>&1
  tests_status=$?
  set -e
  tail -n 25 "$LOGS/gpu_tests.log"
  line="$(grep -E '(passed|failed|error)' "$LOGS/gpu_tests.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"
  [ "$tests_status" -eq 124 ] && line="timed out after 150 s: ${line:-no summary}"
  echo "CUDA tests (pytest tests -k cuda): ${line:-no summary, exit $tests_status}" >"$summary"
else
  tests_status=1
  echo "CUDA tests: failed to run, pytest is not installed for $PY" | tee "$summary"
fi

# 3. Op benchmarks, MNIST training, the table.
say "benchmarks and training"
data_arg=()
[ -d "$DATA" ] && data_arg=(--data "$DATA")
# What is left of the 10 minutes (at least 2), less a margin for writing the table.
left=$(( 570 - ($(date +%s) - start) ))
[ "$left" -ge 120 ] || left=120
timeout "$left" "$PY" "$HERE/check.py" --device cuda "${data_arg[@]}" --tests-summary "$summary" \
  --budget $(( left - 60 )) --out "$LOGS/gpu_check.md" || die "check.py failed"
echo "run.sh: done in $(( $(date +%s) - start )) s; table in $LOGS/gpu_check.md"
[ "$tests_status" -eq 0 ] || exit 1
