"""The fused discretized logistic log-likelihood for 8-bit data, and bits per dimension.

x in [0, 1] holds the levels k/255; level k owns the logistic(mean, exp(log_scale)) mass of
[x - 1/510, x + 1/510], with everything below 0's bin going to x = 0 and everything above
1's bin to x = 1. Every check the likelihood ops share runs from likelihood_op_tester, on
each form of log_scale; here is the discretized logistic's own: torch.distributions (the
logistic as a transformed uniform, through its CDF) where its CDF difference keeps its
digits, high-precision values from mpmath everywhere, far tails included, and the mass of
the 256 levels.
"""

import math

import mpmath
import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

import fastvae
from devices import DEVICES
from fastvae.ops import reference
from likelihood_op_tester import LikelihoodOpTester, normal, uniform

HALF_BIN = 0.5 / 255


def logistic(mean: torch.Tensor, log_scale: torch.Tensor) -> TransformedDistribution:
    """torch.distributions' logistic: sigmoid^-1 of a uniform, shifted and scaled."""
    base = Uniform(torch.zeros_like(mean), torch.ones_like(mean))
    return TransformedDistribution(base, [SigmoidTransform().inv, AffineTransform(mean, log_scale.exp())])


def distributions_log_prob(mean, log_scale, x):
    """log of the bin's mass from torch.distributions' CDF, per row (float64; loses digits in far tails)."""
    dist = logistic(mean, log_scale)
    x = x.expand_as(mean)
    upper = torch.where(x > 1 - HALF_BIN, torch.ones_like(x), dist.cdf(x + HALF_BIN))
    lower = torch.where(x < HALF_BIN, torch.zeros_like(x), dist.cdf(x - HALF_BIN))
    return torch.log(upper - lower).sum(-1)


def exact_log_prob(mean: float, log_scale: float, level: int) -> float:
    """The bin's log-mass to 50 digits (survival functions where the CDF is near 1), for x the
    float64 nearest k/255 (what the op is given)."""
    with mpmath.workdps(50):
        m, inv_scale = mpmath.mpf(mean), mpmath.exp(-mpmath.mpf(log_scale))
        x, h = mpmath.mpf(level / 255), mpmath.mpf(1) / 510
        upper, lower = (x + h - m) * inv_scale, (x - h - m) * inv_scale

        def cdf(u):
            return 1 / (1 + mpmath.exp(-u))

        if level == 0:
            return float(mpmath.log(cdf(upper)))
        if level == 255:
            return float(mpmath.log(cdf(-lower)))
        mass = cdf(-lower) - cdf(-upper) if lower > 0 else cdf(upper) - cdf(lower)
        return float(mpmath.log(mass))


class TestDiscretizedLogisticOp(LikelihoodOpTester):
    name, param, second, range_name = "discretized_logistic", "mean", "log_scale", "discretized logistic"
    second_value = -3.0
    value_tol = {**LikelihoodOpTester.value_tol, torch.float32: 2e-5}
    gradient_tol = {**LikelihoodOpTester.gradient_tol, torch.float32: (2e-5, 2e-3)}  # scales down to e^-6
    distributions_tol = (1e-9, 1e-9)

    def draw(self, gen, params_shape, x_shape):
        """x on the 256 levels (both edges in every row), mean within about 0.1 of it, log_scale in [-6, -1]."""
        levels = torch.randint(0, 256, x_shape, generator=gen)
        levels[:, 0], levels[:, 1] = 0, 255
        x = levels.double() / 255
        return x + 0.1 * normal(gen, params_shape), x, -6 + 5 * uniform(gen, params_shape)

    def distributions_log_prob(self, inputs):
        # Its CDF difference loses the digits of bins far in the upper tail: the mean within 0.005 of x.
        near = inputs._replace(params=inputs.x + 0.05 * (inputs.params - inputs.x))
        return near, distributions_log_prob(near.params, self.second_expanded(near), near.x)

    def loss_of(self, log_likelihood, x):
        return fastvae.nats_to_bits_per_dim(-log_likelihood, x[0].numel()).mean()  # what image models report


# (mean, log_scale, level): the edges, bins far in either tail (where the CDF difference
# underflows or rounds to 0 in float64), tiny and huge scales, mean on a bin edge.
SPECIAL = [
    (m, s, k)
    for m in (-0.5, 0.0, 0.3, 0.5, 2 / 255, 1.0, 1.5)
    for s in (-12.0, -8.0, -7.0, -4.0, -1.0, 0.0, 3.0)
    for k in (0, 1, 2, 77, 128, 254, 255)
] + [(0.5 + HALF_BIN, -9.0, 128), (0.5 - HALF_BIN, -9.0, 128), (0.31, -20.0, 77), (0.31, -20.0, 79)]


