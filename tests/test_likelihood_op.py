"""The fused reconstruction log-likelihood ops: Bernoulli from logits, Gaussian.

Tests that take `device` run on every device of tests/devices.py (CUDA where it can run).
"""

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import fastvae
from devices import CUDA_ONLY, DEVICES
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")


def data(batch=4, pixels=9, samples=None, dtype=torch.float64, seed=0, device="cpu"):
    # Drawn on the CPU whatever the device, so every device sees the same numbers.
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    params = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    x = torch.rand(batch, pixels, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return params, x


# ---------------------------------------------------------------------------
# 1. Values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("pixels", [9, 300, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_bernoulli_float64_matches_torch_distributions(samples, pixels, device):
    logits, x = data(pixels=pixels, samples=samples, device=device)
    x = torch.bernoulli(x)
    want = Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    torch.testing.assert_close(fastvae.bernoulli_log_likelihood(logits, x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("logvar_kind", ["float", "tensor", "per_pixel"])
@pytest.mark.parametrize("pixels", [9, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_float64_matches_torch_distributions(samples, logvar_kind, pixels, device):
    mean, x = data(pixels=pixels, samples=samples, device=device)
    logvar = {
        "float": -1.3,
        "tensor": 0.5 * torch.randn(mean.shape, dtype=torch.float64, device=device),
        "per_pixel": 0.5 * torch.randn(mean.shape[-1], dtype=torch.float64, device=device),
    }[logvar_kind]
    std = torch.exp(0.5 * torch.as_tensor(logvar, dtype=torch.float64, device=device))
    want = Normal(mean, std).log_prob(x.expand_as(mean)).sum(-1)
    got = fastvae.gaussian_log_likelihood(mean, x, logvar)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)])
@pytest.mark.parametrize("device", DEVICES)
def test_reduced_precision_accumulates_in_float32(dtype, tol, device):
    logits, x = data(batch=8, pixels=784, samples=2, dtype=dtype, device=device)
    got = fastvae.bernoulli_log_likelihood(logits, x)
    assert got.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    want = reference.bernoulli_log_prob(logits.double().cpu(), x.double().cpu())
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    got = fastvae.gaussian_log_likelihood(logits, x, 0.3)
    want = reference.gaussian_log_prob(logits.double().cpu(), x.double().cpu(), None, 0.3)
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_backward_keeps_the_dtype(dtype, device):
    logits, x = data(batch=4, pixels=20, dtype=dtype, device=device)
    logits.requires_grad_()
    fastvae.gaussian_log_likelihood(logits, x, -1.0).sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bernoulli_extreme_logits_stay_finite_and_exact(device):
    logits = torch.tensor([[200.0, -200.0, 30.0, -30.0]], device=device)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], device=device)
    got = fastvae.bernoulli_log_likelihood(logits, x)
    want = Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_images_are_flattened_per_example(device):
    logits = torch.randn(2, 3, 1, 5, 5, device=device)
    x = torch.rand(3, 1, 5, 5, device=device)
    got = fastvae.bernoulli_log_likelihood(logits, x)
    want = reference.bernoulli_log_prob(logits.reshape(2, 3, 25), x.reshape(3, 25))
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_data_dtype_is_promoted_to_the_decoder_dtype(device):
    logits, x = data(dtype=torch.float32, device=device)
    got = fastvae.bernoulli_log_likelihood(logits.bfloat16(), x)
    want = fastvae.bernoulli_log_likelihood(logits.bfloat16().float(), x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    logits, x = data(batch=6, pixels=10, device=device)
    logits_nc = torch.empty(10, 6, dtype=torch.float64, device=device).t().copy_(logits)
    x_nc = torch.zeros(6, 20, dtype=torch.float64, device=device)[:, ::2].copy_(x)
    assert not logits_nc.is_contiguous() and not x_nc.is_contiguous()
    torch.testing.assert_close(
        fastvae.bernoulli_log_likelihood(logits_nc, x_nc), fastvae.bernoulli_log_likelihood(logits, x.contiguous())
    )


# ---------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [None, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_bernoulli_gradcheck(samples, device):
    logits, x = data(batch=3, pixels=5, samples=samples, device=device)
    logits.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(fastvae.bernoulli_log_likelihood, (logits, x))


@pytest.mark.parametrize("samples", [None, 2])
@pytest.mark.parametrize("logvar_kind", ["float", "tensor", "per_pixel"])
@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_gradcheck(samples, logvar_kind, device):
    mean, x = data(batch=3, pixels=5, samples=samples, device=device)
    mean.requires_grad_()
    x.requires_grad_()
    if logvar_kind == "float":
        assert torch.autograd.gradcheck(lambda m, xx: fastvae.gaussian_log_likelihood(m, xx, 0.7), (mean, x))
        return
    shape = mean.shape if logvar_kind == "tensor" else mean.shape[-1:]
    logvar = (0.3 * torch.randn(shape, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(fastvae.gaussian_log_likelihood, (mean, x, logvar))


# ---------------------------------------------------------------------------
# 3. opcheck; 4. torch.compile
# ---------------------------------------------------------------------------
@requires_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(requires_grad, device):
    logits, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32, device=device)
    logits.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastvae.bernoulli_log_prob.default, (logits, x))
    logvar = torch.randn(2, 3, 5, device=device).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob.default, (logits, x, logvar, 0.0))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob.default, (logits, x, None, -0.5))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    logits, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32, device=device)
    grad = torch.randn(2, 3, device=device)
    torch.library.opcheck(torch.ops.fastvae.bernoulli_log_prob_backward.default, (grad, logits, x, True))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob_backward.default, (grad, logits, x, None, 0.1, False))
    logvar = torch.randn(2, 3, 5, device=device)
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob_backward.default, (grad, logits, x, logvar, 0.0, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def loss(logits, mean, x):
        return -(fastvae.bernoulli_log_likelihood(logits, x, check_range=False)
                 + fastvae.gaussian_log_likelihood(mean, x, -1.0)).mean()

    logits, x = data(batch=4, pixels=6, samples=2, dtype=torch.float32, device=device)
    mean = torch.randn_like(logits)
    logits.requires_grad_()
    mean.requires_grad_()
    # Inductor's CPU code generation takes minutes on a loaded machine; aot_eager traces the
    # same graph (fakes, autograd) without it.
    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
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


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_decoder_output_propagates_to_its_row(device):
    logits = torch.zeros(3, 4, device=device)
    logits[1, 0] = float("nan")
    out = fastvae.bernoulli_log_likelihood(logits, torch.ones(3, 4, device=device))
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    empty_batch = fastvae.bernoulli_log_likelihood(torch.zeros(2, 0, 4, device=device), torch.zeros(0, 4, device=device))
    assert empty_batch.shape == (2, 0)
    no_pixels = fastvae.bernoulli_log_likelihood(torch.zeros(2, 3, 0, device=device), torch.zeros(3, 0, device=device))
    assert torch.equal(no_pixels, torch.zeros(2, 3, device=device))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_call_is_validated(device):
    with pytest.raises(RuntimeError, match="logits must have shape"):
        torch.ops.fastvae.bernoulli_log_prob(torch.zeros(3, 4, device=device), torch.zeros(2, 4, device=device))
    with pytest.raises(RuntimeError, match="logvar must have the shape of mean"):
        torch.ops.fastvae.gaussian_log_prob(torch.zeros(3, 4, device=device), torch.zeros(3, 4, device=device),
                                            torch.zeros(4, device=device), 0.0)


@requires_cpp
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cpu_and_cuda_tensors_mixed_raise(device):
    logits, x = data(batch=3, pixels=5, dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.bernoulli_log_prob(logits, x.cpu())
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.bernoulli_log_prob_backward(torch.zeros(3), logits, x, False)
    with pytest.raises(RuntimeError, match="same device|is on"):
        fastvae.gaussian_log_likelihood(logits, x.cpu(), -1.0)


@requires_cpp
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_graph_capture_skips_the_range_check(device):
    # The [0, 1] check reads values back, which a capture forbids; a captured call must work.
    logits, x = data(batch=4, pixels=9, dtype=torch.float32, device=device)
    x = x.round()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fastvae.bernoulli_log_likelihood(logits, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastvae.bernoulli_log_likelihood(logits, x)
    graph.replay()
    torch.testing.assert_close(out, fastvae.bernoulli_log_likelihood(logits, x))
