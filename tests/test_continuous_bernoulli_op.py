"""The fused continuous Bernoulli log-likelihood (fastvae.continuous_bernoulli_log_likelihood).

Values are checked against torch.distributions.ContinuousBernoulli where it keeps 1e-9
(|logit| <= 15: it works from the probability, whose rounding costs it about
1e-16 * e^|logit| / |logit| nats, 3e-7 at 29, and beyond about 36 it clamps the probability
and drifts by about a nat at +-100), and against high-precision values from mpmath at every
logit, near 0 and at +-100.
"""

import math

import mpmath
import pytest
import torch
from torch.distributions import ContinuousBernoulli

import fastvae
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
# The fallback backend's gradients are autograd's through fastvae.ops.reference: good to ~1e-14
# (float64) and ~3e-6 (float32), not to the rounding of the fused backward checked here.
fused_gradients = pytest.mark.skipif(fastvae.backend() != "cpp", reason="checks the fused backward's rounding")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

# Logits where something changes: 0 (lambda = 1/2), tiny, the series/closed-form switch
# at |logit| = 0.5 (csrc/fastvae.h, kSeriesCutoff), where torch's clamping starts, +-100.
SPECIAL_LOGITS = [0.0, 1e-12, 1e-8, 1e-4, 0.01, 0.1, 0.4999999, 0.5, 0.5000001, 0.7, 1.0, 2.0, 5.0, 17.0,
                  30.0, 36.0, 50.0, 88.0, 100.0]
SPECIAL_LOGITS = sorted({s * v for v in SPECIAL_LOGITS for s in (1, -1)})
SPECIAL_X = [0.0, 1e-3, 0.25, 0.5, 0.75, 1.0]


def exact_log_prob(logit: float, x: float) -> float:
    """log C(eta) + x*eta - log(1 + e^eta), C(eta) = eta / tanh(eta/2), to 60 digits."""
    with mpmath.workdps(60):
        eta, xm = mpmath.mpf(logit), mpmath.mpf(x)
        log_c = mpmath.log(2) if eta == 0 else mpmath.log(eta / mpmath.tanh(eta / 2))
        return float(xm * eta - mpmath.log1p(mpmath.exp(eta)) + log_c)


def exact_grad_logit(logit: float, x: float) -> float:
    """x - E[x], E[x] = 1/(1 - e^-eta) - 1/eta (1/2 at eta = 0), to 60 digits."""
    with mpmath.workdps(60):
        eta = mpmath.mpf(logit)
        mean = mpmath.mpf(0.5) if eta == 0 else 1 / (1 - mpmath.exp(-eta)) - 1 / eta
        return float(mpmath.mpf(x) - mean)


def special_grid(dtype=torch.float64, device="cpu"):
    """Every special logit against every special x, one element per row: (N, 1) each."""
    pairs = [(eta, x) for eta in SPECIAL_LOGITS for x in SPECIAL_X]
    logits = torch.tensor([[eta] for eta, _ in pairs], dtype=dtype, device=device)
    x = torch.tensor([[x] for _, x in pairs], dtype=dtype, device=device)
    return pairs, logits, x


