"""Backend selection: the compiled extension, or the pure-PyTorch fallback with one warning."""

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
    assert "pip install --no-build-isolation" in message


def test_backend_is_reported():
    assert fastvae.backend() in ("cpp", "reference")


@pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
def test_fallback_draws_the_same_noise_as_the_extension():
    import torch

    from fastvae import reference

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
