"""The checks every fused likelihood op passes, written once, as torchvision's test_ops.py
writes its RoIOpTester once for all its RoI ops.

A likelihood's own test file declares its case by subclassing LikelihoodOpTester in a class
named Test...Op, and keeps beside it only what is its own (exactness at the extremes,
normalization, its comparison with torch.distributions):

    class TestBernoulliOp(LikelihoodOpTester):
        name, param, range_name = "bernoulli", "logits", "Bernoulli"

        def draw(self, gen, params_shape, x_shape):
            return 3 * normal(gen, params_shape), uniform(gen, x_shape), None

`name` spells the likelihood as fastvae.ops does: the public fastvae.NAME_log_likelihood, the
ops torch.ops.fastvae.NAME_log_prob and NAME_log_prob_backward, fastvae.ops.reference.NAME_log_prob.
Each test method runs on every device of tests/devices.py; where the likelihood has a second
parameter (`second`, e.g. "logvar"), on each of the forms a user can give it (SECOND_FORMS).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import fastvae
from devices import CUDA_ONLY, DEVICES
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")

# A second parameter, as the public functions take it: one float for every element, a tensor
# shaped like the decoder output, or one value per pixel broadcast over the batch.
SECOND_FORMS = ("float", "tensor", "per_pixel")
# As the ops take it: (None, the float) or (a tensor shaped like the decoder output, 0.0).
OP_SECOND_FORMS = ("float", "tensor")
REDUCED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def normal(gen: torch.Generator, shape) -> Tensor:
    """Standard normal draws, float64 on the CPU (every device then sees the same numbers)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def uniform(gen: torch.Generator, shape) -> Tensor:
    """Uniform draws on [0, 1), float64 on the CPU."""
    return torch.rand(shape, generator=gen, dtype=torch.float64)


class Inputs(NamedTuple):
    """The public function's arguments: decoder output (B, ...) or (L, B, ...), data (B, ...), and
    the second parameter (a tensor, a float, or None for a one-parameter likelihood)."""

    params: Tensor
    x: Tensor
    second: Tensor | float | None


