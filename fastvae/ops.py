"""The public functional API of fastvae's fused ops.

    latent_terms(mu, logvar, num_samples=None)   -> LatentTerms(z, kl, log_q, log_p)
    reparameterize(mu, logvar, num_samples=None) -> z
    gaussian_kl(mu, logvar)                      -> kl
    bernoulli_log_likelihood(logits, x)          -> log p(x|z) per row
    gaussian_log_likelihood(mean, x, logvar=0.0) -> log p(x|z) per row
    continuous_bernoulli_log_likelihood(logits, x)          -> log p(x|z) per row
    discretized_logistic_log_likelihood(mean, log_scale, x) -> log p(x|z) per row
    nats_to_bits_per_dim(nats, num_dims)         -> bits per dimension
    fused_head_log_likelihood(h, weight, bias, x, likelihood) -> log p(x|z) per row from the
                                                 decoder's last hidden layer (output layer fused in)

Shapes: mu, logvar are (B, D). With num_samples=None one sample is drawn and
z is (B, D), log_q and log_p are (B,); with num_samples=L they are (L, B, D) and
(L, B). kl is (B,). Decoder outputs are (B, ...) or (L, B, ...) against x of
shape (B, ...). Every returned log-density is summed over the data or latent
dimensions, in nats, per example: nothing is averaged here.

The ops run in the C++/CUDA extension (torch.ops.fastvae.*) when it is built,
and in fastvae.reference (pure PyTorch, same numbers, slower) otherwise. This
module also registers the fake (meta) implementations that torch.compile uses.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference

_INT64_MAX = 2**63 - 1


def _load_extension() -> str:
    """Import fastvae._C (which registers torch.ops.fastvae) and name the backend."""
    if os.environ.get("FASTVAE_BACKEND", "").lower() == "reference":
        return "reference"
    try:
        from . import _C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as exc:
        warnings.warn(
            f"fastvae: the C++ extension fastvae._C is not available ({exc}); using the pure-PyTorch "
            f"reference ops, which give the same numbers more slowly. {build_hint()}",
            RuntimeWarning,
            stacklevel=3,
        )
        return "reference"
    return "cpp"


def source_tree() -> str | None:
    """The repository fastvae is imported from, when it is imported from its sources (not an install)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def build_hint() -> str:
    """What to run to get the compiled extension, for the fastvae this process imported."""
    import sys

    root = source_tree()
    if root is not None:  # a checkout shadows the installed package: build it in place
        return (f"This fastvae is the source tree at {root}, which is not built: run "
                f"`cd {root} && {sys.executable} setup.py build_ext --inplace` "
                "(or run from outside the repository to use the installed fastvae).")
    return "Build it with `pip install --no-build-isolation .` (see README)."


_BACKEND = _load_extension()


def backend() -> str:
    """'cpp' when the fused C++ ops are active, 'reference' for the pure-PyTorch fallback."""
    return _BACKEND


def cuda_kernels_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return _BACKEND == "cpp" and torch._C._dispatch_has_kernel_for_dispatch_key("fastvae::latent_terms", "CUDA")


class LatentTerms(NamedTuple):
    z: Tensor       # (B, D) or (L, B, D)
    kl: Tensor      # (B,): KL(q(z|x) || N(0, I)), analytic
    log_q: Tensor   # (B,) or (L, B): log q(z|x)
    log_p: Tensor   # (B,) or (L, B): log p(z) under N(0, I)


# ---------------------------------------------------------------------------
# Validation shared by the fakes and the reference backend (the C++ kernels
# check the same things in csrc/checks.h).
# ---------------------------------------------------------------------------
# Plain `raise RuntimeError` (the type the C++ checks raise) rather than
# torch._check: Dynamo traces these wrappers, and message closures over tensors
# would break the graph.
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


HEAD_LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


