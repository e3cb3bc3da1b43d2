#!/usr/bin/env bash
# Builds fastvae with its CUDA sources against a CUDA build of torch, on a machine
# that may have no GPU, then imports it (docs/DESIGN.md section 7). Any compile or link
# error fails the script.
#
#   bash .ci/cuda_build.sh [VENV]     (default VENV: /tmp/fastvae-cuda-venv)
#
# The venv is reused when it already holds torch 2.14.1 (a CUDA 13.0 build, about
# 5.5 GB). The package is built from a fresh copy of the working tree, so the
# repository's in-place CPU build (build/, fastvae/_C*.so) is neither reused nor
# overwritten. TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100/H200) and may be overridden.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/fastvae-cuda-venv}"
TORCH_VERSION="2.14.1"
PY="$VENV/bin/python"

step() { printf '\n--- cuda_build: %s ---\n' "$*"; }

# 1. The venv with a CUDA build of torch.
if [ ! -x "$PY" ]; then
  step "creating venv $VENV"
  python3 -m venv "$VENV"
fi
have_torch="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have_torch" != "$TORCH_VERSION" ]; then
  step "installing torch==$TORCH_VERSION numpy ninja pytest into $VENV"
  "$VENV/bin/pip" install "torch==$TORCH_VERSION" numpy ninja pytest
elif ! "$PY" -c 'import numpy, ninja, pytest' 2>/dev/null; then
  step "installing numpy ninja pytest into $VENV"
  "$VENV/bin/pip" install numpy ninja pytest
else
  step "reusing $VENV (torch $have_torch)"
fi
if ! "$PY" -c 'import setuptools, wheel' 2>/dev/null; then
  "$VENV/bin/pip" install setuptools wheel
fi
torch_cuda="$("$PY" -c 'import torch; print(torch.version.cuda)')"
if [ "$torch_cuda" = "None" ]; then
  echo "cuda_build: torch in $VENV is a CPU-only build; a CUDA build is needed" >&2
  exit 1
fi
site_packages="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 2. The build environment (see docs/DESIGN.md section 7 for why each is needed).
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CPATH="$site_packages/nvidia/cu13/include${CPATH:+:$CPATH}"
export FASTVAE_CUDA=1
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi

# 3. A clean copy of the sources: tracked and untracked-but-not-ignored files, so no
#    stale build/ directory or in-place _C*.so comes along.
SRC="$(mktemp -d /tmp/fastvae-cuda-src.XXXXXX)"
trap 'rm -rf "$SRC"' EXIT
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
  done | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
  tar -C "$REPO" --exclude=./build --exclude=./.venv --exclude='*.so' --exclude=.git -cf - . | tar -xf - -C "$SRC"
fi
rm -rf "$SRC/build" "$SRC"/*.egg-info
find "$SRC/fastvae" -name '_C*.so' -delete

# 4. Build and install (not editable) into the venv.
step "building with CUDA (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $(nproc) cores)"
start=$(date +%s)
"$VENV/bin/pip" install --no-build-isolation --no-deps --force-reinstall --no-cache-dir -v "$SRC" \
  >"$SRC.log" 2>&1 || {
  tail -n 150 "$SRC.log" >&2
  echo "cuda_build: the CUDA build failed (full log: $SRC.log)" >&2
  exit 1
}
grep -E "fastvae setup.py:" "$SRC.log" || true
echo "cuda_build: build + install took $(( $(date +%s) - start )) s (log: $SRC.log)"

# 5. Import it from outside the repository, check the CUDA kernels are registered,
#    and show that the CUDA build also serves the CPU ops.
step "import check"
cd /tmp
"$PY" - <<'EOF'
import os
import sys

import torch

import fastvae
from fastvae import reference

print(f"fastvae from {os.path.dirname(fastvae.__file__)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}")
assert "site-packages" in fastvae.__file__, f"imported the wrong fastvae: {fastvae.__file__}"
assert fastvae.backend() == "cpp", f"backend is {fastvae.backend()!r}, expected 'cpp'"
assert fastvae.cuda_kernels_built(), "fastvae::latent_terms has no CUDA kernel"
for op in ("latent_terms", "latent_terms_backward", "bernoulli_log_prob", "bernoulli_log_prob_backward",
           "gaussian_log_prob", "gaussian_log_prob_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", key), (op, key)

# CPU smoke: the CUDA build still serves CPU tensors, with the CPU numbers.
torch.manual_seed(0)
mu = torch.randn(16, 33, dtype=torch.float64, requires_grad=True)
logvar = (0.5 * torch.randn(16, 33, dtype=torch.float64)).requires_grad_()
out = fastvae.latent_terms(mu, logvar, 3, seed=123, offset=7)
ref = reference.latent_terms(mu, logvar, None, 3, 123, 7)
for got, want in zip(out, ref):
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-5)
(out.z.sum() + out.kl.sum() + out.log_q.sum() + out.log_p.sum()).backward()
assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
logits, x = torch.randn(2, 4, 10, dtype=torch.float64), torch.rand(4, 10, dtype=torch.float64).round()
torch.testing.assert_close(fastvae.bernoulli_log_likelihood(logits, x), reference.bernoulli_log_prob(logits, x))
torch.testing.assert_close(fastvae.gaussian_log_likelihood(logits, x, -1.0),
                           reference.gaussian_log_prob(logits, x, None, -1.0))
print("cuda_build: OK (CUDA kernels registered for all six ops; CPU ops serve from the same build)")
EOF