class LikelihoodOpTester:
    """The test family of one fused likelihood op; subclasses declare the case (see the module docstring)."""

    name: str  # "bernoulli"
    param: str  # the decoder output's argument name: "logits", "mean"
    second: str | None = None  # the second parameter's argument name: "logvar", "log_scale"
    second_value = -1.5  # the second parameter's "float" form
    range_name: str | None = None  # x must lie in [0, 1]: the likelihood as its error names it
    # The tolerances, by dtype (values: rtol = atol; gradients: (rtol, atol)); a case overrides
    # what its numbers need.
    value_tol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
    gradient_tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}
    distributions_tol = (1e-10, 1e-12)  # (rtol, atol) against torch.distributions, float64

    def draw(self, gen: torch.Generator, params_shape, x_shape) -> tuple[Tensor, Tensor, Tensor | None]:
        """(decoder output, data, second parameter shaped like the decoder output or None), float64 on the CPU."""
        raise NotImplementedError

    def distributions_log_prob(self, inputs: Inputs) -> tuple[Inputs, Tensor]:
        """(inputs on which torch.distributions keeps its digits, its log p(x) per row there)."""
        raise NotImplementedError

    def loss_of(self, log_likelihood: Tensor, x: Tensor) -> Tensor:
        """The scalar a training step would differentiate (torch.compile is tested on it)."""
        return -log_likelihood.mean()

    # -- the case's ops and data ---------------------------------------------------------
    def pytest_generate_tests(self, metafunc):
        for argument, forms in {"second_form": SECOND_FORMS, "op_form": OP_SECOND_FORMS}.items():
            if argument in metafunc.fixturenames:
                values = self.forms(forms)
                metafunc.parametrize(argument, values, ids=[str(v) for v in values])
        if "bad_input" in metafunc.fixturenames:
            cases = self.bad_inputs()
            metafunc.parametrize("bad_input", list(cases.values()), ids=list(cases))

    def forms(self, forms: tuple[str, ...]) -> list[str | None]:
        """The forms of the second parameter to test: `forms`, or [None] for a one-parameter likelihood."""
        return list(forms) if self.second else [None]

    def op(self, backward: bool = False):
        suffix = "_log_prob_backward" if backward else "_log_prob"
        return getattr(torch.ops.fastvae, self.name + suffix).default

    def log_likelihood(self, inputs: Inputs, **options) -> Tensor:
        """The public function on `inputs`; options: check_range, where the likelihood has it."""
        if not self.range_name:
            options.pop("check_range", None)
        if self.second:
            options[self.second] = inputs.second
        return getattr(fastvae, self.name + "_log_likelihood")(inputs.params, x=inputs.x, **options)

    def sample_inputs(self, device, x_shape=(4, 9), samples=None, dtype=torch.float64, second_form="tensor",
                      seed=0) -> Inputs:
        """Inputs for a batch of data shaped x_shape (samples: the decoder's leading sample dimension;
        second_form: one of SECOND_FORMS, ignored by a one-parameter likelihood)."""
        gen = torch.Generator().manual_seed(seed)
        batch, pixels = x_shape[0], math.prod(x_shape[1:])
        flat_shape = (batch, pixels) if samples is None else (samples, batch, pixels)
        params, x, second = self.draw(gen, flat_shape, (batch, pixels))
        params_shape = flat_shape[:-1] + tuple(x_shape[1:])
        cast = dict(device=device, dtype=dtype)
        if second is not None:  # a two-parameter likelihood: its second parameter in the form asked for
            forms = {"float": lambda: self.second_value,
                     "tensor": lambda: second.reshape(params_shape).to(**cast),
                     "per_pixel": lambda: second.reshape(-1, pixels)[0].reshape(x_shape[1:]).to(**cast)}
            second = forms[second_form]()
        return Inputs(params.reshape(params_shape).to(**cast), x.reshape(x_shape).to(**cast), second)

    def op_args(self, inputs: Inputs) -> tuple:
        """The op's arguments for 2-D data: (params, x) or (params, x, second tensor or None, float)."""
        if not self.second:
            return inputs.params, inputs.x
        if isinstance(inputs.second, Tensor):
            return inputs.params, inputs.x, inputs.second.expand_as(inputs.params), 0.0
        return inputs.params, inputs.x, None, inputs.second

    def reference_log_prob(self, inputs: Inputs) -> Tensor:
        """fastvae.ops.reference on `inputs`, flattened per example here, in float64 on the CPU
        (differentiable: call it on leaves that require grad)."""
        x = inputs.x.cpu().double()
        flat_x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        params = inputs.params.cpu().double()
        params = params.reshape(params.shape[: params.dim() - x.dim() + 1] + flat_x.shape[1:])
        second = inputs.second
        if isinstance(second, Tensor):
            second = second.cpu().double().expand(inputs.params.shape).reshape(params.shape)
        args = (second, 0.0) if isinstance(second, Tensor) else (None, second)
        return getattr(reference, self.name + "_log_prob")(params, flat_x, *(args if self.second else ()))

    @staticmethod
    def second_expanded(inputs: Inputs) -> Tensor:
        """The second parameter, in any form, as a tensor shaped like the decoder output."""
        params = inputs.params
        return torch.as_tensor(inputs.second, dtype=params.dtype, device=params.device).expand_as(params)

    def leaves(self, inputs: Inputs, with_x: bool = True) -> Inputs:
        """`inputs` as fresh leaves requiring grad (the data too, with_x)."""
        def leaf(t, wanted=True):
            return t.detach().clone().requires_grad_(wanted) if isinstance(t, Tensor) else t

        return Inputs(leaf(inputs.params), leaf(inputs.x, with_x), leaf(inputs.second))

    @staticmethod
    def differentiable(inputs: Inputs) -> list[Tensor]:
        return [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]

    # -- 1. values -------------------------------------------------------------------------
    @pytest.mark.parametrize("samples", [None, 3])
    @pytest.mark.parametrize("device", DEVICES)
    def test_float64_matches_the_reference_and_torch_distributions(self, device, samples, second_form):
        for pixels in (9, 300, 1000):  # rows shorter and longer than the simd loops' vectors, odd remainders
            inputs = self.sample_inputs(device, (5, pixels), samples, second_form=second_form)
            got = self.log_likelihood(inputs)
            assert got.shape == inputs.params.shape[:-1]
            tol = self.value_tol[torch.float64]
            want = self.reference_log_prob(inputs)
            torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol, msg=lambda m: f"{pixels} pixels: {m}")
            inputs, want = self.distributions_log_prob(inputs)
            rtol, atol = self.distributions_tol
            torch.testing.assert_close(self.log_likelihood(inputs), want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{pixels} pixels, torch.distributions: {m}")

    @pytest.mark.parametrize("dtype", REDUCED_DTYPES, ids=str)
    @pytest.mark.parametrize("device", DEVICES)
    def test_reduced_precision_accumulates_in_float32(self, device, dtype):
        for form in self.forms(SECOND_FORMS):
            inputs = self.leaves(self.sample_inputs(device, (8, 3 * 32 * 32), 2, dtype, form), with_x=False)
            got = self.log_likelihood(inputs)
            assert got.dtype == torch.float32
            tol = self.value_tol[dtype]
            want = self.reference_log_prob(inputs).detach()
            torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol, msg=lambda m: f"{form}: {m}")
            got.sum().backward()
            for t in self.differentiable(inputs):
                assert t.grad.dtype == dtype and torch.isfinite(t.grad).all(), form

    @pytest.mark.parametrize("samples", [None, 2])
    @pytest.mark.parametrize("device", DEVICES)
    def test_images_are_flattened_per_example(self, device, samples):
        for form in self.forms(SECOND_FORMS):
            inputs = self.sample_inputs(device, (3, 3, 4, 4), samples, second_form=form)
            got = self.log_likelihood(inputs)
            assert got.shape == inputs.params.shape[: inputs.params.dim() - 3], form
            tol = self.value_tol[torch.float64]
            want = self.reference_log_prob(inputs)
            torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol, msg=lambda m: f"{form}: {m}")

    @pytest.mark.parametrize("device", DEVICES)
    def test_data_dtype_is_promoted_to_the_decoder_dtype(self, device):
        for form in self.forms(SECOND_FORMS):
            inputs = self.sample_inputs(device, dtype=torch.float32, second_form=form)
            bf16 = inputs._replace(params=inputs.params.bfloat16())
            if isinstance(inputs.second, Tensor):
                bf16 = bf16._replace(second=inputs.second.bfloat16())
            promoted = Inputs(*(t.float() if isinstance(t, Tensor) else t for t in bf16))
            torch.testing.assert_close(self.log_likelihood(bf16), self.log_likelihood(promoted), msg=form)

    @pytest.mark.parametrize("device", DEVICES)
    def test_non_contiguous_inputs(self, device):
        def strided(t):  # the same values, column-major
            return t.t().contiguous().t() if isinstance(t, Tensor) and t.dim() == 2 else t

        for form in self.forms(SECOND_FORMS):
            inputs = self.sample_inputs(device, (6, 10), second_form=form)
            x = torch.zeros(6, 20, dtype=torch.float64, device=device)[:, ::2].copy_(inputs.x)
            scattered = Inputs(strided(inputs.params), x, strided(inputs.second))
            assert not scattered.params.is_contiguous() and not scattered.x.is_contiguous()
            torch.testing.assert_close(self.log_likelihood(scattered), self.log_likelihood(inputs), msg=form)

    # -- 2. gradients ----------------------------------------------------------------------
    @pytest.mark.parametrize("samples", [None, 2])
    @pytest.mark.parametrize("device", DEVICES)
    def test_gradcheck(self, device, samples, second_form):
        inputs = self.leaves(self.sample_inputs(device, (3, 5), samples, second_form=second_form))
        tensors = self.differentiable(inputs)

        def log_likelihood(params, x, *second):  # gradcheck's perturbations may leave [0, 1]
            return self.log_likelihood(Inputs(params, x, second[0] if second else inputs.second), check_range=False)

        assert torch.autograd.gradcheck(log_likelihood, tensors)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    @pytest.mark.parametrize("device", DEVICES)
    def test_gradients_match_the_reference(self, device, dtype, second_form):
        """The fused backward against autograd through the float64 reference, per-row weights included."""
        inputs = self.leaves(self.sample_inputs(device, (16, 200), 2, dtype, second_form))
        out = self.log_likelihood(inputs, check_range=False)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        got = torch.autograd.grad(out, self.differentiable(inputs), weights.to(out))
        cpu = self.leaves(Inputs(*(t.cpu().double() if isinstance(t, Tensor) else t for t in inputs)))
        want = torch.autograd.grad(self.reference_log_prob(cpu), self.differentiable(cpu), weights)
        rtol, atol = self.gradient_tol[dtype]
        for name, g, w in zip(("params", "x", "second"), got, want):
            torch.testing.assert_close(g.cpu().double(), w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")

    # -- 3. opcheck; 4. torch.compile ------------------------------------------------------
    @requires_cpp
    @pytest.mark.parametrize("requires_grad", [False, True])
    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(self, device, requires_grad, op_form):
        stacked, single = (self.sample_inputs(device, (3, 5), samples, torch.float32, op_form) for samples in (2, None))
        if requires_grad:
            stacked, single = self.leaves(stacked, with_x=False), self.leaves(single, with_x=False)
        torch.library.opcheck(self.op(), self.op_args(stacked))
        # The one-sample rank changes only the output's shape: its fake is checked here, and (for a
        # two-parameter likelihood, through the fakes all likelihoods share) traced end to end by
        # test_torch_compile_fullgraph; AOT dispatch costs most of opcheck's time.
        torch.library.opcheck(self.op(), self.op_args(single), test_utils="test_faketensor")

    @requires_cpp
    @pytest.mark.parametrize("needs_grad_x", [False, True])
    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck_backward_op(self, device, needs_grad_x, op_form):
        inputs = self.sample_inputs(device, (3, 5), 2, torch.float32, op_form)
        grad = torch.randn(2, 3, device=device)
        torch.library.opcheck(self.op(backward=True), (grad, *self.op_args(inputs), needs_grad_x))

    @pytest.mark.parametrize("device", DEVICES)
    def test_torch_compile_fullgraph(self, device):
        """One graph through each of the op's forms of the second parameter (a graph's compile time grows
        with every call it traces): the float form with a sample dimension, the tensor form without."""
        batches = [self.leaves(self.sample_inputs(device, (4, 6), samples, torch.float32, form, seed), with_x=False)
                   for seed, (form, samples) in enumerate(zip(self.forms(OP_SECOND_FORMS), (2, None)))]

        def loss(batches):
            return sum(self.loss_of(self.log_likelihood(b, check_range=False), b.x) for b in batches)

        # Inductor's CPU code generation takes minutes on a loaded machine; aot_eager traces the
        # same graph (fakes, autograd) without it.
        # dynamic=False: every likelihood's test compiles this same function, and a recompile would
        # otherwise trace it again with dynamic shapes, at twice the cost.
        backend = "inductor" if device == "cuda" else "aot_eager"
        compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend=backend)
        got, want = compiled(batches), loss(batches)
        torch.testing.assert_close(got, want)
        tensors = [t for b in batches for t in self.differentiable(b)]
        for g, w in zip(torch.autograd.grad(got, tensors), torch.autograd.grad(want, tensors)):
            torch.testing.assert_close(g, w)

    # -- 5. bad inputs, NaN, empty batches -------------------------------------------------
    def bad_inputs(self) -> dict[str, tuple]:
        """Arguments the public function must refuse: id -> (params, x, second, error type, message pattern)."""
        ok, p, s = torch.zeros(3, 4), self.param, self.second
        second = self.second_value if s else None
        cases = {
            "x_shape": (ok, torch.zeros(3, 5), second, ValueError, f"{p} must have the shape of x"),
            "samples_shape": (torch.zeros(2, 2, 3, 4), ok, second, ValueError, f"{p} must have the shape of x"),
            "x_without_batch": (ok[0, 0], ok[0, 0], second, ValueError, "x must have a batch dimension"),
            "int_x": (ok, torch.zeros(3, 4, dtype=torch.int64), second, RuntimeError, "x must be a floating-point"),
            "complex_params": (ok.to(torch.complex64), ok, second, RuntimeError, f"{p} must be a floating-point"),
            "params_not_a_tensor": ("params", ok, second, TypeError, f"{p} must be a torch.Tensor, got str"),
            "x_not_a_tensor": (ok, [0.5], second, TypeError, "x must be a torch.Tensor, got list"),
        }
        if self.range_name:
            in_range = rf"x must lie in \[0, 1\] for a {self.range_name} likelihood"
            cases["x_above_1"] = (ok, torch.full((3, 4), 1.5), second, ValueError, in_range)
            cases["x_below_0"] = (ok, torch.full((3, 4), -0.1), second, ValueError, in_range)
        if s:
            cases[f"{s}_not_broadcast"] = (ok, ok, torch.zeros(5), ValueError, rf"{s} of shape \(5,\) does not broadc")
            cases[f"{s}_a_string"] = (ok, ok, "0", TypeError, f"{s} must be a float or a tensor, got str")
            cases[f"{s}_int"] = (ok, ok, ok[0].long(), RuntimeError, f"{s} must be a floating-point")
        return cases

    def test_bad_inputs(self, bad_input):
        params, x, second, error, match = bad_input
        with pytest.raises(error, match=match):
            self.log_likelihood(Inputs(params, x, second))

    @requires_cpp
    @pytest.mark.parametrize("device", DEVICES)
    def test_direct_op_call_is_validated(self, device):
        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=device)

        p, s, op = self.param, self.second, self.op()
        no_second = (None, 0.0) if s else ()
        double = zeros(3, 4, dtype=torch.float64)
        calls = [
            (f"{p} must have shape", (zeros(3, 4), zeros(2, 4), *no_second)),
            (f"x has dtype Double but {p} has dtype Float", (zeros(3, 4), double, *no_second)),
        ]
        if s:
            calls.append((f"{s} must have the shape of {p}", (zeros(3, 4), zeros(3, 4), zeros(4), 0.0)))
            calls.append((f"{s} has dtype Double but {p} has dtype Float", (zeros(3, 4), zeros(3, 4), double, 0.0)))
        for match, args in calls:
            with pytest.raises(RuntimeError, match=match):
                op(*args)
        with pytest.raises(RuntimeError, match="grad must have shape"):
            self.op(backward=True)(zeros(2), zeros(3, 4), zeros(3, 4), *no_second, False)

    @pytest.mark.parametrize("device", DEVICES)
    def test_nan_propagates_to_its_row_only(self, device):
        # NaN or inf are not raised: they reach the outputs and gradients of their row alone.
        for poisoned, column in (("params", 2), ("second", 0), ("x", 3)):
            if poisoned == "second" and not self.second:
                continue
            inputs = self.leaves(self.sample_inputs(device, (3, 4)))
            with torch.no_grad():
                getattr(inputs, poisoned)[1, column] = float("nan")
            out = self.log_likelihood(inputs, check_range=False)  # the [0, 1] check refuses a NaN x
            assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), poisoned
            out.nan_to_num().sum().backward()
            for t in self.differentiable(inputs):
                assert torch.isfinite(t.grad[[0, 2]]).all(), poisoned
            if poisoned != "x":  # the gradient for x may not depend on x (the Bernoulli's is the logit)
                assert torch.isnan(getattr(inputs, poisoned).grad[1, column]), poisoned

    @pytest.mark.parametrize("device", DEVICES)
    def test_empty_batch(self, device):
        def zeros(*shape):
            return torch.zeros(shape, device=device, requires_grad=True)

        second = zeros(2, 0, 4) if self.second else None
        inputs = Inputs(zeros(2, 0, 4), zeros(0, 4), second)
        out = self.log_likelihood(inputs)
        assert out.shape == (2, 0)
        out.sum().backward()
        for t in self.differentiable(inputs):
            assert t.grad.shape == t.shape
        for params_shape in [(2, 3, 0), (3, 0)]:  # no pixels: log p = 0
            no_pixels = Inputs(zeros(*params_shape), zeros(3, 0), zeros(*params_shape) if self.second else None)
            assert torch.equal(self.log_likelihood(no_pixels), torch.zeros(params_shape[:-1], device=device))

    @requires_cpp
    @pytest.mark.parametrize("device", CUDA_ONLY)
    def test_cpu_and_cuda_tensors_mixed_raise(self, device):
        inputs = self.sample_inputs(device, (3, 5), dtype=torch.float32)
        params, x, *second = self.op_args(inputs)
        on_cpu = [(self.op(), (params, x.cpu(), *second)),
                  (self.op(backward=True), (torch.zeros(3), params, x, *second, False))]
        if self.second:
            on_cpu.append((self.op(), (params, x, second[0].cpu(), 0.0)))
        for op, args in on_cpu:
            with pytest.raises(RuntimeError, match="same device|is on"):
                op(*args)
        with pytest.raises(RuntimeError, match="same device|is on"):
            self.log_likelihood(inputs._replace(x=inputs.x.cpu()))

    @requires_cpp
    @pytest.mark.parametrize("device", CUDA_ONLY)
    def test_cuda_graph_capture(self, device):
        # The [0, 1] check reads values back, which a capture forbids: a captured call skips it.
        inputs = self.sample_inputs(device, (4, 9), dtype=torch.float32)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.log_likelihood(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.log_likelihood(inputs)
        graph.replay()
        torch.testing.assert_close(out, self.log_likelihood(inputs))
