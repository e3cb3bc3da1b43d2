"""Which backend runs fastvae's ops, the op handles the public functions call, and the seeds.

The C++ extension fastvae._C registers torch.ops.fastvae.* when it is imported; without it
(or with FASTVAE_BACKEND=reference) every handle below runs fastvae.ops.reference with the
same checks, which gives the same numbers more slowly.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
from torch import Tensor

from . import reference
from ._checks import (
    _INT64_MAX,
    _check_gather_bernoulli,
    _check_head,
    _check_latent,
    _check_likelihood,
    _check_same,
    _check_sparse_input_linear,
    _check_tensor,
    _require,
)


def _load_extension() -> str:
    """Import fastvae._C (which registers torch.ops.fastvae) and name the backend."""
    if os.environ.get("FASTVAE_BACKEND", "").lower() == "reference":
        return "reference"
    try:
        from .. import _C  # noqa: F401  (registers the ops with the dispatcher)
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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    from .._C import draw_cpu_seed as _draw_cpu_seed
    from .._C import latent_terms_cpu_seed as _latent_terms_cpu_seed


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


# ---------------------------------------------------------------------------
# Op handles: the registered op, or its reference fallback with the same signature.
# ---------------------------------------------------------------------------
def reference_likelihood_op(name: str, param_name: str, second_name: str | None):
    """op(params, x) or op(params, x, second, second_value) computed by `reference.<name>_log_prob`."""
    reference_fn = getattr(reference, f"{name}_log_prob")

    def reference_op(params, x, *second):
        _check_likelihood(params, x, param_name)
        if second and second[0] is not None:
            _check_same(second[0], params, second_name, param_name)
        return reference_fn(params, x, *second)

    return reference_op


if _BACKEND == "cpp":
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

    def _fused_head_op(h, weight, bias, x, likelihood, logvar_value=0.0, precompute_grads=False, second_shift=0.0,
                       second_min=None):
        _check_head(h, weight, bias, x, likelihood, logvar_value, second_shift, second_min)
        _require(not (torch.is_grad_enabled() and x.requires_grad),
                 "fastvae: fused_head_log_prob does not differentiate with respect to x (it is the data)")
        return reference.fused_head_log_prob(h, weight, bias, x, likelihood, logvar_value, second_shift, second_min)


def check_fused_likelihoods(names: tuple[str, ...]) -> None:
    """Raise unless the extension was built with exactly these fused likelihoods (csrc/fastvae.h)."""
    if _BACKEND == "cpp":
        from .._C import fused_likelihoods

        if set(fused_likelihoods()) != set(names):
            raise ImportError(f"fastvae: the extension's fused likelihoods {fused_likelihoods()} are not fastvae.ops' "
                              f"{names}: it was built from other sources. {build_hint()}")
