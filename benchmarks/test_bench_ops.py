"""Op-level benchmarks: fastvae's fused ops against eager, torch.compile and torch.distributions.

Run (see benchmarks/README.md):
    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json=benchmarks/results.json
    python benchmarks/report.py benchmarks/results.json

Each group compares providers on one (op, mode, size); `extra_info["bytes"]` is the
traffic the op cannot avoid (inputs read once, outputs written once), from which
report.py derives GB/s beside a plain torch.add on the same run.
"""

import pytest
import torch

from providers import BERNOULLI, FLOAT_BYTES, LATENT, NOISE_SIZES, bernoulli_bytes, latent_bytes, normal_fill, run_mode

LATENT_SIZES = [(128, 32), (512, 64), (4096, 256)]
SAMPLES = [None, 5]
MODES = ["forward", "forward+backward"]


@pytest.mark.parametrize("samples", SAMPLES, ids=lambda s: f"L={s or 1}")
@pytest.mark.parametrize("size", LATENT_SIZES, ids=lambda s: f"B={s[0]},D={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(LATENT))
def test_latent(benchmark, provider, mode, size, samples):
    batch, dim = size
    torch.manual_seed(0)
    mu = torch.randn(batch, dim, requires_grad=mode != "forward")
    logvar = (0.1 * torch.randn(batch, dim)).requires_grad_(mode != "forward")
    fn = LATENT[provider]
    benchmark.group = f"latent {mode} B={batch} D={dim} L={samples or 1}"
    benchmark.extra_info["bytes"] = latent_bytes(batch, dim, samples, mode)
    benchmark(run_mode(lambda m, lv: fn(m, lv, samples), (mu, logvar), mode))


@pytest.mark.parametrize("size", [(4096, 256)], ids=lambda s: f"B={s[0]},D={s[1]}")
def test_latent_forward_eps_given(benchmark, size):
    """The fused forward reading caller-supplied eps instead of drawing it: the memory-bound case."""
    import fastvae

    batch, dim = size
    mu, logvar, eps = torch.randn(batch, dim), torch.randn(batch, dim), torch.randn(batch, dim)
    benchmark.group = f"latent forward B={batch} D={dim} L=1"
    benchmark.extra_info["bytes"] = 4 * batch * dim * FLOAT_BYTES  # mu, logvar, eps in; z out
    benchmark(lambda: fastvae.latent_terms(mu, logvar, eps=eps))


@pytest.mark.parametrize("size", NOISE_SIZES, ids=lambda s: f"B={s[0]},D={s[1]}")
@pytest.mark.parametrize("provider", ["fastvae", "normal_"])
def test_latent_forward_vs_normal(benchmark, provider, size):
    """The fused forward (noise drawn in the kernel) against Tensor.normal_ filling as many elements."""
    batch, dim = size
    torch.manual_seed(0)
    benchmark.group = f"noise: latent forward vs normal_ B={batch} D={dim}"
    if provider == "fastvae":
        mu, logvar = torch.randn(batch, dim), 0.1 * torch.randn(batch, dim)
        benchmark(run_mode(LATENT["fastvae"], (mu, logvar), "forward"))
    else:
        benchmark(run_mode(normal_fill, (torch.empty(batch, dim),), "forward"))


LIKELIHOOD_SIZES = [(128, 784), (1024, 784)]


@pytest.mark.parametrize("samples", SAMPLES, ids=lambda s: f"L={s or 1}")
@pytest.mark.parametrize("size", LIKELIHOOD_SIZES, ids=lambda s: f"B={s[0]},P={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(BERNOULLI))
def test_bernoulli(benchmark, provider, mode, size, samples):
    batch, pixels = size
    torch.manual_seed(0)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    logits = torch.randn(shape, requires_grad=mode != "forward")
    x = torch.bernoulli(torch.full((batch, pixels), 0.3))
    benchmark.group = f"bernoulli {mode} B={batch} P={pixels} L={samples or 1}"
    benchmark.extra_info["bytes"] = bernoulli_bytes(logits.numel(), batch, pixels, mode)
    benchmark(run_mode(BERNOULLI[provider], (logits, x), mode))


@pytest.mark.parametrize("numel", [4096 * 256, 5 * 4096 * 256])
def test_bandwidth_reference_add(benchmark, numel):
    """torch.add(a, b, out=c): what a memory-bound op achieves on this machine, this run."""
    a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    benchmark.group = f"bandwidth add N={numel}"
    benchmark.extra_info["bytes"] = 3 * numel * FLOAT_BYTES
    benchmark(lambda: torch.add(a, b, out=c))
