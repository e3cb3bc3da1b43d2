"""Argument checks shared by the fakes and the reference backend.

The C++ kernels check the same things in csrc/checks.h, with the same messages, so
an error reads the same whichever backend runs. Plain `raise RuntimeError` (the type
the C++ checks raise) rather than torch._check: Dynamo traces these wrappers, and
message closures over tensors would break the graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

_INT64_MAX = 2**63 - 1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastvae: {name} must be a torch.Tensor, got {type(t).__name__}")
    _require(
        t.is_floating_point(),
        f"fastvae: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), got {t.dtype}",
    )


def _check_same(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    _require(t.dtype == ref.dtype, f"fastvae: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    _require(t.device == ref.device, f"fastvae: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _z_shape(mu: Tensor, num_samples: int | None) -> tuple[int, ...]:
    return tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)


def _check_latent(mu: Tensor, logvar: Tensor, eps: Tensor | None, num_samples: int | None) -> None:
    _check_tensor(mu, "mu")
    _check_tensor(logvar, "logvar")
    _check_same(logvar, mu, "logvar", "mu")
    _require(mu.dim() == 2, f"fastvae: mu must have shape (batch, latent_dim), got {tuple(mu.shape)}")
    _require(
        logvar.shape == mu.shape,
        f"fastvae: logvar must have the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}",
    )
    if num_samples is not None:
        _require(num_samples >= 1, f"fastvae: num_samples must be >= 1, got {num_samples}")
    if eps is not None:
        _check_tensor(eps, "eps")
        _check_same(eps, mu, "eps", "mu")
        z_shape = _z_shape(mu, num_samples)
        _require(
            tuple(eps.shape) == z_shape,
            f"fastvae: eps must have the shape of z {z_shape} ((num_samples, batch, latent_dim), "
            f"or (batch, latent_dim) when num_samples is None), got {tuple(eps.shape)}",
        )


def _check_likelihood(params: Tensor, x: Tensor, name: str) -> None:
    _check_tensor(params, name)
    _check_tensor(x, "x")
    _check_same(x, params, "x", name)
    _require(x.dim() == 2, f"fastvae: x must have shape (batch, num_pixels), got {tuple(x.shape)}")
    stacked = params.dim() == 3 and params.shape[1:] == x.shape
    _require(
        stacked or params.shape == x.shape,
        f"fastvae: {name} must have shape (batch, num_pixels) = {tuple(x.shape)} or "
        f"(num_samples, batch, num_pixels), got {tuple(params.shape)}",
    )


class FusedLikelihood(NamedTuple):
    """What the checks, the fakes and the fused head need of one fused likelihood (csrc/fastvae.h):
    its parameters' names (second_name None: one parameter) and, for one whose x must lie in
    [0, 1], the words naming it in that error."""

    param_name: str
    second_name: str | None
    unit_interval: str | None


# Every fused likelihood by its name, one entry per fastvae.ops._likelihood_op line (in
# fastvae/ops/__init__.py); fastvae.ops.FUSED_LIKELIHOODS is its keys, checked against the
# extension's list (csrc/fastvae.h, FusedLikelihoods).
_FUSED: dict[str, FusedLikelihood] = {}


def _fused_likelihood(name: str) -> FusedLikelihood:
    _require(name in _FUSED, f"fastvae: likelihood must be one of {', '.join(map(repr, _FUSED))}, got '{name}'")
    return _FUSED[name]


def _check_head(h: Tensor, weight: Tensor, bias: Tensor | None, x: Tensor, likelihood: str,
                logvar_value: float = 0.0, second_shift: float = 0.0, second_min: float | None = None) -> None:
    """The checks of csrc/head.h (prepare_head): k = weight's rows per pixel is 1, or 2 for a
    two-parameter likelihood reading its second parameter from the layer."""
    second_name = _fused_likelihood(likelihood).second_name
    _require(math.isfinite(logvar_value), f"fastvae: logvar_value must be finite, got {logvar_value}")
    _require(math.isfinite(second_shift), f"fastvae: second_shift must be finite, got {second_shift}")
    _require(second_min is None or not math.isnan(second_min), "fastvae: second_min must be a number or None, got nan")
    _check_tensor(h, "h")
    for t, name in ((weight, "weight"), (x, "x")) + (() if bias is None else ((bias, "bias"),)):
        _check_tensor(t, name)
        _check_same(t, h, name, "h")
    _require(x.dim() == 2, f"fastvae: x must have shape (batch, num_pixels), got {tuple(x.shape)}")
    batch = x.shape[0]
    _require(
        (h.dim() == 3 and h.shape[1] == batch) or (h.dim() == 2 and h.shape[0] == batch),
        f"fastvae: h must have shape (batch, hidden) or (num_samples, batch, hidden) with batch = {batch} "
        f"(x's first dimension), got {tuple(h.shape)}",
    )
    pixels, hidden = x.shape[1], h.shape[-1]
    shaped = weight.dim() == 2 and weight.shape[1] == hidden
    k = 1 if shaped and weight.shape[0] == pixels else (2 if shaped and weight.shape[0] == 2 * pixels else 0)
    if second_name is None:
        _require(k == 1, f"fastvae: weight must have shape (1 * num_pixels, hidden) = ({pixels}, {hidden}) for this "
                         f"likelihood and these h and x, got {tuple(weight.shape)}")
    _require(k > 0, f"fastvae: weight must have shape (1 * num_pixels, hidden) = ({pixels}, {hidden}) ({second_name} "
                    f"one value) or (2 * num_pixels, hidden) = ({2 * pixels}, {hidden}) ({second_name} from the layer) "
                    f"for this likelihood and these h and x, got {tuple(weight.shape)}")
    if bias is not None:
        _require(
            tuple(bias.shape) == (k * pixels,), f"fastvae: bias must have shape ({k * pixels},), got {tuple(bias.shape)}"
        )


def _head_likelihood(likelihood: str, weight: Tensor, pixels: int, hidden: int) -> str:
    """The fused likelihood the head runs for `likelihood` (raises for an unknown name): itself, or
    "gaussian" for "gaussian_learned", its name before the head took the ops' names, which needs
    the layer's second half (weight (2 * num_pixels, hidden))."""
    if likelihood == "gaussian_learned":
        _require(isinstance(weight, Tensor) and tuple(weight.shape) == (2 * pixels, hidden),
                 f"fastvae: weight must have shape (2 * num_pixels, hidden) = ({2 * pixels}, {hidden}) for this "
                 f"likelihood and these h and x, got {tuple(getattr(weight, 'shape', ()))}")
        return "gaussian"
    _fused_likelihood(likelihood)
    return likelihood


