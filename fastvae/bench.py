"""`fastvae bench`: a quick, self-contained check of the fused ops' speed-up on your machine.

It times the latent op and the Bernoulli, continuous Bernoulli and discretized logistic
likelihoods (forward+backward) against the same math in eager PyTorch, and the latent forward
(noise drawn in the kernel) against `Tensor.normal_` filling the same number of elements,
interleaving the providers so machine noise hits both, and prints medians and ratios together
with the CPU and the instruction-set level the kernels ran at. The full suite with
torch.compile and torch.distributions is in benchmarks/ (pytest-benchmark).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time

import torch

from . import ops

LOG_2PI = math.log(2 * math.pi)


def eager_latent(mu, logvar, num_samples=None):
    """The canonical PyTorch VAE example's reparameterization and KL, plus log q and log p."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std) if num_samples is None else std.new_empty((num_samples, *std.shape)).normal_()
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    log_q = torch.sum(-0.5 * eps.pow(2) - 0.5 * logvar, dim=-1) - 0.5 * LOG_2PI * mu.shape[-1]
    log_p = torch.sum(-0.5 * z.pow(2), dim=-1) - 0.5 * LOG_2PI * mu.shape[-1]
    return z, kl, log_q, log_p


# fastvae's provider is the public function itself; its LatentTerms is a (z, kl, log_q, log_p) tuple.
fused_latent = ops.latent_terms


def normal_fill(out):
    """torch's own standard-normal draw into an existing tensor: what the fused forward's noise is compared with."""
    return out.normal_()


def eager_bernoulli(logits, x):
    """The example's binary cross-entropy, per row and from logits; x broadcast over samples."""
    target = x.expand_as(logits)
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)


def fused_bernoulli(logits, x):
    return ops.bernoulli_log_likelihood(logits, x, check_range=False)


def eager_continuous_bernoulli(logits, x):
    """What a VAE written in eager PyTorch does (as pytorch/examples' VAE): the Bernoulli term from
    logits, plus log C(lambda) = log(2 atanh(1 - 2 lambda) / (1 - 2 lambda)) from the probabilities,
    with its Taylor expansion log 2 + 4/3 d^2 + 104/45 d^4 (d = lambda - 1/2) where that form is 0/0."""
    log_bernoulli = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits),
                                                                          reduction="none")
    d = torch.sigmoid(logits) - 0.5
    near_half = d.abs() < 1e-2
    far = torch.where(near_half, torch.full_like(d, 0.5), -2 * d)  # 1 - 2 lambda; no 0/0 in the unused branch
    log_norm = torch.where(near_half, math.log(2) + d.pow(2) * (4 / 3 + d.pow(2) * (104 / 45)),
                           torch.log(2 * torch.atanh(far) / far))
    return (log_bernoulli + log_norm).sum(-1)


def fused_continuous_bernoulli(logits, x):
    return ops.continuous_bernoulli_log_likelihood(logits, x, check_range=False)


_HALF_BIN = 0.5 / 255  # 8-bit levels k/255 in [0, 1]


def eager_discretized_logistic(mean, log_scale, x):
    """PixelCNN++'s discretized logistic (one component; data in [0, 1], bins of width 1/255): sigmoid
    CDF differences, log-sigmoid edge bins, the mid-bin density where the difference underflows."""
    softplus = torch.nn.functional.softplus
    centred = x - mean
    inv_scale = torch.exp(-log_scale)
    plus_in = inv_scale * (centred + _HALF_BIN)
    min_in = inv_scale * (centred - _HALF_BIN)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - softplus(plus_in)
    log_one_minus_cdf_min = -softplus(min_in)
    mid_in = inv_scale * centred
    log_pdf_mid = mid_in - log_scale - 2 * softplus(mid_in)
    interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(255))
    log_probs = torch.where(x < _HALF_BIN, log_cdf_plus,
                            torch.where(x > 1 - _HALF_BIN, log_one_minus_cdf_min, interior))
    return log_probs.sum(-1)


def fused_discretized_logistic(mean, log_scale, x):
    return ops.discretized_logistic_log_likelihood(mean, log_scale, x, check_range=False)


def run_mode(fn, inputs, mode, sync=None):
    """The callable to time (here and in benchmarks/): fn(*inputs), or that plus backward of every output.

    Forward+backward sets the leaf inputs' .grad to None before each call, as `zero_grad()` leaves
    a training step's parameters: autograd then hands each gradient over instead of adding it into
    the last call's (a read-modify-write of every input that no training step does, and that both
    providers would pay). Warmed up (and compiled, for torch.compile) beforehand. `sync` (e.g.
    torch.cuda.synchronize) runs after each call so that a sample is the work itself, not a kernel launch.
    """
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(*inputs)
    else:
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = tuple(torch.ones_like(o) for o in outputs)
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]

        def step():
            for leaf in leaves:
                leaf.grad = None
            out = fn(*inputs)
            torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    def timed():
        step()
        if sync is not None:
            sync()

    for _ in range(3):
        timed()
    return timed


