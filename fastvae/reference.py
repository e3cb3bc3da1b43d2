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
    """sum_p x*a - softplus(a) per row; logits (L,B,P) or (B,P), x (B,P)."""
    dtype = _compute_dtype(logits.dtype)
    a, x = logits.to(dtype), x.to(dtype)
    return (x * a - torch.nn.functional.softplus(a)).sum(-1)


def gaussian_log_prob(mean: Tensor, x: Tensor, logvar: Tensor | None = None, logvar_value: float = 0.0) -> Tensor:
    """sum_p log N(x | mean, exp(logvar)) per row; logvar a tensor shaped like mean, or one float."""
    dtype = _compute_dtype(mean.dtype)
    m, x = mean.to(dtype), x.to(dtype)
    s = logvar.to(dtype) if logvar is not None else torch.tensor(logvar_value, dtype=dtype, device=m.device)
    terms = -0.5 * ((x - m).pow(2) * torch.exp(-s) + s + LOG_2PI)
    return terms.sum(-1)
