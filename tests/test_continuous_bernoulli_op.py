"""The fused continuous Bernoulli log-likelihood (fastvae.continuous_bernoulli_log_likelihood).

Every check the likelihood ops share runs from likelihood_op_tester; here is the continuous
Bernoulli's own. torch.distributions.ContinuousBernoulli keeps 1e-9 only where |logit| <= 15
(it works from the probability, whose rounding costs it about 1e-16 * e^|logit| / |logit|
nats, 3e-7 at 29, and beyond about 36 it clamps the probability and drifts by about a nat at
+-100), so exactness is checked against high-precision values from mpmath at every logit,
near 0 and at +-100, and the density against its normalization.
"""

import math

import mpmath
import pytest
import torch
from torch.distributions import ContinuousBernoulli

import fastvae
from devices import DEVICES
from fastvae.ops import reference
from likelihood_op_tester import LikelihoodOpTester, normal, uniform

# The fallback backend's gradients are autograd's through fastvae.ops.reference: good to ~1e-14
# (float64) and ~3e-6 (float32), not to the rounding of the fused backward checked here.
fused_gradients = pytest.mark.skipif(fastvae.backend() != "cpp", reason="checks the fused backward's rounding")

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


def float32_sweep(seed: int):
    """A dense sweep of logits over [-120, 120] and [-1, 1] (every code path, both signs) in
    float32, one element per row, against uniform x."""
    logits = torch.cat([torch.linspace(-120.0, 120.0, 24001, dtype=torch.float64),
                        torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)]).reshape(-1, 1)
    return logits.float(), uniform(torch.Generator().manual_seed(seed), logits.shape).float()


class TestContinuousBernoulliOp(LikelihoodOpTester):
    name, param, range_name = "continuous_bernoulli", "logits", "continuous Bernoulli"
    distributions_tol = (1e-9, 1e-9)

    def draw(self, gen, params_shape, x_shape):
        logits = 10 * normal(gen, params_shape)  # past the series cutoff and torch's clamping
        logits[..., 0], logits[..., 1] = 0.0, 1e-3  # lambda = 1/2 exactly, and next to it
        return logits, uniform(gen, x_shape), None

    def distributions_log_prob(self, inputs):
        where_torch_is_exact = inputs._replace(params=inputs.params.clamp(-15.0, 15.0))
        logits, x = where_torch_is_exact.params, inputs.x.expand_as(inputs.params)
        return where_torch_is_exact, ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)

    @pytest.mark.parametrize("device", DEVICES)
    def test_gradient_for_x_is_the_logit(self, device):
        logits, x, _ = self.sample_inputs(device)
        x.requires_grad_()
        grad = torch.randn(4, dtype=torch.float64, device=device)
        fastvae.continuous_bernoulli_log_likelihood(logits, x).backward(grad)
        torch.testing.assert_close(x.grad, grad[:, None] * logits)


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
    logits32, x32 = float32_sweep(seed=1)
    got = fastvae.continuous_bernoulli_log_likelihood(logits32.to(device), x32.to(device)).cpu().double()
    want = reference.continuous_bernoulli_log_prob(logits32.double(), x32.double())
    err = (got - want).abs() / (1 + want.abs())
    assert err.max() < 4e-7, f"worst relative error {err.max():.3g} at logit {logits32[err.argmax()].item()}"


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
    logits, x = float32_sweep(seed=2)
    logits32 = logits.to(device, copy=True).requires_grad_()
    fastvae.continuous_bernoulli_log_likelihood(logits32, x.to(device)).sum().backward()
    want = torch.tensor([exact_grad_logit(float(e), float(xv)) for e, xv in zip(logits[::97], x[::97])],
                        dtype=torch.float64)
    torch.testing.assert_close(logits32.grad.cpu()[::97].double().flatten(), want, rtol=0, atol=3e-7)


def test_uniform_at_logit_zero():
    """lambda = 1/2 is the uniform density on [0, 1]: log p = 0 for every x, gradient x - 1/2."""
    x = torch.rand(5, 7, dtype=torch.float64)
    logits = torch.zeros(5, 7, dtype=torch.float64, requires_grad=True)
    out = fastvae.continuous_bernoulli_log_likelihood(logits, x)
    assert (out == 0).all()
    out.sum().backward()
    torch.testing.assert_close(logits.grad, x - 0.5, rtol=0, atol=0)
    assert math.isclose(exact_log_prob(0.0, 0.3), 0.0, abs_tol=1e-300)