def _median_seconds(step, budget: float, clock=time.perf_counter) -> float:
    """Median time of `step`, in batches of calls sized to ~1 ms, within `budget` seconds (wall clock).

    `clock` measures each batch: wall time by default; time.thread_time gives the CPU time of a
    single-threaded step, which other processes on a busy machine do not inflate.
    """
    step()
    start = time.perf_counter()
    step()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(1e-3 / once))
    samples = []
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline or len(samples) < 5:
        start = clock()
        for _ in range(calls):
            step()
        samples.append((clock() - start) / calls)
    return statistics.median(samples)


def compare(name: str, fused, other, inputs, budget: float, mode: str = "forward+backward",
            other_inputs=None, clock=time.perf_counter) -> tuple[str, float, float]:
    """Times both providers in alternating slices and returns (name, fused s, other s).

    `other` runs on `other_inputs` when given (normal_ fills its own tensor); `clock` as in _median_seconds.
    """
    fused_step = run_mode(fused, inputs, mode)
    other_step = run_mode(other, inputs if other_inputs is None else other_inputs, mode)
    fused_times, other_times = [], []
    for _ in range(3):
        fused_times.append(_median_seconds(fused_step, budget / 6, clock))
        other_times.append(_median_seconds(other_step, budget / 6, clock))
    return name, min(fused_times), min(other_times)


def run(budget_per_case: float = 1.5, clock=time.perf_counter,
        latent_only: bool = False) -> list[tuple[str, float, float]]:
    """Every case of `fastvae bench` (latent_only: without the Bernoulli ones), as (name, fastvae s, other s)."""
    torch.manual_seed(0)
    rows = []
    for batch, dim in [(128, 32), (512, 64), (4096, 256)]:
        mu = torch.randn(batch, dim, requires_grad=True)
        logvar = (0.1 * torch.randn(batch, dim)).requires_grad_()
        rows.append(compare(f"latent fwd+bwd B={batch} D={dim}", fused_latent, eager_latent, (mu, logvar),
                            budget_per_case, clock=clock))
    for batch in [] if latent_only else [128, 1024]:
        logits = torch.randn(batch, 784, requires_grad=True)
        x = torch.bernoulli(torch.full((batch, 784), 0.3))
        rows.append(compare(f"bernoulli fwd+bwd B={batch} P=784", fused_bernoulli, eager_bernoulli, (logits, x),
                            budget_per_case, clock=clock))
    for batch, dim in NOISE_SIZES:
        mu, logvar = torch.randn(batch, dim), 0.1 * torch.randn(batch, dim)
        rows.append(compare(f"latent fwd vs normal_ B={batch} D={dim}", fused_latent, normal_fill, (mu, logvar),
                            budget_per_case, mode="forward", other_inputs=(torch.empty(batch, dim),), clock=clock))
    for pixels in [] if latent_only else [784, 3 * 32 * 32]:
        logits, grey = (2 * torch.randn(128, pixels)).requires_grad_(), torch.rand(128, pixels)
        rows.append(compare(f"cont. bernoulli fwd+bwd B=128 P={pixels}", fused_continuous_bernoulli,
                            eager_continuous_bernoulli, (logits, grey), budget_per_case, clock=clock))
        levels = torch.randint(0, 256, (128, pixels)) / 255.0
        mean = (levels + 0.05 * torch.randn(128, pixels)).requires_grad_()
        log_scale = (-4 + 0.5 * torch.randn(128, pixels)).requires_grad_()
        rows.append(compare(f"disc. logistic fwd+bwd B=128 P={pixels}", fused_discretized_logistic,
                            eager_discretized_logistic, (mean, log_scale, levels), budget_per_case, clock=clock))
    return rows


# The latent forward with in-kernel noise against Tensor.normal_ on as many elements.
NOISE_SIZES = [(4096, 256), (65536, 64)]


def format_rows(rows) -> str:
    """The table: each case's fastvae time, the other provider's (eager, or normal_), and their ratio."""
    lines = [f"{'case':40s} {'fastvae (us)':>13s} {'other (us)':>11s} {'speed-up':>9s}"]
    for name, fused, other in rows:
        lines.append(f"{name:40s} {fused * 1e6:13.1f} {other * 1e6:11.1f} {other / fused:8.2f}x")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_cpu_level() -> str:
    """The instruction-set level fastvae's float32 CPU kernels run at (FASTVAE_CPU_LEVEL picks one)."""
    if ops.backend() != "cpp":
        return "none (pure-PyTorch fallback)"
    from . import _C

    try:
        level = _C.cpu_level()
    except RuntimeError as exc:  # a bad FASTVAE_CPU_LEVEL
        return f"error: {exc}"
    return f"{level} (FASTVAE_CPU_LEVEL={os.environ.get('FASTVAE_CPU_LEVEL', 'auto')})"


def machine_description() -> str:
    """What a benchmark number depends on: the CPU, its core count, and the ISA level of both libraries."""
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
            f"fastvae kernels {kernel_cpu_level()}; ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
