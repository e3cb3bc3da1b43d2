"""Backend selection: the compiled extension, or the pure-PyTorch fallback with one warning."""

import os
import subprocess
import sys

import pytest

import fastvae

FALLBACK_SCRIPT = """
import sys, warnings
sys.modules["fastvae._C"] = None  # make `from . import _C` fail as if the extension was never built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastvae
    import torch
    out = fastvae.latent_terms(torch.zeros(2, 3), torch.zeros(2, 3), seed=1)
messages = [str(w.message) for w in caught if "fastvae" in str(w.message)]
print(fastvae.backend(), len(messages), messages[0] if messages else "")
"""


def test_missing_extension_falls_back_with_one_clear_warning():
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, check=True)
    backend, count, message = result.stdout.strip().split(" ", 2)
    assert backend == "reference" and count == "1"
    if fastvae.ops.source_tree() is None:
        assert "pip install --no-build-isolation" in message
    else:  # imported from a checkout: the exact command that builds this checkout
        assert f"cd {fastvae.ops.source_tree()} && {sys.executable} setup.py build_ext --inplace" in message


REFUSAL_SCRIPT = """
import sys
sys.modules["fastvae._C"] = None
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1], "-k", "test_backend_is_reported"]))
"""


@pytest.mark.parametrize("suite", ["tests", "benchmarks"])
def test_suites_refuse_to_run_without_the_extension(suite, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "FASTVAE_BACKEND"}
    result = subprocess.run([sys.executable, "-c", REFUSAL_SCRIPT, str(root / suite)], capture_output=True,
                            text=True, cwd=root, env=env, timeout=600)
    assert result.returncode == 4, result.stdout + result.stderr  # pytest's usage error
    assert "C++ extension is not built" in result.stderr and "FASTVAE_BACKEND=reference" in result.stderr
    on_purpose = subprocess.run([sys.executable, "-c", REFUSAL_SCRIPT, str(root / "tests")], capture_output=True,
                                text=True, cwd=root, env={**env, "FASTVAE_BACKEND": "reference"}, timeout=600)
    assert on_purpose.returncode == 0, on_purpose.stdout + on_purpose.stderr


def test_backend_is_reported():
    assert fastvae.backend() in ("cpp", "reference")


@pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
def test_fallback_draws_the_same_noise_as_the_extension():
    import torch

    from fastvae.ops import reference

    mu, logvar = torch.randn(4, 9), torch.randn(4, 9)
    fused = fastvae.latent_terms(mu, logvar, 2, seed=77)
    ref = reference.latent_terms(mu, logvar, None, 2, 77, row_offset=0)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def fused_ops() -> list[str]:
    """Every fastvae op the dispatcher knows (a new op needs no edit here)."""
    import torch

    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fastvae::"))


def test_cuda_kernels_registered_when_built():
    """Runs without a GPU: a CUDA build of the extension must register every op for CUDA."""
    if not fastvae.cuda_kernels_built():
        pytest.skip(f"the installed fastvae extension has no CUDA kernels (backend: {fastvae.backend()})")
    import torch

    ops = fused_ops()
    assert {"latent_terms", "latent_terms_from_generator", "bernoulli_log_prob",
            "discretized_logistic_log_prob_backward"} <= set(ops), ops
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", "CPU"), op
