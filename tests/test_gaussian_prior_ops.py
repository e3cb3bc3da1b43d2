"""gaussian_kl with a diagonal Gaussian prior and gaussian_log_prob: values against
torch.distributions in float64, exactness where logvar is close to prior_logvar,
broadcasting, gradients, opcheck, torch.compile and bad inputs.

Tests that take `device` run on every device of tests/devices.py (CUDA where it can run).
"""

from decimal import Decimal, getcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

import fastvae
from devices import DEVICES
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")

# (mu/logvar shape, prior shape): conditional, learned (D,), samples against examples,
# a prior broadcast inside (copied path), a last dimension of 1, a scalar.
KL_SHAPES = [
    ((6, 5), (6, 5)),
    ((6, 5), (5,)),
    ((3, 6, 5), (6, 5)),
    ((4, 3, 5), (4, 1, 5)),
    ((6, 5), (6, 1)),
    ((6, 5), (1, 6, 1)),
    ((6, 5), ()),
]


def randn(shape, device, seed, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


def normal(mu, logvar):
    return Normal(mu, torch.exp(0.5 * logvar))


@pytest.mark.parametrize("shapes", KL_SHAPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_kl_float64_matches_torch_distributions(shapes, device):
    post, prior = shapes
    mu, logvar = randn(post, device, 0), randn(post, device, 1)
    prior_mu, prior_logvar = randn(prior, device, 2), randn(prior, device, 3)
    want = kl_divergence(normal(mu, logvar), normal(prior_mu, prior_logvar)).sum(-1)
    got = fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_without_prior_is_the_standard_normal_op(device):
    mu, logvar = randn((7, 4), device, 0), randn((7, 4), device, 1)
    assert torch.equal(fastvae.gaussian_kl(mu, logvar), fastvae.latent_terms(mu, logvar, seed=0).kl)
    standard = fastvae.gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
    torch.testing.assert_close(fastvae.gaussian_kl(mu, logvar), standard, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_prior_argument_left_none_is_zero(device):
    mu, logvar, other = randn((5, 3), device, 0), randn((5, 3), device, 1), randn((3,), device, 2)
    torch.testing.assert_close(fastvae.gaussian_kl(mu, logvar, prior_mu=other),
                               fastvae.gaussian_kl(mu, logvar, other, 0.0), rtol=0, atol=0)
    want = kl_divergence(normal(mu, logvar), normal(torch.zeros(3, dtype=torch.float64, device=device), other))
    torch.testing.assert_close(fastvae.gaussian_kl(mu, logvar, prior_logvar=other), want.sum(-1),
                               rtol=1e-10, atol=1e-12)


def exact_kl_of_log_ratio(r: float) -> float:
    """0.5 (e^r - 1 - r) with 40 digits."""
    getcontext().prec = 40
    x = Decimal(r)
    return float((x.exp() - 1 - x) / 2)


@pytest.mark.parametrize("delta", [1e-12, 1e-9, 1e-6, -3e-5, 1e-3, 0.3, -0.49, 0.5, 2.0])
@pytest.mark.parametrize("device", DEVICES)
def test_kl_is_exact_when_logvar_is_close_to_prior_logvar(delta, device):
    # e^r - 1 - r cancels to nothing in float64 for tiny r; the op keeps every digit.
    prior_logvar = torch.tensor([[-3.0, 0.0, 7.0]], dtype=torch.float64, device=device)
    logvar = prior_logvar + delta
    r = (logvar - prior_logvar).cpu()[0]
    mu = torch.full_like(logvar, 0.25)
    got = fastvae.gaussian_kl(mu, logvar, mu.clone(), prior_logvar)
    want = sum(exact_kl_of_log_ratio(float(x)) for x in r)
    assert got.item() == pytest.approx(want, rel=1e-13, abs=0)
    assert reference.gaussian_kl_prior(mu, logvar, mu, prior_logvar).item() == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_extreme_log_variances(device):
    logvar = torch.tensor([[-30.0, 20.0, -30.0, 20.0]], dtype=torch.float64, device=device)
    prior_logvar = torch.tensor([[20.0, -30.0, -30.0, 20.0]], dtype=torch.float64, device=device)
    mu, prior_mu = randn((1, 4), device, 0), randn((1, 4), device, 1)
    want = kl_divergence(normal(mu, logvar), normal(prior_mu, prior_logvar)).sum(-1)
    torch.testing.assert_close(fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shapes", [((3, 6, 5), (6, 5)), ((6, 5), (5,)), ((4, 6, 5), (4, 1, 5)), ((2, 5), ()),
                                    ((6, 5), (6, 1))], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_log_prob_float64_matches_torch_distributions(shapes, device):
    z_shape, param_shape = shapes
    z, mu, logvar = randn(z_shape, device, 0), randn(param_shape, device, 1), randn(param_shape, device, 2, 3.0)
    want = normal(mu, logvar).log_prob(z).sum(-1)
    got = fastvae.gaussian_log_prob(z, mu, logvar)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_log_prob_broadcasts_any_argument_and_takes_numbers(device):
    z, mu = randn((5, 4), device, 0), randn((3, 1, 4), device, 1)
    want = normal(mu, torch.full_like(mu, -0.5)).log_prob(z).sum(-1)
    torch.testing.assert_close(fastvae.gaussian_log_prob(z, mu, -0.5), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fastvae.gaussian_log_prob(z, 0.0, 0.0), Normal(0.0, 1.0).log_prob(z).sum(-1),
                               rtol=1e-10, atol=1e-12)


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dim=st.integers(1, 9),
    cut=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_broadcast_values_and_gradients_match_reference(lead, dim, cut, seed):
    full = (*lead, dim)
    prior_shape = full[min(cut, len(lead)):]  # a trailing part of the full shape
    mu, logvar = randn(full, "cpu", seed), randn(full, "cpu", seed + 1, 2.0)
    prior_mu, prior_logvar = randn(prior_shape, "cpu", seed + 2), randn(prior_shape, "cpu", seed + 3, 2.0)
    args = [t.requires_grad_() for t in (mu, logvar, prior_mu, prior_logvar)]
    got = fastvae.gaussian_kl(*args)
    want = reference.gaussian_kl_prior(*args)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = randn(got.shape, "cpu", seed + 4)
    grads = torch.autograd.grad((got * weights).sum(), args)
    want_grads = torch.autograd.grad((want * weights).sum(), args)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    z = randn((2, *full), "cpu", seed + 5).requires_grad_()
    got = fastvae.gaussian_log_prob(z, prior_mu, prior_logvar)
    want = reference.gaussian_log_density(z, prior_mu, prior_logvar)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = (z, prior_mu, prior_logvar)
    for g, w in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------
# Gradients, opcheck, torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", KL_SHAPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_kl_gradcheck(shapes, device):
    post, prior = shapes
    args = [randn(s, device, i).requires_grad_() for i, s in enumerate((post, post, prior, prior))]
    assert torch.autograd.gradcheck(fastvae.gaussian_kl, args)


@pytest.mark.parametrize("shapes", [((3, 4, 5), (4, 5)), ((4, 5), (5,)), ((4, 5), (4, 5))], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_log_prob_gradcheck(shapes, device):
    z_shape, param_shape = shapes
    args = [randn(s, device, i).requires_grad_() for i, s in enumerate((z_shape, param_shape, param_shape))]
    assert torch.autograd.gradcheck(fastvae.gaussian_log_prob, args)


@pytest.mark.parametrize("device", DEVICES)
def test_only_wanted_gradients_are_computed(device):
    mu = randn((4, 3), device, 0).requires_grad_()
    logvar, prior_mu, prior_logvar = randn((4, 3), device, 1), randn((3,), device, 2), randn((3,), device, 3)
    prior_logvar.requires_grad_()
    fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar).sum().backward()
    assert mu.grad is not None and prior_logvar.grad is not None and prior_logvar.grad.shape == (3,)
    assert logvar.grad is None and prior_mu.grad is None


@pytest.mark.parametrize("wanted", [(True, True, True, True), (True, False, False, True), (False, True, True, False)],
                         ids=lambda w: "".join("x" if x else "-" for x in w))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_wide_rows_match_reference(device, dtype, wanted):
    """D = 600 spans the CPU backward's row chunks (256) with a remainder; the gradients not
    wanted go to scratch, the wanted ones straight to their outputs."""
    args = [randn((5, 600), device, i, 1.5, dtype=dtype).requires_grad_(w) for i, w in enumerate(wanted)]
    weights = randn((5,), device, 9, dtype=dtype)
    got = torch.autograd.grad((fastvae.gaussian_kl(*args) * weights).sum(), [a for a in args if a.requires_grad])
    want = torch.autograd.grad((reference.gaussian_kl_prior(*args) * weights).sum(),
                               [a for a in args if a.requires_grad])
    tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    def make(shape, seed):
        return randn(shape, device, seed).requires_grad_()

    ops = torch.ops.fastvae
    torch.library.opcheck(ops.gaussian_kl_prior.default, (make((3, 4, 5), 0), make((3, 4, 5), 1),
                                                          make((4, 5), 2), make((5,), 3)))
    torch.library.opcheck(ops.gaussian_kl_prior.default, (make((4, 5), 0), make((4, 5), 1), make((4, 1), 2),
                                                          make((2, 1, 5), 3)))
    torch.library.opcheck(ops.gaussian_log_density.default, (make((3, 4, 5), 0), make((4, 5), 1), make((4, 5), 2)))
    grad = randn((3, 4), device, 9)

    def make(shape, seed):  # the backward ops are not differentiable themselves: checked on plain tensors
        return randn(shape, device, seed)

    torch.library.opcheck(ops.gaussian_kl_prior_backward.default,
                          (grad, make((3, 4, 5), 0), make((3, 4, 5), 1), make((4, 5), 2), make((5,), 3),
                           [True, False, True, True]))
    torch.library.opcheck(ops.gaussian_log_density_backward.default,
                          (grad, make((3, 4, 5), 0), make((4, 5), 1), make((4, 5), 2), [True, True, False]))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def loss(z, mu, logvar, prior_mu, prior_logvar):
        return (fastvae.gaussian_kl(mu, logvar, prior_mu, prior_logvar).sum()
                + fastvae.gaussian_log_prob(z, mu, logvar).sum())

    args = [randn(s, device, i, dtype=torch.float32).requires_grad_()
            for i, s in enumerate(((3, 8, 6), (8, 6), (8, 6), (6,), (6,)))]
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(*args)
    grads = torch.autograd.grad(got, args)
    want = loss(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, args)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_agrees_with_float64(device):
    args64 = [randn(s, device, i, 2.0) for i, s in enumerate(((64, 32), (64, 32), (32,), (32,)))]
    args32 = [t.float() for t in args64]
    torch.testing.assert_close(fastvae.gaussian_kl(*args32).double(), fastvae.gaussian_kl(*args64),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fastvae.gaussian_log_prob(*args32[:3]).double(),
                               fastvae.gaussian_log_prob(*args64[:3]), rtol=1e-5, atol=1e-4)


def log_variance_ratios():
    """r = logvar - prior_logvar from -30 to 30, densely around 0 and around +-ln2/2 (where the
    float32 kernel's range reduction changes from k = 0 to k = +-1), as float32 values."""
    tiny = torch.logspace(-10, 0, 2001, dtype=torch.float64)
    edges = 0.5 * torch.log(torch.tensor(2.0, dtype=torch.float64)) + torch.linspace(-1e-3, 1e-3, 2001,
                                                                                       dtype=torch.float64)
    r = torch.cat([torch.linspace(-30, 30, 60001, dtype=torch.float64), tiny, -tiny, edges, -edges])
    r = r.float().double()
    return r[r != 0]  # the relative error of a zero KL is not defined


@pytest.mark.parametrize("device", DEVICES)
def test_float32_kl_keeps_its_digits_for_close_variances(device):
    # 0.5 (e^r - 1 - r) in float32 from its float64 value at the same (float32) r: a kernel that
    # formed e^r - 1 - r by subtraction would lose every digit for small r (r = 1e-4: 5e-9 out of 1).
    r = log_variance_ratios().to(device)[:, None]
    zeros = torch.zeros_like(r)
    want = fastvae.gaussian_kl(zeros, r, zeros, zeros)
    logvar = r.float().requires_grad_()
    got = fastvae.gaussian_kl(zeros.float(), logvar, zeros.float(), zeros.float())
    assert ((got.double() - want).abs() / want).max().item() < 16 * 2.0 ** -24
    (grad,) = torch.autograd.grad(got.sum(), logvar)
    want_grad = 0.5 * torch.expm1(r)  # d/dlogvar = 0.5 (e^r - 1)
    assert ((grad.double() - want_grad).abs() / want_grad.abs()).max().item() < 16 * 2.0 ** -24


# ---------------------------------------------------------------------------
# Empty inputs and bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    mu = torch.zeros(0, 5, dtype=torch.float64, device=device, requires_grad=True)
    prior = randn((5,), device, 0).requires_grad_()
    kl = fastvae.gaussian_kl(mu, mu, prior, prior)
    assert kl.shape == (0,)
    kl.sum().backward()
    assert mu.grad.shape == (0, 5) and torch.equal(prior.grad, torch.zeros_like(prior))
    assert fastvae.gaussian_log_prob(torch.zeros(3, 0, 5, dtype=torch.float64, device=device), mu, mu).shape == (3, 0)


def test_bad_inputs_are_named():
    mu = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="prior_mu of shape .4, 2. does not broadcast"):
        fastvae.gaussian_kl(mu, mu, torch.zeros(4, 2, dtype=torch.float64), mu)
    with pytest.raises(RuntimeError, match="prior_logvar has dtype .* but mu has dtype"):
        fastvae.gaussian_kl(mu, mu, mu, mu.float())
    with pytest.raises(RuntimeError, match="mu must be a float32 or float64 tensor"):
        fastvae.gaussian_kl(mu.long(), mu, mu, mu)
    with pytest.raises(TypeError, match="prior_logvar must be a tensor or a number, got str"):
        fastvae.gaussian_kl(mu, mu, mu, "zero")
    with pytest.raises(RuntimeError, match="logvar of shape .5,?. does not broadcast"):
        fastvae.gaussian_log_prob(mu, mu, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="z must be a float32 or float64 tensor"):
        fastvae.gaussian_log_prob(mu.half(), mu, mu)


@requires_cpp
def test_direct_op_calls_check_their_arguments():
    mu = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="prior_mu of shape \\[2\\] does not broadcast"):
        torch.ops.fastvae.gaussian_kl_prior(mu, mu, torch.zeros(2), mu)
    with pytest.raises(RuntimeError, match="grad must have the result's shape"):
        torch.ops.fastvae.gaussian_log_density_backward(torch.zeros(3), mu, mu, mu, [True, True, True])
