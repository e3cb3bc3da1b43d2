"""The fused reconstruction log-likelihood ops: Bernoulli from logits, Gaussian."""

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import fastvae
from fastvae import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")


def data(batch=4, pixels=9, samples=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    params = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    x = torch.rand(batch, pixels, generator=gen, dtype=torch.float64).to(dtype)
    return params, x


# ---------------------------------------------------------------------------
# 1. Values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [None, 3])
def test_bernoulli_float64_matches_torch_distributions(samples):
    logits, x = data(samples=samples)
    x = torch.bernoulli(x)
    want = Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    torch.testing.assert_close(fastvae.bernoulli_log_likelihood(logits, x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("logvar_kind", ["float", "tensor", "per_pixel"])
def test_gaussian_float64_matches_torch_distributions(samples, logvar_kind):
    mean, x = data(samples=samples)
    logvar = {
        "float": -1.3,
        "tensor": 0.5 * torch.randn(mean.shape, dtype=torch.float64),
        "per_pixel": 0.5 * torch.randn(mean.shape[-1], dtype=torch.float64),
    }[logvar_kind]
    std = torch.exp(0.5 * torch.as_tensor(logvar, dtype=torch.float64))
    want = Normal(mean, std).log_prob(x.expand_as(mean)).sum(-1)
    got = fastvae.gaussian_log_likelihood(mean, x, logvar)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)])
def test_reduced_precision_accumulates_in_float32(dtype, tol):
    logits, x = data(batch=8, pixels=784, samples=2, dtype=dtype)
    got = fastvae.bernoulli_log_likelihood(logits, x)
    assert got.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    want = reference.bernoulli_log_prob(logits.double(), x.double())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    got = fastvae.gaussian_log_likelihood(logits, x, 0.3)
    want = reference.gaussian_log_prob(logits.double(), x.double(), None, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_bernoulli_extreme_logits_stay_finite_and_exact():
    logits = torch.tensor([[200.0, -200.0, 30.0, -30.0]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    got = fastvae.bernoulli_log_likelihood(logits, x)
    want = Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)


def test_images_are_flattened_per_example():
    logits = torch.randn(2, 3, 1, 5, 5)
    x = torch.rand(3, 1, 5, 5)
    got = fastvae.bernoulli_log_likelihood(logits, x)
    want = reference.bernoulli_log_prob(logits.reshape(2, 3, 25), x.reshape(3, 25))
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_data_dtype_is_promoted_to_the_decoder_dtype():
    logits, x = data(dtype=torch.float32)
    got = fastvae.bernoulli_log_likelihood(logits.bfloat16(), x)
    want = fastvae.bernoulli_log_likelihood(logits.bfloat16().float(), x)
    torch.testing.assert_close(got, want)


def test_non_contiguous_inputs():
    logits, x = data(batch=6, pixels=10)
    logits_nc = torch.empty(10, 6, dtype=torch.float64).t().copy_(logits)
    x_nc = torch.zeros(6, 20, dtype=torch.float64)[:, ::2].copy_(x)
    assert not logits_nc.is_contiguous() and not x_nc.is_contiguous()
    torch.testing.assert_close(
        fastvae.bernoulli_log_likelihood(logits_nc, x_nc), fastvae.bernoulli_log_likelihood(logits, x.contiguous())
    )


# ---------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [None, 2])
def test_bernoulli_gradcheck(samples):
    logits, x = data(batch=3, pixels=5, samples=samples)
    logits.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(fastvae.bernoulli_log_likelihood, (logits, x))


@pytest.mark.parametrize("samples", [None, 2])
@pytest.mark.parametrize("logvar_kind", ["float", "tensor", "per_pixel"])
def test_gaussian_gradcheck(samples, logvar_kind):
    mean, x = data(batch=3, pixels=5, samples=samples)
    mean.requires_grad_()
    x.requires_grad_()
    if logvar_kind == "float":
        assert torch.autograd.gradcheck(lambda m, xx: fastvae.gaussian_log_likelihood(m, xx, 0.7), (mean, x))
        return
    shape = mean.shape if logvar_kind == "tensor" else mean.shape[-1:]
    logvar = (0.3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(fastvae.gaussian_log_likelihood, (mean, x, logvar))


# ---------------------------------------------------------------------------
# 3. opcheck; 4. torch.compile
# ---------------------------------------------------------------------------
@requires_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    logits, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32)
    logits.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastvae.bernoulli_log_prob.default, (logits, x))
    logvar = torch.randn(2, 3, 5).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob.default, (logits, x, logvar, 0.0))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob.default, (logits, x, None, -0.5))


@requires_cpp
def test_opcheck_backward_ops():
    logits, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32)
    grad = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.fastvae.bernoulli_log_prob_backward.default, (grad, logits, x, True))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob_backward.default, (grad, logits, x, None, 0.1, False))


def test_torch_compile_fullgraph():
    def loss(logits, mean, x):
        return -(fastvae.bernoulli_log_likelihood(logits, x, check_range=False)
                 + fastvae.gaussian_log_likelihood(mean, x, -1.0)).mean()

    logits, x = data(batch=4, pixels=6, samples=2, dtype=torch.float32)
    mean = torch.randn_like(logits)
    logits.requires_grad_()
    mean.requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(logits, mean, x)
    torch.testing.assert_close(got, loss(logits, mean, x))
    g_got = torch.autograd.grad(got, (logits, mean))
    g_want = torch.autograd.grad(loss(logits, mean, x), (logits, mean))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# 5. Bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,x,error,match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), ValueError, "must have the shape of x"),
        (torch.zeros(2, 2, 3, 4), torch.zeros(3, 4), ValueError, "must have the shape of x"),
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int64), RuntimeError, "floating-point"),
        (torch.zeros(3, 4, dtype=torch.complex64), torch.zeros(3, 4), RuntimeError, "floating-point"),
        (torch.zeros(3, 4), torch.full((3, 4), 2.0), ValueError, r"x must lie in \[0, 1\]"),
        (torch.zeros(3, 4), "x", TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bernoulli_bad_inputs(params, x, error, match):
    with pytest.raises(error, match=match):
        fastvae.bernoulli_log_likelihood(params, x)


def test_gaussian_bad_logvar():
    mean, x = torch.zeros(3, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        fastvae.gaussian_log_likelihood(mean, x, torch.zeros(5))
    with pytest.raises(TypeError, match="logvar must be a float or a tensor"):
        fastvae.gaussian_log_likelihood(mean, x, "0")


def test_nan_in_decoder_output_propagates_to_its_row():
    logits = torch.zeros(3, 4)
    logits[1, 0] = float("nan")
    out = fastvae.bernoulli_log_likelihood(logits, torch.ones(3, 4))
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_empty_batch():
    assert fastvae.bernoulli_log_likelihood(torch.zeros(2, 0, 4), torch.zeros(0, 4)).shape == (2, 0)


@requires_cpp
def test_direct_op_call_is_validated():
    with pytest.raises(RuntimeError, match="logits must have shape"):
        torch.ops.fastvae.bernoulli_log_prob(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="logvar must have the shape of mean"):
        torch.ops.fastvae.gaussian_log_prob(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4), 0.0)
