"""GPU op benchmarks: fastvae's CUDA kernels against eager, torch.compile and torch.distributions.

Skipped without a CUDA device. Run on a GPU machine (see benchmarks/README.md):
    pytest benchmarks/test_bench_cuda.py --benchmark-only --benchmark-json=benchmarks/results_cuda.json
    python benchmarks/report.py benchmarks/results_cuda.json

The providers are those of the CPU benchmark (benchmarks/providers.py), on CUDA tensors.
Each timed call ends with torch.cuda.synchronize(), so a sample is the wall time of the
work itself rather than of a kernel launch. Groups are prefixed "cuda" so that a report
over CPU and GPU results keeps them apart; `extra_info["bytes"]` is the traffic the op
cannot avoid, from which report.py derives GB/s beside a plain torch.add on the device.
"""

import pytest
import torch

import fastvae
from providers import BERNOULLI, FLOAT_BYTES, LATENT, bernoulli_bytes, latent_bytes, run_mode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEVICE = "cuda"
LATENT_SIZES = [(128, 32), (512, 64), (4096, 256)]
SAMPLES = [None, 5]
MODES = ["forward", "forward+backward"]


def run_cuda(fn, inputs, mode):
    return run_mode(fn, inputs, mode, sync=torch.cuda.synchronize)


@pytest.mark.parametrize("samples", SAMPLES, ids=lambda s: f"L={s or 1}")
@pytest.mark.parametrize("size", LATENT_SIZES, ids=lambda s: f"B={s[0]},D={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(LATENT))
def test_cuda_latent(benchmark, provider, mode, size, samples):
    batch, dim = size
    torch.manual_seed(0)
    mu = torch.randn(batch, dim, device=DEVICE, requires_grad=mode != "forward")
    logvar = (0.1 * torch.randn(batch, dim, device=DEVICE)).requires_grad_(mode != "forward")
    fn = LATENT[provider]
    benchmark.group = f"cuda latent {mode} B={batch} D={dim} L={samples or 1}"
    benchmark.extra_info["bytes"] = latent_bytes(batch, dim, samples, mode)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark(run_cuda(lambda m, lv: fn(m, lv, samples), (mu, logvar), mode))


LIKELIHOOD_SIZES = [(128, 784), (1024, 784)]


@pytest.mark.parametrize("samples", SAMPLES, ids=lambda s: f"L={s or 1}")
@pytest.mark.parametrize("size", LIKELIHOOD_SIZES, ids=lambda s: f"B={s[0]},P={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(BERNOULLI))
def test_cuda_bernoulli(benchmark, provider, mode, size, samples):
    batch, pixels = size
    torch.manual_seed(0)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    logits = torch.randn(shape, device=DEVICE, requires_grad=mode != "forward")
    x = torch.bernoulli(torch.full((batch, pixels), 0.3, device=DEVICE))
    benchmark.group = f"cuda bernoulli {mode} B={batch} P={pixels} L={samples or 1}"
    benchmark.extra_info["bytes"] = bernoulli_bytes(logits.numel(), batch, pixels, mode)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark(run_cuda(BERNOULLI[provider], (logits, x), mode))


@pytest.mark.parametrize("numel", [4096 * 256, 5 * 4096 * 256, 64 * 1024 * 1024])
def test_cuda_bandwidth_reference_add(benchmark, numel):
    """torch.add(a, b, out=c) on the device: the memory-bound yardstick of this run."""
    a, b, c = (torch.randn(numel, device=DEVICE) for _ in range(3))
    benchmark.group = f"cuda bandwidth add N={numel}"
    benchmark.extra_info["bytes"] = 3 * numel * FLOAT_BYTES
    benchmark(run_cuda(lambda: torch.add(a, b, out=c), (), "forward"))


def test_cuda_backend_is_the_extension():
    """Not a timing: the numbers above mean nothing if fastvae fell back to the reference ops."""
    assert fastvae.cuda_kernels_built(), "fastvae was built without its CUDA kernels"
