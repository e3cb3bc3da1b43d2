"""The CPU level switch (FASTVAE_CPU_LEVEL): every level the CPU runs gives the same numbers.

The float32 CPU loops are compiled for AVX-512, AVX2 and the baseline ISA
(csrc/cpu/cpu_level.h), and the AVX2 and AVX-512 noise generators are separate
intrinsics code (csrc/cpu/noise.cpp). The level is fixed when the process first
runs a kernel, so each level runs in its own subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvae
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
pytestmark = requires_cpp

LEVELS = ["avx512", "avx2", "baseline"]

# Noise, values and gradients of both ops in float32 at shapes whose Philox spans start
# mid-block, cross rows and samples, and leave partial vector groups.
PROBE = textwrap.dedent(
    """
    import sys, torch, fastvae
    from fastvae import _C
    torch.manual_seed(0)
    out = {"level": _C.cpu_level()}
    for batch, dim, row_offset in [(3, 37, 0), (301, 24, 5), (2, 1500, 1), (128, 32, 0)]:
        mu = torch.randn(batch, dim, requires_grad=True)
        logvar = (0.5 * torch.randn(batch, dim)).requires_grad_()
        terms = fastvae.latent_terms(mu, logvar, 3, seed=2**40 + 3, offset=5, row_offset=row_offset)
        torch.autograd.backward(terms, [torch.randn_like(t) for t in terms])
        out[f"latent {batch}x{dim}"] = [*terms, mu.grad, logvar.grad]
    zeros = torch.zeros(301, 24)
    out["noise"] = [fastvae.latent_terms(zeros, zeros, 3, seed=2**40 + 3, offset=5, row_offset=5).z]
    logits = torch.randn(5, 16, 300, requires_grad=True)
    x = torch.rand(16, 300).round()
    ll = fastvae.bernoulli_log_likelihood(logits, x)
    ll.backward(torch.randn_like(ll))
    out["bernoulli"] = [ll, logits.grad]
    probs = torch.rand(40, 3, 13, 21)  # 819 pixels a row: two Philox spans, the second ending mid-block
    out["binarize"] = [fastvae.ops.gather_bernoulli(probs, torch.tensor([39, 0, 5, 5]), seed=2**40 + 3), probs]
    # Sparse linear: widths that leave partial vectors (193: the padding spans two AVX2 vectors)
    # and partial 8 x 8 transposition tiles.
    x = (torch.rand(13, 37) < 0.2) * torch.randn(13, 37)
    for width in (21, 193):
        weight, bias = torch.randn(width, 37, requires_grad=True), torch.randn(width, requires_grad=True)
        y = fastvae.sparse_input_linear(x, weight, bias)
        y.backward(torch.randn_like(y))
        out[f"sparse linear {width}"] = [y, weight.grad, bias.grad, torch.nn.functional.linear(x, weight, bias)]
    torch.save(out, sys.argv[1])
    """
)


def run_at_level(level, path, code=PROBE):
    env = {**os.environ, "FASTVAE_CPU_LEVEL": level}
    return subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)


def supported_levels():
    best = fastvae._C.cpu_level() if "FASTVAE_CPU_LEVEL" not in os.environ else None
    if best is None:
        probe = run_at_level("auto", "-", "from fastvae import _C; print(_C.cpu_level())")
        best = probe.stdout.strip()
    return LEVELS[LEVELS.index(best):]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for level in supported_levels():
        path = tmp_path_factory.mktemp(level) / "out.pt"
        proc = run_at_level(level, path)
        assert proc.returncode == 0, proc.stderr
        out[level] = torch.load(path)
        assert out[level]["level"] == level
    return out


def test_cpu_level_names_a_level():
    assert fastvae._C.cpu_level() in LEVELS


def test_avx2_and_avx512_give_identical_bits(results):
    # The latent op's noise, row sums (16 fixed lanes, whatever the vector width) and gradients.
    # (The likelihood's row sums are `omp simd` reductions whose order follows the vector width.)
    if "avx512" not in results:
        pytest.skip("this CPU has no AVX-512")
    for key, tensors in results["avx512"].items():
        if key == "level" or key == "bernoulli":
            continue
        for got, want in zip(results["avx2"][key], tensors):
            assert torch.equal(got, want), key


def test_every_level_draws_the_reference_stream(results):
    batch, dim, row_offset = 301, 24, 5
    n = (row_offset + batch) * dim
    expected = torch.stack([reference.philox_normal(n, 2**40 + 3, 5, sample=l)[row_offset * dim :] for l in range(3)])
    for level, out in results.items():
        torch.testing.assert_close(out["noise"][0], expected.view(3, batch, dim), rtol=1e-5, atol=1e-5, msg=level)


def test_every_level_binarizes_exactly_as_the_reference(results):
    for level, out in results.items():
        got, probs = out["binarize"]
        assert torch.equal(got, reference.gather_bernoulli(probs, torch.tensor([39, 0, 5, 5]), 2**40 + 3)), level


def test_every_level_computes_the_sparse_linear_layer(results):
    for level, out in results.items():
        for width in (21, 193):
            y, _, _, dense = out[f"sparse linear {width}"]
            torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5, msg=f"{level}, width {width}")


def test_levels_agree_within_float_rounding(results):
    # The baseline ISA has no FMA, so its sums and polynomials round differently in the last bits.
    levels = list(results)
    for key, tensors in results[levels[0]].items():
        if key == "level":
            continue
        for level in levels[1:]:
            for got, want in zip(results[level][key], tensors):
                torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"{key} at {level}")


@pytest.mark.parametrize("value", ["avx3", "AVX2 "])
def test_bad_level_is_a_clear_error(value, tmp_path):
    proc = run_at_level(value, tmp_path / "out.pt")
    assert proc.returncode != 0
    assert "FASTVAE_CPU_LEVEL" in proc.stderr and "auto, avx512, avx2 or baseline" in proc.stderr


def test_level_the_cpu_lacks_is_a_clear_error(tmp_path):
    if "avx512" in supported_levels():
        pytest.skip("this CPU runs every level")
    proc = run_at_level("avx512", tmp_path / "out.pt")
    assert proc.returncode != 0 and "supports at most" in proc.stderr
