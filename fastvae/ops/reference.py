"""Pure-PyTorch versions of every fused op.

They define what the C++/CUDA kernels must compute (docs/DESIGN.md section 1) and
are used three ways: as the oracle in tests, as the "eager" provider in the
benchmarks, and as the fallback backend when the extension is not built.
Autograd differentiates them directly, so their gradients are independent of
the hand-written backward kernels.

The noise generator is reimplemented here too (Philox4x32-10 + the same
Box-Muller variant as csrc/fastvae.h), so the fallback draws the same eps as the
extension for a given (seed, offset).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)

_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter_lo: np.ndarray, counter_hi: int, seed: int) -> list[np.ndarray]:
    """Philox4x32 with 10 rounds for a vector of 64-bit counters (low words).

    The counter is (counter_lo, counter_hi) as 4 x 32 bits, the key is the
    64-bit seed. Returns the four 32-bit output words, each as a uint64 array.
    """
    counter_lo = np.asarray(counter_lo, dtype=np.uint64)
    c0 = counter_lo & _MASK32
    c1 = counter_lo >> np.uint64(32)
    c2 = np.full_like(c0, counter_hi & 0xFFFFFFFF)
    c3 = np.full_like(c0, (counter_hi >> 32) & 0xFFFFFFFF)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


def _box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    phi = (b >> np.uint64(8)).astype(np.float64) * (2.0**-24 * math.pi / 2)
    radius = np.sqrt(-2.0 * np.log(u))
    sign0 = np.where(a & np.uint64(1), -1.0, 1.0)
    sign1 = np.where(a & np.uint64(2), -1.0, 1.0)
    return sign0 * radius * np.cos(phi), sign1 * radius * np.sin(phi)


def philox_normal(count: int, seed: int, offset: int = 0, first: int = 0, sample: int = 0) -> Tensor:
    """Standard normals of sample `sample`, within-sample indices [first, first+count), float32.

    Within-sample index i uses Philox block (sample << 32) + i // 4 (counter
    (block, offset), key seed) and takes normal i % 4 of it, exactly as
    `noise_block` and `normal4` in csrc/fastvae.h.
    """
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    first_block = first // 4
    end_block = (first + count + 3) // 4
    blocks = np.arange(first_block, end_block, dtype=np.uint64) + np.uint64(sample << 32)
    w0, w1, w2, w3 = philox4x32_10(blocks, offset, seed)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    normals = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)
    start = first - 4 * first_block
    return torch.from_numpy(normals[start : start + count].astype(np.float32))


BERNOULLI_STREAM = 0x62696E6172697A65  # csrc/fastvae.h, kBernoulliStream


def gather_bernoulli(probs: Tensor, index: Tensor, seed: int) -> Tensor:
    """ops.gather_bernoulli: pixel j of row i is 1 where the top 24 bits of word j%4 of Philox block
    (i << 32) + j//4 under (seed, BERNOULLI_STREAM), times 2^-24, are below the pixel."""
    rows = index.detach().cpu().numpy().astype(np.uint64)
    pixels = math.prod(probs.shape[1:])
    blocks = (pixels + 3) // 4
    counters = (rows[:, None] << np.uint64(32)) + np.arange(blocks, dtype=np.uint64)[None, :]
    words = np.stack(philox4x32_10(counters.ravel(), BERNOULLI_STREAM, seed), axis=-1)
    words = words.reshape(len(rows), 4 * blocks)[:, :pixels]
    uniforms = torch.from_numpy((words >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24))
    p = probs[index].reshape(len(rows), pixels)
    return (uniforms.to(p.device, p.dtype) < p).to(p.dtype).reshape(len(rows), *probs.shape[1:])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and bfloat16 accumulate in float32, like the kernels."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def latent_terms(
    mu: Tensor,
    logvar: Tensor,
    eps: Tensor | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    offset: int = 0,
    row_offset: int = 0,
    stl: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z (L,B,D), kl (B), log_q (L,B), log_p (L,B): the contract of fastvae::latent_terms.

    num_samples=None: one sample and no sample dimension (z (B,D), log_q and log_p (B)).
    """
    dtype = _compute_dtype(mu.dtype)
    mu_c, logvar_c = mu.to(dtype), logvar.to(dtype)
    batch, dim = mu.shape
    z_shape = (batch, dim) if num_samples is None else (num_samples, batch, dim)
    if eps is None:
        per_sample = [philox_normal(batch * dim, seed, offset, row_offset * dim, l) for l in range(num_samples or 1)]
        eps = torch.stack(per_sample).view(z_shape)
    eps = eps.detach().to(device=mu.device, dtype=dtype)
    std = torch.exp(0.5 * logvar_c)
    z = mu_c + std * eps
    kl = 0.5 * (mu_c.pow(2) + torch.exp(logvar_c) - 1.0 - logvar_c).sum(-1)
    if stl:
        # Path derivative only: q's parameters held fixed, gradient through z.
        mu_d, logvar_d = mu_c.detach(), logvar_c.detach()
        log_q_terms = -0.5 * (z - mu_d).pow(2) * torch.exp(-logvar_d) - 0.5 * logvar_d
    else:
        log_q_terms = -0.5 * eps.pow(2) - 0.5 * logvar_c
    log_q = log_q_terms.sum(-1) - 0.5 * LOG_2PI * dim
    log_p = (-0.5 * z.pow(2)).sum(-1) - 0.5 * LOG_2PI * dim
    return z.to(mu.dtype), kl, log_q, log_p


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """sum_p x*a - softplus(a) per row; logits (L,B,P) or (B,P), x (B,P).

    softplus(a) = logaddexp(a, 0), exact at every logit: torch's softplus returns a itself
    above a = 20, which is e^-a (up to 2e-9) short of it, far above float64 rounding.
    """
    dtype = _compute_dtype(logits.dtype)
    a, x = logits.to(dtype), x.to(dtype)
    return (x * a - torch.logaddexp(a, torch.zeros_like(a))).sum(-1)


def gaussian_log_prob(mean: Tensor, x: Tensor, logvar: Tensor | None = None, logvar_value: float = 0.0) -> Tensor:
    """sum_p log N(x | mean, exp(logvar)) per row; logvar a tensor shaped like mean, or one float."""
    dtype = _compute_dtype(mean.dtype)
    m, x = mean.to(dtype), x.to(dtype)
    s = logvar.to(dtype) if logvar is not None else torch.tensor(logvar_value, dtype=dtype, device=m.device)
    terms = -0.5 * ((x - m).pow(2) * torch.exp(-s) + s + LOG_2PI)
    return terms.sum(-1)


def _log_sinhc(u: Tensor) -> Tensor:
    """log(sinh(u) / u) for |u| < 0.05: u^2/6 - u^4/180 + u^6/2835 - u^8/37800 + u^10/467775,
    whose next term is below float64 rounding there."""
    u2 = u * u
    return u2 * (1 / 6 + u2 * (-1 / 180 + u2 * (1 / 2835 + u2 * (-1 / 37800 + u2 / 467775))))


def continuous_bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """sum_p log ContinuousBernoulli(x | logits) per row; logits (L,B,P) or (B,P), x (B,P).

    log p = x*eta - softplus(eta) + log C(eta), C(eta) = eta / tanh(eta/2). With a = |eta|,
    log C(eta) - softplus(eta) = log(a / (1 - e^-a)) - relu(eta) = log(eta / (e^eta - 1)): exact
    for every logit. Below |eta| = 0.1, where 1 - e^-a cancels, that is -eta/2 - log(sinh(u)/u)
    with u = eta/2, a smooth series (so autograd also gets the derivative at eta = 0 right).
    x*eta - relu(eta) is written (x - 1)*eta for eta > 0, exact in float32 near x = 1.
    """
    dtype = _compute_dtype(logits.dtype)
    eta, x = logits.to(dtype), x.to(dtype)
    small = eta.abs() < 0.1
    a = torch.where(small, torch.ones_like(eta), eta.abs())  # keeps the unused branch's gradient finite
    direct = torch.where(eta > 0, x - 1, x) * eta + torch.log(a / -torch.expm1(-a))
    u = torch.where(small, eta, torch.zeros_like(eta)) / 2
    series = x * eta - u - _log_sinhc(u)
    return torch.where(small, series, direct).sum(-1)


DISCRETIZED_HALF_BIN = 0.5 / 255.0  # the 256 levels k/255 of 8-bit data in [0, 1]


def discretized_logistic_log_prob(
    mean: Tensor, x: Tensor, log_scale: Tensor | None = None, log_scale_value: float = 0.0
) -> Tensor:
    """sum_p log DiscretizedLogistic(x | mean, exp(log_scale)) per row; x (B,P) holds levels k/255.

    Level x owns the logistic mass of [x - h, x + h], h = 1/510; x = 0 owns everything below
    its upper edge and x = 1 everything above its lower edge. With u+- = (x +- h - mean)/scale,
    sigmoid(u+) - sigmoid(u-) = sigmoid(u+) sigmoid(-u-) (1 - exp(-(u+ - u-))), every factor of
    which has an exact logarithm.
    """
    dtype = _compute_dtype(mean.dtype)
    m, x = mean.to(dtype), x.to(dtype)
    s = log_scale.to(dtype) if log_scale is not None else torch.full_like(m, log_scale_value)
    inv_scale = torch.exp(-s)
    upper = (x - m + DISCRETIZED_HALF_BIN) * inv_scale
    lower = (x - m - DISCRETIZED_HALF_BIN) * inv_scale
    width = (2 * DISCRETIZED_HALF_BIN) * inv_scale
    bottom, top = x < DISCRETIZED_HALF_BIN, x > 1 - DISCRETIZED_HALF_BIN
    zero = torch.zeros((), dtype=dtype, device=m.device)
    terms = (
        torch.where(top, zero, torch.nn.functional.logsigmoid(upper))
        + torch.where(bottom, zero, torch.nn.functional.logsigmoid(-lower))
        + torch.where(bottom | top, zero, torch.log(-torch.expm1(-width)))
    )
    return terms.sum(-1)
def fused_head_log_prob(h: Tensor, weight: Tensor, bias: Tensor | None, x: Tensor, likelihood: str,
                        logvar_value: float = 0.0, second_shift: float = 0.0,
                        second_min: float | None = None) -> Tensor:
    """The fused decoder head unfused: raw = h W^T + b, then `<likelihood>_log_prob` per row.

    h (L,B,H) or (B,H), weight (k*P,H), bias (k*P) or None, x (B,P). k = 1: raw is the first
    parameter, and a two-parameter likelihood's second is logvar_value everywhere; k = 2:
    raw[..., :P] is the first, and the second is raw[..., P:] + second_shift, clamped below
    at second_min (None: not clamped).
    """
    dtype = _compute_dtype(h.dtype)
    raw = torch.nn.functional.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    log_prob = globals()[f"{likelihood}_log_prob"]
    pixels = x.shape[-1]
    if raw.shape[-1] != pixels:  # k = 2: the second parameter from the layer
        second = raw[..., pixels:] + second_shift
        return log_prob(raw[..., :pixels], x, second if second_min is None else second.clamp(min=second_min))
    if len(inspect.signature(log_prob).parameters) > 2:  # (params, x, second, second_value)
        return log_prob(raw, x, None, logvar_value)
    return log_prob(raw, x)


# ---------------------------------------------------------------------------
# Priors beyond N(0, I) (fastvae.ops._priors): every element formed, nothing fused.
# ---------------------------------------------------------------------------
def _exp_minus_one_minus_identity(r: Tensor) -> Tensor:
    """e^r - 1 - r to full precision: its Taylor series for |r| < 1/2, where expm1(r) - r cancels."""
    small = r.abs() < 0.5
    rs = torch.where(small, r, torch.zeros_like(r))
    series = torch.zeros_like(rs)
    for n in range(15, 1, -1):
        series = series * rs + 1.0 / math.factorial(n)
    return torch.where(small, rs * rs * series, torch.expm1(r) - r)


def gaussian_kl_prior(mu: Tensor, logvar: Tensor, prior_mu: Tensor, prior_logvar: Tensor) -> Tensor:
    """sum over the last dimension of KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)), broadcasting."""
    diff = mu - prior_mu
    terms = _exp_minus_one_minus_identity(logvar - prior_logvar) + diff * diff * torch.exp(-prior_logvar)
    return 0.5 * terms.sum(-1)


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """sum over the last dimension of log N(z; mu, e^logvar), broadcasting."""
    diff = z - mu
    return -0.5 * (diff * diff * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """log sum_k w_k N(z; means_k, e^logvars_k) for z (..., D), components (K, D): (...), via (..., K, D)."""
    components = means.shape[0]
    log_w = (torch.log_softmax(log_weights, 0) if log_weights is not None
             else torch.full((components,), -math.log(components), dtype=z.dtype, device=z.device))
    log_n = gaussian_log_density(z.unsqueeze(-2), means, logvars)  # (..., K)
    return torch.logsumexp(log_w + log_n, -1)