def _check_head(h: Tensor, weight: Tensor, bias: Tensor | None, x: Tensor, likelihood: str) -> None:
    _require(
        likelihood in HEAD_LIKELIHOODS,
        f"fastvae: likelihood must be 'bernoulli', 'gaussian' or 'gaussian_learned', got '{likelihood}'",
    )
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
    k = 2 if likelihood == "gaussian_learned" else 1
    outputs, hidden = k * x.shape[1], h.shape[-1]
    _require(
        weight.dim() == 2 and tuple(weight.shape) == (outputs, hidden),
        f"fastvae: weight must have shape ({k} * num_pixels, hidden) = ({outputs}, {hidden}) for this likelihood "
        f"and these h and x, got {tuple(weight.shape)}",
    )
    if bias is not None:
        _require(
            tuple(bias.shape) == (outputs,), f"fastvae: bias must have shape ({outputs},), got {tuple(bias.shape)}"
        )


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


# ---------------------------------------------------------------------------
# Fakes: output shapes and dtypes without computing, for torch.compile/meta.
# ---------------------------------------------------------------------------
if _BACKEND == "cpp":

    @torch.library.register_fake("fastvae::latent_terms")
    def _latent_terms_fake(mu, logvar, eps, num_samples, seed, offset, row_offset=0, stl=False):
        _check_latent(mu, logvar, eps, num_samples)
        z_shape = _z_shape(mu, num_samples)
        sums = _sum_dtype(mu.dtype)
        return (
            mu.new_empty(z_shape),
            mu.new_empty((mu.shape[0],), dtype=sums),
            mu.new_empty(z_shape[:-1], dtype=sums),
            mu.new_empty(z_shape[:-1], dtype=sums),
        )

    @torch.library.register_fake("fastvae::latent_terms_from_generator")
    def _latent_terms_from_generator_fake(mu, logvar, num_samples, generator, row_offset=0, stl=False):
        return _latent_terms_fake(mu, logvar, None, num_samples, 0, 0, row_offset, stl)

    @torch.library.register_fake("fastvae::latent_terms_backward")
    def _latent_terms_backward_fake(grad_z, grad_kl, grad_log_q, grad_log_p, z, mu, logvar, stl):
        _check_latent(mu, logvar, None, None)
        return torch.empty_like(mu), torch.empty_like(logvar)

    @torch.library.register_fake("fastvae::fused_head_log_prob")
    def _fused_head_log_prob_fake(h, weight, bias, x, likelihood, logvar_value=0.0, precompute_grads=False):
        _check_head(h, weight, bias, x, likelihood)
        return h.new_empty(h.shape[:-1], dtype=_sum_dtype(h.dtype))

    @torch.library.register_fake("fastvae::fused_head_log_prob_with_grads")
    def _fused_head_log_prob_with_grads_fake(h, weight, bias, x, likelihood, logvar_value):
        _check_head(h, weight, bias, x, likelihood)
        grad_bias = torch.empty_like(bias) if bias is not None else h.new_empty((0,))
        log_prob = h.new_empty(h.shape[:-1], dtype=_sum_dtype(h.dtype))
        return log_prob, torch.empty_like(h), torch.empty_like(weight), grad_bias

    @torch.library.register_fake("fastvae::fused_head_log_prob_backward")
    def _fused_head_log_prob_backward_fake(grad, h, weight, bias, x, likelihood, logvar_value, needs_grad_h,
                                           needs_grad_weight, needs_grad_bias):
        _check_head(h, weight, bias, x, likelihood)

        def grad_like(t, needed):
            return torch.empty_like(t) if needed and t is not None else h.new_empty((0,))

        return grad_like(h, needs_grad_h), grad_like(weight, needs_grad_weight), grad_like(bias, needs_grad_bias)

    @torch.library.register_fake("fastvae::gather_bernoulli")
    def _gather_bernoulli_fake(probs, index, seed):
        _check_gather_bernoulli(probs, index)
        return probs.new_empty((index.shape[0], *probs.shape[1:]))

    @torch.library.register_fake("fastvae::sparse_input_linear")
    def _sparse_input_linear_fake(x, weight, bias):
        _check_sparse_input_linear(x, weight, bias)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("fastvae::sparse_input_linear_backward")
    def _sparse_input_linear_backward_fake(grad, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias):
        _check_sparse_input_linear(x, weight, None)
        none = x.new_empty((0,))
        return (torch.empty_like(x) if needs_grad_x else none, torch.empty_like(weight) if needs_grad_weight else none,
                x.new_empty((weight.shape[0],)) if needs_grad_bias else none)

    _latent_op = torch.ops.fastvae.latent_terms.default
    _gather_bernoulli_op = torch.ops.fastvae.gather_bernoulli.default
    _latent_from_generator_op = torch.ops.fastvae.latent_terms_from_generator.default
    _fused_head_op = torch.ops.fastvae.fused_head_log_prob.default
    _sparse_input_linear_op = torch.ops.fastvae.sparse_input_linear.default