def special_grid(dtype=torch.float64, device="cpu"):
    mean = torch.tensor([[m] for m, _, _ in SPECIAL], dtype=dtype, device=device)
    log_scale = torch.tensor([[s] for _, s, _ in SPECIAL], dtype=dtype, device=device)
    x = torch.tensor([[k / 255] for _, _, k in SPECIAL], dtype=dtype, device=device)
    return mean, log_scale, x


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_exact_in_every_regime(device):
    mean, log_scale, x = special_grid(device=device)
    got = fastvae.discretized_logistic_log_likelihood(mean, log_scale, x).cpu()
    want = torch.tensor([exact_log_prob(m, s, k) for m, s, k in SPECIAL], dtype=torch.float64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_is_accurate_in_every_regime(device):
    mean, log_scale, x = special_grid(dtype=torch.float32, device=device)
    got = fastvae.discretized_logistic_log_likelihood(mean, log_scale, x).cpu().double()
    want = reference.discretized_logistic_log_prob(mean.cpu().double(), x.cpu().double(), log_scale.cpu().double())
    # float32 places a bin edge to within ~1e-10 (the rounding of x and of the half-width 1/510),
    # which moves u+- by 1e-10 / scale: the error the inputs themselves carry, added to float32 rounding.
    edge_error = 1e-10 * torch.exp(-log_scale.cpu().double()).flatten()
    err = (got - want).abs() / (2e-6 * (1 + want.abs()) + edge_error)
    assert err.max() < 1, f"error {err.max():.3g} times the tolerance at {SPECIAL[err.argmax()]}"


def test_reference_is_exact_in_every_regime():
    mean, log_scale, x = special_grid()
    got = reference.discretized_logistic_log_prob(mean, x, log_scale)
    want = torch.tensor([exact_log_prob(m, s, k) for m, s, k in SPECIAL], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_the_256_levels_carry_probability_one(device, dtype, tol):
    """Edge bins take the tails: summed over every level the mass is 1, for any mean and scale."""
    gen = torch.Generator().manual_seed(3)
    mean = torch.cat([torch.rand(6, generator=gen) * 1.4 - 0.2, torch.tensor([0.0, 1.0, -3.0, 4.0])])
    log_scale = torch.cat([torch.rand(6, generator=gen) * 8 - 7, torch.tensor([-9.0, -2.0, 0.0, 2.0])])
    levels = torch.arange(256, dtype=torch.float64) / 255
    n = mean.numel()
    log_p = fastvae.discretized_logistic_log_likelihood(
        mean.double().repeat_interleave(256).reshape(-1, 1).to(device, dtype),
        log_scale.double().repeat_interleave(256).reshape(-1, 1).to(device, dtype),
        levels.repeat(n).reshape(-1, 1).to(device, dtype),
    ).reshape(n, 256)
    torch.testing.assert_close(torch.logsumexp(log_p.double(), -1).cpu(), torch.zeros(n, dtype=torch.float64),
                               rtol=0, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_the_reference_in_every_regime(device):
    """The hand-written backward against autograd through the float64 reference."""
    mean, log_scale, x = special_grid(device=device)
    mean.requires_grad_()
    log_scale.requires_grad_()
    got = torch.autograd.grad(fastvae.discretized_logistic_log_likelihood(mean, log_scale, x).sum(),
                              (mean, log_scale))
    m_ref, s_ref = mean.detach().cpu().requires_grad_(), log_scale.detach().cpu().requires_grad_()
    want = torch.autograd.grad(reference.discretized_logistic_log_prob(m_ref, x.cpu(), s_ref).sum(), (m_ref, s_ref))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------
def test_bits_per_dim_of_a_uniform_8_bit_image_is_8():
    dims = 3 * 32 * 32
    assert math.isclose(fastvae.nats_to_bits_per_dim(dims * math.log(256), dims), 8.0)
    nats = torch.tensor([dims * math.log(256), dims * math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(fastvae.nats_to_bits_per_dim(nats, dims), torch.tensor([8.0, 1.0], dtype=torch.float64))


def test_bits_per_dim_of_the_discretized_logistic():
    """A logistic far wider than a bin gives a level about density * width = 1/(4 * scale * 255)."""
    x = torch.randint(1, 255, (4, 3, 8, 8)) / 255.0
    nats = -fastvae.discretized_logistic_log_likelihood(torch.full_like(x, 0.5), 6.0, x)
    bpd = fastvae.nats_to_bits_per_dim(nats, x[0].numel())
    torch.testing.assert_close(bpd, torch.full((4,), math.log2(4 * math.exp(6.0) * 255)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("num_dims", [0, -3, 2.5, True])
def test_bits_per_dim_rejects_bad_dimensions(num_dims):
    with pytest.raises(ValueError, match="num_dims must be a positive int"):
        fastvae.nats_to_bits_per_dim(1.0, num_dims)