def data(batch=4, pixels=9, samples=None, dtype=torch.float64, device="cpu", scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    logits = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    x = torch.rand(batch, pixels, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return logits, x


# ---------------------------------------------------------------------------
# 1. Values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [None, 3])
def test_float64_matches_torch_distributions(device, samples):
    logits, x = data(batch=5, pixels=40, samples=samples, device=device, scale=6.0)
    logits = logits.clamp(-15.0, 15.0)
    want = ContinuousBernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    got = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_exact_at_every_logit(device):
    pairs, logits, x = special_grid(device=device)
    got = fastvae.continuous_bernoulli_log_likelihood(logits, x).cpu()
    want = torch.tensor([exact_log_prob(eta, xv) for eta, xv in pairs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=4e-16, atol=4e-16)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_is_accurate_at_every_logit(device):
    pairs, logits, x = special_grid(dtype=torch.float32, device=device)
    got = fastvae.continuous_bernoulli_log_likelihood(logits, x).cpu().double()
    # The exact value of the float32 inputs (0.1 is not a float32), compared to float32 rounding.
    want = torch.tensor([exact_log_prob(float(e), float(xv)) for e, xv in zip(logits.cpu(), x.cpu())],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=3e-7, atol=3e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_sweep_matches_float64(device):
    """A dense sweep of logits over [-120, 120] (every code path, both signs) in float32."""
    logits64 = torch.linspace(-120.0, 120.0, 24001, dtype=torch.float64).reshape(-1, 1)
    logits64 = torch.cat([logits64, torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64).reshape(-1, 1)])
    x64 = torch.rand(logits64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits32, x32 = logits64.float().to(device), x64.float().to(device)
    got = fastvae.continuous_bernoulli_log_likelihood(logits32, x32).cpu().double()
    want = reference.continuous_bernoulli_log_prob(logits32.cpu().double(), x32.cpu().double())
    err = (got - want).abs() / (1 + want.abs())
    assert err.max() < 4e-7, f"worst relative error {err.max():.3g} at logit {logits32.cpu()[err.argmax()].item()}"


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_reference_backend(device):
    logits, x = data(batch=6, pixels=50, samples=2, device=device, scale=20.0)
    got = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    want = reference.continuous_bernoulli_log_prob(logits.cpu(), x.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-13, atol=1e-12)


def test_reference_is_exact_at_every_logit():
    pairs, logits, x = special_grid()
    got = reference.continuous_bernoulli_log_prob(logits, x)
    want = torch.tensor([exact_log_prob(eta, xv) for eta, xv in pairs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=4e-16, atol=4e-16)


@pytest.mark.parametrize("device", DEVICES)
def test_density_integrates_to_one(device):
    """Trapezoid rule over x in [0, 1] of exp(log p) for several logits, 0 and +-100 included."""
    logits = torch.tensor([-100.0, -7.0, -0.3, 0.0, 1e-6, 0.5, 3.0, 100.0], dtype=torch.float64, device=device)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64, device=device)
    log_p = fastvae.continuous_bernoulli_log_likelihood(
        logits.repeat_interleave(grid.numel()).reshape(-1, 1), grid.repeat(logits.numel()).reshape(-1, 1)
    ).reshape(logits.numel(), -1)
    # Near +-100 the mass sits within ~1/100 of an end: fine enough at 5e-6 spacing.
    mass = torch.trapezoid(log_p.exp(), grid, dim=-1)
    torch.testing.assert_close(mass.cpu(), torch.ones(logits.numel(), dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)])
def test_reduced_precision_accumulates_in_float32(device, dtype, tol):
    logits, x = data(batch=8, pixels=784, samples=2, dtype=dtype, device=device)
    got = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    assert got.dtype == torch.float32
    want = reference.continuous_bernoulli_log_prob(logits.double(), x.double())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    logits.requires_grad_()
    fastvae.continuous_bernoulli_log_likelihood(logits, x).sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_images_are_flattened_per_example(device):
    logits = torch.randn(2, 3, 1, 5, 5, device=device)
    x = torch.rand(3, 1, 5, 5, device=device)
    got = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    want = reference.continuous_bernoulli_log_prob(logits.reshape(2, 3, 25), x.reshape(3, 25))
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [None, 2])
def test_gradcheck(device, samples):
    logits, x = data(batch=3, pixels=5, samples=samples, device=device)
    logits[..., 0] = 0.0  # lambda = 1/2 exactly
    logits[..., 1] = 1e-3
    x = x.clamp(0.05, 0.95)  # gradcheck's perturbations of x stay in [0, 1]
    logits.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(fastvae.continuous_bernoulli_log_likelihood, (logits, x))


@fused_gradients
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_is_exact_at_every_logit(device):
    pairs, logits, x = special_grid(device=device)
    logits.requires_grad_()
    fastvae.continuous_bernoulli_log_likelihood(logits, x).sum().backward()
    want = torch.tensor([[exact_grad_logit(eta, xv)] for eta, xv in pairs], dtype=torch.float64)
    torch.testing.assert_close(logits.grad.cpu(), want, rtol=1e-15, atol=5e-16)  # x - mean: 2 roundings


@fused_gradients
@pytest.mark.parametrize("device", DEVICES)
def test_float32_gradient_sweep(device):
    logits64 = torch.linspace(-120.0, 120.0, 24001, dtype=torch.float64).reshape(-1, 1)
    logits64 = torch.cat([logits64, torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64).reshape(-1, 1)])
    x = torch.rand(logits64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    logits32 = logits64.float().to(device).requires_grad_()
    fastvae.continuous_bernoulli_log_likelihood(logits32, x.to(device)).sum().backward()
    want = torch.tensor([exact_grad_logit(float(e), float(xv)) for e, xv in zip(logits32.detach().cpu()[::97],
                                                                                x[::97])], dtype=torch.float64)
    torch.testing.assert_close(logits32.grad.cpu()[::97].double().flatten(), want, rtol=0, atol=3e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_for_x_is_the_logit(device):
    logits, x = data(device=device)
    x.requires_grad_()
    grad = torch.randn(4, dtype=torch.float64, device=device)
    fastvae.continuous_bernoulli_log_likelihood(logits, x).backward(grad)
    torch.testing.assert_close(x.grad, grad[:, None] * logits)


# ---------------------------------------------------------------------------
# 3. opcheck; 4. torch.compile
# ---------------------------------------------------------------------------
@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    logits, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32, device=device)
    logits.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastvae.continuous_bernoulli_log_prob.default, (logits, x))
    torch.library.opcheck(torch.ops.fastvae.continuous_bernoulli_log_prob.default, (logits[0], x))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs_grad_x", [False, True])
def test_opcheck_backward_op(device, needs_grad_x):
    logits, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32, device=device)
    grad = torch.randn(2, 3, device=device)
    torch.library.opcheck(torch.ops.fastvae.continuous_bernoulli_log_prob_backward.default,
                          (grad, logits, x, needs_grad_x))