else:

    def _latent_op(mu, logvar, eps, num_samples, seed, offset, row_offset=0, stl=False):
        _check_latent(mu, logvar, eps, num_samples)
        return reference.latent_terms(mu, logvar, eps, num_samples, seed, offset, row_offset, stl)

    def _latent_from_generator_op(mu, logvar, num_samples, generator, row_offset=0, stl=False):
        _check_tensor(mu, "mu")
        seed, offset = draw_seed(mu.device, generator)
        return _latent_op(mu, logvar, None, num_samples, seed, offset, row_offset, stl)

    def _gather_bernoulli_op(probs, index, seed):
        _check_gather_bernoulli(probs, index)
        if index.numel():
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= probs.shape[0]:
                raise IndexError(f"fastvae: index {low if low < 0 else high} is out of range for probs with "
                                 f"{probs.shape[0]} rows")
        return reference.gather_bernoulli(probs, index, seed)

    def _sparse_input_linear_op(x, weight, bias):
        _check_sparse_input_linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    def _fused_head_op(h, weight, bias, x, likelihood, logvar_value=0.0, precompute_grads=False):
        _check_head(h, weight, bias, x, likelihood)
        _require(not (torch.is_grad_enabled() and x.requires_grad),
                 "fastvae: fused_head_log_prob does not differentiate with respect to x (it is the data)")
        return reference.fused_head_log_prob(h, weight, bias, x, likelihood, logvar_value)


def _likelihood_op(name: str, param_name: str, second_name: str | None = None):
    """The op `name` of a fused likelihood (csrc/fastvae.h), with its fakes registered.

    One parameter: op(params, x). Two: op(params, x, second, second_value), the second
    parameter a tensor shaped like params or None and one float for every element.
    Without the extension, the same signature runs `reference.<name>`.
    """
    if _BACKEND != "cpp":
        reference_fn = getattr(reference, name)

        def reference_op(params, x, *second):
            _check_likelihood(params, x, param_name)
            if second and second[0] is not None:
                _check_same(second[0], params, second_name, param_name)
            return reference_fn(params, x, *second)

        return reference_op

    def fake(params, x, *second):
        _check_likelihood(params, x, param_name)
        return params.new_empty(params.shape[:-1], dtype=_sum_dtype(params.dtype))

    def backward_fake(grad, params, x, *rest):
        *second, needs_grad_x = rest
        grad_x = torch.empty_like(x) if needs_grad_x else x.new_empty((0,))
        if second_name is None:
            return torch.empty_like(params), grad_x
        grad_second = torch.empty_like(second[0]) if second[0] is not None else params.new_empty((0,))
        return torch.empty_like(params), grad_second, grad_x

    torch.library.register_fake(f"fastvae::{name}")(fake)
    torch.library.register_fake(f"fastvae::{name}_backward")(backward_fake)
    return getattr(torch.ops.fastvae, name).default


# One line per fused likelihood: (op name, its parameter names).
_bernoulli_op = _likelihood_op("bernoulli_log_prob", "logits")
_gaussian_op = _likelihood_op("gaussian_log_prob", "mean", "logvar")
_continuous_bernoulli_op = _likelihood_op("continuous_bernoulli_log_prob", "logits")
_discretized_logistic_op = _likelihood_op("discretized_logistic_log_prob", "mean", "log_scale")


