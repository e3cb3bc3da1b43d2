"""The public functional API of fastvae's fused ops.

    latent_terms(mu, logvar, num_samples=None)   -> LatentTerms(z, kl, log_q, log_p)
    reparameterize(mu, logvar, num_samples=None) -> z
    gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None) -> kl (to N(0, I) without a prior)
    gaussian_log_prob(z, mu, logvar)             -> log N(z; mu, e^logvar) per row
    mixture_log_prob(z, means, logvars, log_weights=None) -> log of a K-component mixture per row
    bernoulli_log_likelihood(logits, x)          -> log p(x|z) per row
    gaussian_log_likelihood(mean, x, logvar=0.0) -> log p(x|z) per row
    continuous_bernoulli_log_likelihood(logits, x)          -> log p(x|z) per row
    discretized_logistic_log_likelihood(mean, log_scale, x) -> log p(x|z) per row
    nats_to_bits_per_dim(nats, num_dims)         -> bits per dimension
    fused_head_log_likelihood(h, weight, bias, x, likelihood) -> the same from the decoder's last
                                                 hidden layer (output layer fused in), any of FUSED_LIKELIHOODS

Shapes: mu, logvar are (B, D). With num_samples=None one sample is drawn and
z is (B, D), log_q and log_p are (B,); with num_samples=L they are (L, B, D) and
(L, B). kl is (B,). Decoder outputs are (B, ...) or (L, B, ...) against x of
shape (B, ...). Every returned log-density is summed over the data or latent
dimensions, in nats, per example: nothing is averaged here.

The ops run in the C++/CUDA extension (torch.ops.fastvae.*) when it is built,
and in fastvae.ops.reference (pure PyTorch, same numbers, slower) otherwise.
This package is split along those seams: ._backend loads the extension, picks each
op's handle (the registered op or its reference fallback) and draws seeds; ._checks
holds the argument checks the fakes and the fallback share; ._fakes registers the
fake (meta) implementations torch.compile uses; ._priors holds the prior ops (their
checks and fakes beside them); this file is the public API.

One spelling per fused likelihood: NAME (e.g. "discretized_logistic") is its traits' kName in
csrc/fastvae.h, its ops fastvae::NAME_log_prob(_backward), reference.NAME_log_prob, NAME_log_likelihood
here ("log prob" of the distribution, "log likelihood" of the decoder's output given the data), the
fused head's likelihood="NAME", and its declaration's name and fused_head in fastvae.models.likelihoods
("gaussian_learned" names the op it uses, "gaussian"). One _likelihood_op line beside its function each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _fakes  # registers the fakes torch.compile uses
from . import reference  # noqa: F401  (fastvae.ops.reference: the pure-PyTorch implementation)
from ._backend import (  # noqa: F401  (backend(), build_hint, source_tree, draw_seed are public)
    _direct_cpu_call_ok,
    _fused_head_op,
    _gather_bernoulli_op,
    _latent_from_generator_op,
    _latent_op,
    _latent_terms_cpu_seed,
    _sparse_input_linear_op,
    backend,
    build_hint,
    check_fused_likelihoods,
    cuda_kernels_built,
    draw_seed,
    reference_likelihood_op,
    source_tree,
)
from ._checks import _FUSED, FusedLikelihood, _check_float, _check_int, _check_tensor, _head_likelihood
from ._priors import gaussian_kl, gaussian_log_prob, mixture_log_prob  # noqa: F401  (priors beyond N(0, I))

class LatentTerms(NamedTuple):
    z: Tensor       # (B, D) or (L, B, D)
    kl: Tensor      # (B,): KL(q(z|x) || N(0, I)), analytic
    log_q: Tensor   # (B,) or (L, B): log q(z|x)
    log_p: Tensor   # (B,) or (L, B): log p(z) under N(0, I)


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


def _check_unit_interval(flat_x: Tensor, name: str) -> None:
    """Raise unless x lies in [0, 1] where likelihood `name` needs it (one pass; not while compiling/capturing)."""
    words = _FUSED[name].unit_interval
    if words and flat_x.numel() and not torch.compiler.is_compiling() and not _capturing(flat_x):
        low, high = torch.aminmax(flat_x.detach())
        if not (0.0 <= float(low) and float(high) <= 1.0):
            raise ValueError(
                f"fastvae: x must lie in [0, 1] for a {words} likelihood, "
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


def _likelihood_op(name: str, param_name: str, second_name: str | None = None, unit_interval: str | None = None):
    """Declares fused likelihood `name` (csrc/fastvae.h, kName), also for the fused head, and
    returns the handle of its op fastvae::<name>_log_prob, with its fakes registered.

    One parameter: op(params, x). Two: op(params, x, second, second_value), the second
    parameter a tensor shaped like params or None and one float for every element.
    unit_interval: the words naming it when x must lie in [0, 1] ("Bernoulli"), else None.
    Without the extension, the same signature runs `reference.<name>_log_prob`.
    """
    _FUSED[name] = FusedLikelihood(param_name, second_name, unit_interval)
    if backend() != "cpp":
        return reference_likelihood_op(name, param_name, second_name)
    _fakes.register_likelihood_fakes(name, param_name, second_name)
    return getattr(torch.ops.fastvae, f"{name}_log_prob").default


_bernoulli_op = _likelihood_op("bernoulli", "logits", unit_interval="Bernoulli")


def bernoulli_log_likelihood(logits: Tensor, x: Tensor, *, check_range: bool = True) -> Tensor:
    """sum over pixels of log Bernoulli(x | sigmoid(logits)), per row: (B,) or (L, B).

    x must lie in [0, 1] (binary data, or intensities for the continuous relaxation);
    check_range=False skips that check (one pass over x). It is skipped under torch.compile
    and while a CUDA graph is being captured, where no value can be read back.
    """
    params, flat_x = _flatten_pair(logits, x, "logits")
    if check_range:
        _check_unit_interval(flat_x, "bernoulli")
    return _bernoulli_op(params, flat_x)


_gaussian_op = _likelihood_op("gaussian", "mean", "logvar")


def gaussian_log_likelihood(mean: Tensor, x: Tensor, logvar: Tensor | float = 0.0) -> Tensor:
    """sum over pixels of log N(x | mean, exp(logvar)), per row: (B,) or (L, B).

    logvar: one float for every pixel, or a tensor broadcastable to mean's shape
    (e.g. a learned per-pixel log-variance of shape x.shape[1:]).
    """
    params, flat_x = _flatten_pair(mean, x, "mean")
    return _gaussian_op(params, flat_x, *_second_param(logvar, params, mean, "logvar"))


_continuous_bernoulli_op = _likelihood_op("continuous_bernoulli", "logits", unit_interval="continuous Bernoulli")


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
        _check_unit_interval(flat_x, "continuous_bernoulli")
    return _continuous_bernoulli_op(params, flat_x)


_discretized_logistic_op = _likelihood_op("discretized_logistic", "mean", "log_scale", "discretized logistic")


def discretized_logistic_log_likelihood(
    mean: Tensor, log_scale: Tensor | float, x: Tensor, *, check_range: bool = True
) -> Tensor:
    """sum over pixels of log DiscretizedLogistic(x | mean, exp(log_scale)), per row: (B,) or (L, B).

    For 8-bit images (Salimans et al. 2017, Kingma et al. 2016) in fastvae's convention:
    x in [0, 1] holds the levels k/255 (fastvae.io.data's float images). Each level owns the
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
        _check_unit_interval(flat_x, "discretized_logistic")
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
# Every fused likelihood (one per _likelihood_op line above), each of which has the fused head.
FUSED_LIKELIHOODS: tuple[str, ...] = tuple(_FUSED)
check_fused_likelihoods(FUSED_LIKELIHOODS)


def fused_head_log_likelihood(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    x: Tensor,
    likelihood: str = "bernoulli",
    logvar: float = 0.0,
    *,
    second_shift: float = 0.0,
    second_min: float | None = None,
    precompute_grads: bool = False,
    check_range: bool = True,
) -> Tensor:
    """log p(x | h W^T + b) summed over pixels, per row: (B,) or (L, B).

    h: the decoder's last hidden layer, (B, H) or (L, B, H); weight (k*P, H) and bias (k*P,)
    (or None): its output layer, an nn.Linear's parameters; x: the data, (B, ...) with P
    elements per example. likelihood: any of FUSED_LIKELIHOODS ("bernoulli", "gaussian",
    "continuous_bernoulli", "discretized_logistic"); the layer gives its parameter (k = 1; a
    two-parameter likelihood then takes `logvar` as its second parameter for every element),
    or, for a two-parameter likelihood, P first parameters then P raw outputs r of the second
    (k = 2, parameter-major as a decoder emits them), which is max(r + second_shift, second_min)
    (None: unbounded); "gaussian_learned" names "gaussian" with k = 2. The same numbers as the
    likelihood functions on the layer's output (decoded as Decoder.to_output does), without ever holding
    the (L, B, k*P) output or its gradient: rows are processed in cache-sized chunks, and the
    backward recomputes a chunk's output from the saved h. x is data: no gradient flows to it.

    precompute_grads=True computes the gradients in the forward (for an incoming gradient of 1
    per row) and scales them in the backward when the incoming gradient is the same for every
    row, as for a loss that averages the rows (the analytic and Monte Carlo ELBOs); one GEMM less
    than recomputing. Otherwise (IWAE's weights differ per row) the backward recomputes anyway.
    It applies on CPU in eager mode only (the check reads the incoming gradient on the host).
    check_range=False skips the [0, 1] check of x (the likelihoods declared with unit_interval).
    """
    _check_tensor(h, "h")
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"fastvae: x must have a batch dimension, got shape {tuple(x.shape)}")
    flat_x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    likelihood = _head_likelihood(likelihood, weight, flat_x.shape[1], h.shape[-1])
    if flat_x.dtype != h.dtype:  # data often stays float32 while the decoder runs in bf16
        dtype = torch.promote_types(flat_x.dtype, h.dtype)
        h, weight, flat_x = h.to(dtype), weight.to(dtype), flat_x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if check_range:
        _check_unit_interval(flat_x, likelihood)
    second_min = None if second_min is None else _check_float(second_min, "second_min")
    precompute = bool(precompute_grads) and not torch.compiler.is_compiling()
    return _fused_head_op(h, weight, bias, flat_x, likelihood, _check_float(logvar, "logvar"), precompute,
                          _check_float(second_shift, "second_shift"), second_min)
