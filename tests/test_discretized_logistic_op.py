"""The fused discretized logistic log-likelihood for 8-bit data, and bits per dimension.

x in [0, 1] holds the levels k/255; level k owns the logistic(mean, exp(log_scale)) mass of
[x - 1/510, x + 1/510], with everything below 0's bin going to x = 0 and everything above
1's bin to x = 1. Values are checked against torch.distributions (the logistic as a
transformed uniform, through its CDF) where its CDF difference keeps its digits, and against
high-precision values from mpmath everywhere, far tails included.
"""

import math

import mpmath
import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

import fastvae
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
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


def data(batch=4, pixels=9, samples=None, dtype=torch.float64, device="cpu", seed=0, spread=0.1):
    """mean within about `spread` of the data, log_scale in [-6, -1], x on the 256 levels (both edges included)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    levels = torch.randint(0, 256, (batch, pixels), generator=gen)
    levels[:, 0], levels[:, 1] = 0, 255
    x = levels.double() / 255
    mean = (x + spread * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    log_scale = (-6 + 5 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    return mean, log_scale, x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------
# 1. Values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [None, 3])
def test_float64_matches_torch_distributions(device, samples):
    # Its CDF difference loses the digits of bins far in the upper tail: keep the mean near x.
    mean, log_scale, x = data(batch=5, pixels=30, samples=samples, device=device, spread=0.005)
    want = distributions_log_prob(mean, log_scale, x)
    got = fastvae.discretized_logistic_log_likelihood(mean, log_scale, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


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
@pytest.mark.parametrize("log_scale_kind", ["float", "tensor", "per_pixel"])
def test_log_scale_forms(device, log_scale_kind):
    mean, log_scale, x = data(samples=2, device=device, spread=0.005)
    value = {"float": -2.5, "tensor": log_scale, "per_pixel": log_scale[0, 0]}[log_scale_kind]
    expanded = torch.as_tensor(value, dtype=torch.float64, device=device).expand_as(mean)
    got = fastvae.discretized_logistic_log_likelihood(mean, value, x)
    torch.testing.assert_close(got, distributions_log_prob(mean, expanded, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)])
def test_reduced_precision_accumulates_in_float32(device, dtype, tol):
    mean, log_scale, x = data(batch=8, pixels=3 * 32 * 32, samples=2, dtype=dtype, device=device)
    got = fastvae.discretized_logistic_log_likelihood(mean, log_scale, x)
    assert got.dtype == torch.float32
    want = reference.discretized_logistic_log_prob(mean.double(), x.double(), log_scale.double())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    mean.requires_grad_()
    log_scale.requires_grad_()
    fastvae.discretized_logistic_log_likelihood(mean, log_scale, x).sum().backward()
    for grad in (mean.grad, log_scale.grad):
        assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_images_are_flattened_per_example(device):
    mean, log_scale = torch.rand(2, 3, 3, 4, 4, device=device), torch.full((2, 3, 3, 4, 4), -3.0, device=device)
    x = torch.randint(0, 256, (3, 3, 4, 4), device=device) / 255.0
    got = fastvae.discretized_logistic_log_likelihood(mean, log_scale, x)
    want = reference.discretized_logistic_log_prob(mean.reshape(2, 3, 48), x.reshape(3, 48), log_scale.reshape(2, 3, 48))
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [None, 2])
@pytest.mark.parametrize("log_scale_kind", ["float", "tensor", "per_pixel"])
def test_gradcheck(device, samples, log_scale_kind):
    mean, log_scale, x = data(batch=3, pixels=6, samples=samples, device=device)
    mean.requires_grad_()
    x.requires_grad_()  # perturbations of 1e-6 stay inside each level's bin (but leave [0, 1] at the edges)
    if log_scale_kind == "float":
        assert torch.autograd.gradcheck(
            lambda m, xx: fastvae.discretized_logistic_log_likelihood(m, -3.0, xx, check_range=False), (mean, x))
        return
    log_scale = log_scale if log_scale_kind == "tensor" else log_scale.reshape(-1, 6)[0]
    log_scale = log_scale.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s, xx: fastvae.discretized_logistic_log_likelihood(m, s, xx, check_range=False), (mean, log_scale, x))


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


@pytest.mark.parametrize("device", DEVICES)
def test_float32_gradients(device):
    mean, log_scale, x = data(batch=16, pixels=200, samples=2, dtype=torch.float32, device=device)
    mean.requires_grad_()
    log_scale.requires_grad_()
    got = torch.autograd.grad(fastvae.discretized_logistic_log_likelihood(mean, log_scale, x).sum(),
                              (mean, log_scale))
    m_ref = mean.detach().cpu().double().requires_grad_()
    s_ref = log_scale.detach().cpu().double().requires_grad_()
    want = torch.autograd.grad(reference.discretized_logistic_log_prob(m_ref, x.cpu().double(), s_ref).sum(),
                               (m_ref, s_ref))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=2e-5, atol=2e-3)


# ---------------------------------------------------------------------------
# 3. opcheck; 4. torch.compile
# ---------------------------------------------------------------------------
@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    mean, log_scale, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32, device=device)
    mean.requires_grad_(requires_grad)
    log_scale.requires_grad_(requires_grad)
    op = torch.ops.fastvae.discretized_logistic_log_prob.default
    torch.library.opcheck(op, (mean, x, log_scale, 0.0))
    torch.library.opcheck(op, (mean, x, None, -3.0))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs_grad_x", [False, True])
def test_opcheck_backward_op(device, needs_grad_x):
    mean, log_scale, x = data(batch=3, pixels=5, samples=2, dtype=torch.float32, device=device)
    grad = torch.randn(2, 3, device=device)
    op = torch.ops.fastvae.discretized_logistic_log_prob_backward.default
    torch.library.opcheck(op, (grad, mean, x, log_scale, 0.0, needs_grad_x))
    torch.library.opcheck(op, (grad, mean, x, None, -2.0, needs_grad_x))


def test_torch_compile_fullgraph():
    def loss(mean, log_scale, x):
        nats = -fastvae.discretized_logistic_log_likelihood(mean, log_scale, x, check_range=False)
        return fastvae.nats_to_bits_per_dim(nats, x[0].numel()).mean()

    mean, log_scale, x = data(batch=4, pixels=6, samples=2, dtype=torch.float32)
    mean.requires_grad_()
    log_scale.requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(mean, log_scale, x)
    torch.testing.assert_close(got, loss(mean, log_scale, x))
    g_got = torch.autograd.grad(got, (mean, log_scale))
    g_want = torch.autograd.grad(loss(mean, log_scale, x), (mean, log_scale))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# 5. Bad inputs, NaN, empty batches
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mean,log_scale,x,error,match",
    [
        (torch.zeros(3, 4), 0.0, torch.zeros(3, 5), ValueError, "mean must have the shape of x"),
        (torch.zeros(3, 4), torch.zeros(5), torch.zeros(3, 4), ValueError, "log_scale of shape .* does not broadcast"),
        (torch.zeros(3, 4), "0", torch.zeros(3, 4), TypeError, "log_scale must be a float or a tensor"),
        (torch.zeros(3, 4), torch.zeros(4, dtype=torch.int64), torch.zeros(3, 4), RuntimeError,
         "log_scale must be a floating-point"),
        (torch.zeros(3, 4), 0.0, torch.full((3, 4), 256.0), ValueError, r"x must lie in \[0, 1\] for a discretized"),
        (torch.zeros(3, 4), 0.0, torch.zeros(3, 4, dtype=torch.int64), RuntimeError, "x must be a floating-point"),
        ([0.0], 0.0, torch.zeros(3, 4), TypeError, "mean must be a torch.Tensor"),
    ],
)
def test_bad_inputs(mean, log_scale, x, error, match):
    with pytest.raises(error, match=match):
        fastvae.discretized_logistic_log_likelihood(mean, log_scale, x)


@requires_cpp
def test_direct_op_call_is_validated():
    op = torch.ops.fastvae.discretized_logistic_log_prob
    with pytest.raises(RuntimeError, match="log_scale must have the shape of mean"):
        op(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4), 0.0)
    with pytest.raises(RuntimeError, match="log_scale has dtype Double but mean has dtype Float"):
        op(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), 0.0)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        op(torch.zeros(3, 4), torch.zeros(2, 4), None, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_its_row_only(device):
    mean, log_scale, x = data(batch=3, pixels=4, device=device)
    mean[1, 2] = float("nan")
    log_scale[2, 0] = float("nan")  # x = 0 there: the bottom edge bin
    mean.requires_grad_()
    log_scale.requires_grad_()
    out = fastvae.discretized_logistic_log_likelihood(mean, log_scale, x)
    assert torch.isnan(out[1]) and torch.isnan(out[2]) and torch.isfinite(out[0])
    out.nan_to_num().sum().backward()
    assert torch.isnan(mean.grad[1, 2]) and torch.isnan(log_scale.grad[2, 0]) and torch.isfinite(mean.grad[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    mean = torch.zeros(2, 0, 4, device=device, requires_grad=True)
    log_scale = torch.zeros(2, 0, 4, device=device, requires_grad=True)
    out = fastvae.discretized_logistic_log_likelihood(mean, log_scale, torch.zeros(0, 4, device=device))
    assert out.shape == (2, 0)
    out.sum().backward()
    assert mean.grad.shape == (2, 0, 4) and log_scale.grad.shape == (2, 0, 4)


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