# ---------------------------------------------------------------------------
# Randomness: (seed, offset) drawn from torch's generators (docs/DESIGN.md section 2).
# ---------------------------------------------------------------------------
# With the extension, latent_terms without seed= calls fastvae::latent_terms_from_generator,
# which draws (seed, offset) inside the op when it runs, as torch's own random ops do: a
# compiled graph holds the draw (no graph break, fresh noise at every call), and on CUDA
# the kernel reads the generator's graph-safe Philox state, so a captured CUDA graph draws
# fresh noise at every replay. Eagerly it draws exactly what draw_seed below would.
#
# A CPU seed is what `torch.empty((), dtype=torch.int64).random_(generator=generator)` gives;
# the extension's draw_cpu_seed returns the same value from the same generator state without
# that tensor round trip (which cost as much as the whole fused op at B=128, D=32). Dynamo
# cannot trace it, so compiled code keeps the tensor path.
_draw_cpu_seed = _latent_terms_cpu_seed = None
if _BACKEND == "cpp":
    from ._C import draw_cpu_seed as _draw_cpu_seed
    from ._C import latent_terms_cpu_seed as _latent_terms_cpu_seed


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> tuple[int, int]:
    """A fresh (seed, offset) for the in-kernel Philox stream, as plain ints.

    On CPU the seed is one draw from `generator` (default: torch's global
    generator), so torch.manual_seed makes runs reproducible. On CUDA it is the
    device generator's seed and its Philox offset, which is advanced, so no
    device synchronization is needed. latent_terms without seed= gives the same
    noise as latent_terms(seed=, offset=) with these values; it draws them inside
    the op instead, which a CUDA graph capture records (this function's host-side
    offset move is not recorded: a captured step would replay the same noise).
    """
    if device.type == "cuda":
        gen = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return gen.initial_seed() & _INT64_MAX, offset
    if _draw_cpu_seed is not None and not torch.compiler.is_compiling():
        return _draw_cpu_seed(generator), 0
    return int(_seed_scratch().random_(generator=generator)), 0


def _direct_cpu_call_ok(mu, logvar) -> bool:
    """Whether latent_terms may draw the seed and call the op in one step of the extension
    (fastvae._C.latent_terms_cpu_seed) instead of through draw_seed and torch.ops.

    Only for what that step covers exactly: plain CPU tensors, eager mode, no
    __torch_function__ mode (which torch.ops would consult). At B=128, D=32 the two Python
    steps it replaces cost as much as the fused kernel.
    """
    return (
        _latent_terms_cpu_seed is not None
        and type(mu) is Tensor
        and type(logvar) is Tensor
        and not mu.is_cuda
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
    )


_thread_state = threading.local()


def _seed_scratch() -> Tensor:
    """A per-thread int64 scalar to draw seeds into: allocating one per call costs as much as the draw."""
    scratch = getattr(_thread_state, "seed", None)
    if scratch is None:
        scratch = _thread_state.seed = torch.empty((), dtype=torch.int64)
    return scratch