def _check_gather_bernoulli(probs: Tensor, index: Tensor) -> None:
    if not isinstance(probs, Tensor) or not isinstance(index, Tensor):
        raise TypeError("fastvae: probs and index must be torch.Tensors")
    _require(probs.dtype in (torch.float32, torch.float64),
             f"fastvae: probs must be float32 or float64, got {probs.dtype}")
    _require(probs.dim() >= 1, "fastvae: probs must have a row dimension, got a scalar")
    _require(index.dtype == torch.int64 and index.dim() == 1,
             f"fastvae: index must be a 1-D int64 tensor of row numbers, got {index.dtype} of shape "
             f"{tuple(index.shape)}")
    _require(index.device == probs.device,
             f"fastvae: index is on {index.device} but probs is on {probs.device}; they must be on the same device")


def _check_sparse_input_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fastvae: x and weight must be torch.Tensors")
    _require(x.is_floating_point(), f"fastvae: x must be a floating-point tensor, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _require(t.dtype == x.dtype, f"fastvae: {name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
            _require(t.device == x.device,
                     f"fastvae: {name} is on {t.device} but x is on {x.device}; they must be on the same device")
    _require(x.dim() >= 1, "fastvae: x must have shape (..., in_features), got a scalar")
    _require(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
             f"fastvae: weight must have shape (out_features, {x.shape[-1]}) to match x's last dimension, "
             f"got {tuple(weight.shape)}")
    if bias is not None:
        _require(tuple(bias.shape) == (weight.shape[0],),
                 f"fastvae: bias must have shape ({weight.shape[0]},) (out_features), got {tuple(bias.shape)}")


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_int(value, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fastvae: {name} must be an int, got {type(value).__name__}")
    if not low <= value <= _INT64_MAX:
        raise ValueError(f"fastvae: {name} must be in [{low}, 2**63 - 1], got {value}")
    return value


def _check_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastvae: {name} must be a float, got {type(value).__name__}")
    return float(value)