def test_torch_compile_fullgraph():
    def loss(logits, x):
        return -fastvae.continuous_bernoulli_log_likelihood(logits, x, check_range=False).mean()

    logits, x = data(batch=4, pixels=6, samples=2, dtype=torch.float32)
    logits.requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(logits, x)
    torch.testing.assert_close(got, loss(logits, x))
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(loss(logits, x), logits)[0])


# ---------------------------------------------------------------------------
# 5. Bad inputs, NaN, empty batches
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "logits,x,error,match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), ValueError, "logits must have the shape of x"),
        (torch.zeros(2, 2, 3, 4), torch.zeros(3, 4), ValueError, "logits must have the shape of x"),
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int64), RuntimeError, "x must be a floating-point"),
        (torch.zeros(3, 4, dtype=torch.complex64), torch.zeros(3, 4), RuntimeError, "logits must be a floating"),
        (torch.zeros(3, 4), torch.full((3, 4), 1.5), ValueError, r"x must lie in \[0, 1\] for a continuous"),
        (torch.zeros(3, 4), torch.full((3, 4), -0.1), ValueError, r"x must lie in \[0, 1\]"),
        ("logits", torch.zeros(3, 4), TypeError, "logits must be a torch.Tensor"),
        (torch.zeros(3, 4), [0.5], TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(logits, x, error, match):
    with pytest.raises(error, match=match):
        fastvae.continuous_bernoulli_log_likelihood(logits, x)


@requires_cpp
def test_direct_op_call_is_validated():
    op = torch.ops.fastvae.continuous_bernoulli_log_prob
    with pytest.raises(RuntimeError, match="logits must have shape"):
        op(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="x has dtype Double but logits has dtype Float"):
        op(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.fastvae.continuous_bernoulli_log_prob_backward(torch.zeros(2), torch.zeros(3, 4),
                                                                 torch.zeros(3, 4), False)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_its_row_only(device):
    logits, x = data(batch=3, pixels=4, device=device)
    logits[1, 0] = float("nan")
    logits.requires_grad_()
    out = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    out.nan_to_num().sum().backward()
    assert torch.isnan(logits.grad[1, 0]) and torch.isfinite(logits.grad[[0, 2]]).all()
    x2 = x.clone()
    x2[2, 3] = float("nan")
    out = fastvae.continuous_bernoulli_log_likelihood(logits.detach(), x2, check_range=False)
    assert torch.isnan(out[2]) and torch.isfinite(out[0])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.zeros(2, 0, 4, device=device, requires_grad=True)
    x = torch.zeros(0, 4, device=device, requires_grad=True)
    out = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert logits.grad.shape == (2, 0, 4) and x.grad.shape == (0, 4)
    assert fastvae.continuous_bernoulli_log_likelihood(torch.zeros(3, 0), torch.zeros(3, 0)).tolist() == [0.0] * 3


def test_uniform_at_logit_zero():
    """lambda = 1/2 is the uniform density on [0, 1]: log p = 0 for every x, gradient x - 1/2."""
    x = torch.rand(5, 7, dtype=torch.float64)
    logits = torch.zeros(5, 7, dtype=torch.float64, requires_grad=True)
    out = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    assert (out == 0).all()
    out.sum().backward()
    torch.testing.assert_close(logits.grad, x - 0.5, rtol=0, atol=0)
    assert math.isclose(exact_log_prob(0.0, 0.3), 0.0, abs_tol=1e-300)