def _check_int(value, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fastvae: {name} must be an int, got {type(value).__name__}")
    if not low <= value <= _INT64_MAX:
        raise ValueError(f"fastvae: {name} must be in [{low}, 2**63 - 1], got {value}")
    return value


def latent_terms(
    mu: Tensor,
    logvar: Tensor,
    num_samples: int | None = None,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    row_offset: int = 0,
    stl: bool = False,
) -> LatentTerms:
    """z = mu + exp(0.5*logvar)*eps with the analytic KL, log q(z|x) and log p(z), in one fused pass.

    num_samples=None: one sample, z (B, D), log_q and log_p (B,); num_samples=L: z (L, B, D), (L, B).
    eps: your own noise, shaped like z; treated as data, no gradient flows to it.
    Otherwise eps is drawn inside the kernel from Philox keyed by (seed, offset); seed=None draws
    them from `generator` (torch's default generator when None) when the op runs, like torch's own
    random ops: fresh noise at every call of a torch.compile'd function and at every replay of a
    captured CUDA graph, reproducible with torch.manual_seed. The same seed gives the same z.
    row_offset: the global index of this batch's first example. The noise of an example depends
    only on (seed, offset, sample, global index), so a data-parallel shard passing its offset
    draws exactly its part of the global batch's noise.
    stl: "sticking the landing" (Roeder et al. 2017): log_q's gradient flows only through z.
    NaN or inf in mu/logvar propagate to the outputs of the affected rows; they are not raised.
    """
    if num_samples is not None:
        _check_int(num_samples, "num_samples", low=1)
    if row_offset:
        _check_int(row_offset, "row_offset")
    if eps is None and seed is None:
        if _direct_cpu_call_ok(mu, logvar):
            # tuple.__new__ takes the extension's tuple as it is; LatentTerms(*t) is one more Python call.
            terms = _latent_terms_cpu_seed(mu, logvar, num_samples, generator, row_offset, stl)
            return tuple.__new__(LatentTerms, terms)
        _check_tensor(mu, "mu")
        z, kl, log_q, log_p = _latent_from_generator_op(mu, logvar, num_samples, generator, row_offset, stl)
        return LatentTerms(z, kl, log_q, log_p)
    elif seed is None:
        seed = 0  # eps given: (seed, offset) are not used
    else:
        _check_int(seed, "seed")
        _check_int(offset, "offset")
    if row_offset:
        _check_int(row_offset, "row_offset")
    z, kl, log_q, log_p = _latent_op(mu, logvar, eps, num_samples, seed, offset, row_offset, stl)
    return LatentTerms(z, kl, log_q, log_p)


def reparameterize(mu: Tensor, logvar: Tensor, num_samples: int | None = None, **kwargs) -> Tensor:
    """z = mu + exp(0.5*logvar)*eps (same arguments as latent_terms)."""
    return latent_terms(mu, logvar, num_samples, **kwargs).z


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, (B,).

    Uses a fixed seed since the KL does not depend on the draw; when you also need z,
    call latent_terms once instead, which gives both from the same pass.
    """
    return latent_terms(mu, logvar, seed=0).kl


# ---------------------------------------------------------------------------
# A linear layer for inputs that are mostly zeros.
# ---------------------------------------------------------------------------
def sparse_input_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight.T + bias, as torch.nn.functional.linear, computed from the nonzeros of x.

    For the first layer of an encoder fed binarized images: about 13% of an MNIST digit's
    pixels are 1, so most of a dense product's work multiplies zeros. The CPU kernel lists each
    row's nonzeros and adds up the matching columns of the weight (and, in the backward, builds
    the weight's gradient from the same nonzeros); where x has more than 30% nonzeros, or is not
    float32/float64, it runs the dense product instead. On CUDA it is the dense product (cuBLAS
    is faster there than a sparse walk at these sizes). Same numbers as F.linear up to the
    order of the float additions, for any x; differentiable in x, weight and bias.
    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    """
    return _sparse_input_linear_op(x, weight, bias)


# ---------------------------------------------------------------------------
# Data: a minibatch gathered and binarized in one pass.
# ---------------------------------------------------------------------------
def gather_bernoulli(
    probs: Tensor, index: Tensor, *, generator: torch.Generator | None = None, seed: int | None = None
) -> Tensor:
    """Rows `index` of `probs`, every pixel replaced by a Bernoulli draw with the pixel as its probability.

    Dynamic binarization (as in Burda et al.'s IWAE experiments) of a minibatch in the pass that
    gathers it: out[b, j] = 1.0 where u < probs[index[b], j], else 0.0, with u uniform on [0, 1)
    from fastvae's Philox stream, keyed by (seed, index[b], j). A row's draw therefore depends on
    the seed and its row number in probs alone, not on which batch, order or process gathers it.
    probs: (N, ...) float32 or float64 (intensities in [0, 1]); index: (B,) int64 on the same
    device. Returns (B, ...) in probs' dtype. seed=None draws the seed from `generator` (a CPU
    torch.Generator; None: torch's default CPU generator), so torch.manual_seed reproduces it.
    """
    if seed is None:
        seed = draw_seed(torch.device("cpu"), generator)[0]
    else:
        _check_int(seed, "seed")
    return _gather_bernoulli_op(probs, index, seed)


# ---------------------------------------------------------------------------
# Reconstruction log-likelihoods.
# ---------------------------------------------------------------------------
def _flatten_pair(params: Tensor, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """(B, ...) / (L, B, ...) decoder output and (B, ...) data -> (B, P) / (L, B, P) and (B, P)."""
    _check_tensor(params, name)
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"fastvae: x must have a batch dimension, got shape {tuple(x.shape)}")
    stacked = params.dim() == x.dim() + 1
    if params.shape[int(stacked) :] != x.shape or not (stacked or params.dim() == x.dim()):
        raise ValueError(
            f"fastvae: {name} must have the shape of x {tuple(x.shape)} or (num_samples, *x.shape), "
            f"got {tuple(params.shape)}"
        )
    if x.dtype != params.dtype:  # data often stays float32 while the decoder runs in bf16
        dtype = torch.promote_types(x.dtype, params.dtype)
        params, x = params.to(dtype), x.to(dtype)
    batch, pixels = x.shape[0], math.prod(x.shape[1:])
    flat_x = x.reshape(batch, pixels)
    flat_params = params.reshape(params.shape[0], batch, pixels) if stacked else params.reshape(batch, pixels)
    return flat_params, flat_x


def _capturing(t: Tensor) -> bool:
    """Whether t's CUDA stream is being captured into a CUDA graph (reading values would fail)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_unit_interval(flat_x: Tensor, likelihood: str) -> None:
    """Raise unless every x lies in [0, 1] (one pass over x; skipped while compiling or capturing a CUDA graph)."""
    if flat_x.numel() and not torch.compiler.is_compiling() and not _capturing(flat_x):
        low, high = torch.aminmax(flat_x.detach())
        if not (0.0 <= float(low) and float(high) <= 1.0):
            raise ValueError(
                f"fastvae: x must lie in [0, 1] for a {likelihood} likelihood, "
                f"got values in [{float(low)}, {float(high)}]"
            )


def _second_param(value: Tensor | float, params: Tensor, decoder_output: Tensor, name: str):
    """A second per-element parameter given as a tensor broadcastable to the decoder output, or
    one float: (tensor flattened like params, or None; the float) as the two-parameter ops take them."""
    if isinstance(value, Tensor):
        _check_tensor(value, name)
        try:
            expanded = value.to(decoder_output.dtype).expand_as(decoder_output)
        except RuntimeError as exc:
            raise ValueError(
                f"fastvae: {name} of shape {tuple(value.shape)} does not broadcast to the shape "
                f"{tuple(decoder_output.shape)} of the decoder output"
            ) from exc
        return expanded.reshape(params.shape).to(params.dtype), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastvae: {name} must be a float or a tensor, got {type(value).__name__}")
    return None, float(value)


def bernoulli_log_likelihood(logits: Tensor, x: Tensor, *, check_range: bool = True) -> Tensor:
    """sum over pixels of log Bernoulli(x | sigmoid(logits)), per row: (B,) or (L, B).

    x must lie in [0, 1] (binary data, or intensities for the continuous relaxation);
    check_range=False skips that check (one pass over x). It is skipped under torch.compile
    and while a CUDA graph is being captured, where no value can be read back.
    """
    params, flat_x = _flatten_pair(logits, x, "logits")
    if check_range:
        _check_unit_interval(flat_x, "Bernoulli")
    return _bernoulli_op(params, flat_x)


def gaussian_log_likelihood(mean: Tensor, x: Tensor, logvar: Tensor | float = 0.0) -> Tensor:
    """sum over pixels of log N(x | mean, exp(logvar)), per row: (B,) or (L, B).

    logvar: one float for every pixel, or a tensor broadcastable to mean's shape
    (e.g. a learned per-pixel log-variance of shape x.shape[1:]).
    """
    params, flat_x = _flatten_pair(mean, x, "mean")
    return _gaussian_op(params, flat_x, *_second_param(logvar, params, mean, "logvar"))


def continuous_bernoulli_log_likelihood(logits: Tensor, x: Tensor, *, check_range: bool = True) -> Tensor:
    """sum over pixels of log ContinuousBernoulli(x | logits), per row: (B,) or (L, B).

    The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) is the normalized density
    C(lambda) lambda^x (1 - lambda)^(1 - x) on x in [0, 1], lambda = sigmoid(logits): the
    proper likelihood for grey levels that a Bernoulli only relaxes. Computed from the
    logits, exact at every logit (near logit 0, where lambda = 1/2, and at +-100 alike),
    unlike torch.distributions.ContinuousBernoulli, which clamps lambda. The gradient
    flows to logits, and to x when x requires it. check_range=False skips the [0, 1]
    check of x (one pass over x).
    """
    params, flat_x = _flatten_pair(logits, x, "logits")
    if check_range:
        _check_unit_interval(flat_x, "continuous Bernoulli")
    return _continuous_bernoulli_op(params, flat_x)


def discretized_logistic_log_likelihood(
    mean: Tensor, log_scale: Tensor | float, x: Tensor, *, check_range: bool = True
) -> Tensor:
    """sum over pixels of log DiscretizedLogistic(x | mean, exp(log_scale)), per row: (B,) or (L, B).

    For 8-bit images (Salimans et al. 2017, Kingma et al. 2016) in fastvae's convention:
    x in [0, 1] holds the levels k/255 (fastvae.data's float images). Each level owns the
    mass of logistic(mean, exp(log_scale)) on the bin of width 1/255 centred on it; x = 0
    also takes all the mass below its bin and x = 1 all the mass above, so the 256 levels
    carry probability 1. mean and log_scale are in the units of x. Exact in every
    regime (log-sigmoid forms; no mid-bin density fallback). log_scale: a tensor
    broadcastable to mean's shape, or one float. Models usually bound it from below
    (PixelCNN++ uses -7); the op takes it as given. check_range=False skips the [0, 1]
    check of x (one pass over x). Divide by -num_dims * ln 2 for bits per dimension
    (nats_to_bits_per_dim).
    """
    params, flat_x = _flatten_pair(mean, x, "mean")
    if check_range:
        _check_unit_interval(flat_x, "discretized logistic")
    return _discretized_logistic_op(params, flat_x, *_second_param(log_scale, params, mean, "log_scale"))


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Bits per dimension of a negative log-likelihood given in nats: nats / (num_dims * ln 2).

    nats: -log p(x) (or the negative ELBO, an upper bound on it) per example, e.g.
    -discretized_logistic_log_likelihood(...) or -elbo; num_dims: the dimensions of one
    example (3 * 32 * 32 for a CIFAR-10 image). Image papers report this figure.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"fastvae: num_dims must be a positive int, got {num_dims!r}")
    return nats / (num_dims * math.log(2.0))


# ---------------------------------------------------------------------------
# The fused decoder head: output layer + likelihood in one op.
# ---------------------------------------------------------------------------
def fused_head_log_likelihood(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    x: Tensor,
    likelihood: str = "bernoulli",
    logvar: float = 0.0,
    *,
    precompute_grads: bool = False,
    check_range: bool = True,
) -> Tensor:
    """log p(x | h W^T + b) summed over pixels, per row: (B,) or (L, B).

    h: the decoder's last hidden layer, (B, H) or (L, B, H); weight (k*P, H) and bias (k*P,)
    (or None): its output layer, an nn.Linear's parameters; x: the data, (B, ...) with P
    elements per example. likelihood: "bernoulli" (the layer gives logits), "gaussian" (means,
    fixed log-variance `logvar`) or "gaussian_learned" (k = 2: P means, then P log-variances).
    The same numbers as the likelihood functions on the layer's output, without ever holding
    the (L, B, k*P) output or its gradient: rows are processed in cache-sized chunks, and the
    backward recomputes a chunk's output from the saved h. x is data: no gradient flows to it.

    precompute_grads=True computes the gradients in the forward (for an incoming gradient of 1
    per row) and scales them in the backward when the incoming gradient is the same for every
    row, as for a loss that averages the rows (the analytic and Monte Carlo ELBOs); one GEMM less
    than recomputing. Otherwise (IWAE's weights differ per row) the backward recomputes anyway.
    It applies on CPU in eager mode only (the check reads the incoming gradient on the host).
    """
    _check_tensor(h, "h")
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"fastvae: x must have a batch dimension, got shape {tuple(x.shape)}")
    flat_x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if flat_x.dtype != h.dtype:  # data often stays float32 while the decoder runs in bf16
        dtype = torch.promote_types(flat_x.dtype, h.dtype)
        h, weight, flat_x = h.to(dtype), weight.to(dtype), flat_x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if likelihood == "bernoulli" and check_range:
        _check_unit_interval(flat_x, "Bernoulli")
    if isinstance(logvar, bool) or not isinstance(logvar, (int, float)):
        raise TypeError(f"fastvae: logvar must be a float, got {type(logvar).__name__}")
    precompute = bool(precompute_grads) and not torch.compiler.is_compiling()
    return _fused_head_op(h, weight, bias, flat_x, likelihood, float(logvar), precompute)
