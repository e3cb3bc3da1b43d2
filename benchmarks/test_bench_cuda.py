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

import math

import pytest
import torch

import fastvae
from providers import BERNOULLI, LATENT, compiled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEVICE = "cuda"
LATENT_SIZES = [(128, 32), (512, 64), (4096, 256)]
SAMPLES = [None, 5]
MODES = ["forward", "forward+backward"]
FLOAT_BYTES = 4
LOG_2PI = math.log(2 * math.pi)


def latent_eager_on_device(mu, logvar, num_samples=None):
    """providers.latent_eager, with its L-sample noise drawn on mu's device."""
    std = torch.exp(0.5 * logvar)
    shape = std.shape if num_samples is None else (num_samples, *std.shape)
    eps = torch.randn(shape, device=std.device, dtype=std.dtype)
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    dim = mu.shape[-1]
    log_q = torch.sum(-0.5 * eps.pow(2) - 0.5 * logvar, dim=-1) - 0.5 * LOG_2PI * dim
    log_p = torch.sum(-0.5 * z.pow(2), dim=-1) - 0.5 * LOG_2PI * dim
    return z, kl, log_q, log_p


CUDA_LATENT = {
    "fastvae": LATENT["fastvae"],
    "eager": latent_eager_on_device,
    "compile": lambda mu, logvar, num_samples=None: compiled(latent_eager_on_device)(mu, logvar, num_samples),
    "distributions": LATENT["distributions"],
}


def synchronized(fn):
    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    return timed


def run_mode(fn, inputs, mode):
    """The callable pytest-benchmark times for this mode (warmed up, and compiled, beforehand)."""
    if mode == "forward":
        with torch.no_grad():
            for _ in range(3):
                fn(*inputs)
        torch.cuda.synchronize()
        return synchronized(lambda: fn(*inputs))

    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = tuple(torch.ones_like(o) for o in outputs)

    def step():
        out = fn(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return synchronized(step)


def latent_bytes(batch, dim, samples, mode):
    rows = samples or 1
    forward = (2 * batch * dim + rows * batch * dim) * FLOAT_BYTES  # mu, logvar in; z out
    backward = (2 * rows * batch * dim + 4 * batch * dim) * FLOAT_BYTES  # z, grad_z, mu, logvar in; 2 grads out
    return forward + (backward if mode != "forward" else 0)


@pytest.mark.parametrize("samples", SAMPLES, ids=lambda s: f"L={s or 1}")
@pytest.mark.parametrize("size", LATENT_SIZES, ids=lambda s: f"B={s[0]},D={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(CUDA_LATENT))
def test_cuda_latent(benchmark, provider, mode, size, samples):
    batch, dim = size
    torch.manual_seed(0)
    mu = torch.randn(batch, dim, device=DEVICE, requires_grad=mode != "forward")
    logvar = (0.1 * torch.randn(batch, dim, device=DEVICE)).requires_grad_(mode != "forward")
    fn = CUDA_LATENT[provider]
    benchmark.group = f"cuda latent {mode} B={batch} D={dim} L={samples or 1}"
    benchmark.extra_info["bytes"] = latent_bytes(batch, dim, samples, mode)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark(run_mode(lambda m, lv: fn(m, lv, samples), (mu, logvar), mode))


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
    elements = logits.numel()
    traffic = (elements + batch * pixels) * FLOAT_BYTES
    benchmark.extra_info["bytes"] = traffic if mode == "forward" else 2 * traffic + elements * FLOAT_BYTES
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark(run_mode(BERNOULLI[provider], (logits, x), mode))


@pytest.mark.parametrize("numel", [4096 * 256, 5 * 4096 * 256, 64 * 1024 * 1024])
def test_cuda_bandwidth_reference_add(benchmark, numel):
    """torch.add(a, b, out=c) on the device: the memory-bound yardstick of this run."""
    a, b, c = (torch.randn(numel, device=DEVICE) for _ in range(3))
    benchmark.group = f"cuda bandwidth add N={numel}"
    benchmark.extra_info["bytes"] = 3 * numel * FLOAT_BYTES
    benchmark(synchronized(lambda: torch.add(a, b, out=c)))


def test_cuda_backend_is_the_extension():
    """Not a timing: the numbers above mean nothing if fastvae fell back to the reference ops."""
    assert fastvae.cuda_kernels_built(), "fastvae was built without its CUDA kernels"
