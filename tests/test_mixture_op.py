"""mixture_log_prob: values against torch.distributions.MixtureSameFamily in float64,
exactness at extreme log-variances (where the matmul form cancels), gradients, what is
saved for backward, opcheck, torch.compile and bad inputs.

Tests that take `device` run on every device of tests/devices.py (CUDA where it can run).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import fastvae
from devices import DEVICES
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")


def randn(shape, device, seed, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


def mixture(means, logvars, log_weights=None):
    logits = log_weights if log_weights is not None else torch.zeros_like(means[:, 0])
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, torch.exp(0.5 * logvars)), 1))


def components(K, D, device, seed, logvar_scale=1.0):
    return randn((K, D), device, seed), randn((K, D), device, seed + 1, logvar_scale), randn((K,), device, seed + 2)


@pytest.mark.parametrize("z_shape", [(7, 5), (3, 7, 5), (5,)], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_float64_matches_torch_distributions(z_shape, weighted, device):
    means, logvars, log_weights = components(6, 5, device, 1)
    log_weights = log_weights if weighted else None
    z = randn(z_shape, device, 0, 1.5)
    got = fastvae.mixture_log_prob(z, means, logvars, log_weights)
    want = mixture(means, logvars, log_weights).log_prob(z)
    assert got.shape == want.shape == z_shape[:-1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def extreme_case(device, seed=0, K=6, D=4):
    """Components with log-variances from -30 to 20, and z drawn at (or on top of) them."""
    gen = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, D, generator=gen, dtype=torch.float64)
    logvars = torch.empty(K, D, dtype=torch.float64).uniform_(-30, 20, generator=gen)
    logvars[0] = -30.0
    logvars[1] = 20.0
    pick = torch.randint(0, K, (12,), generator=gen)
    std = torch.exp(0.5 * logvars[pick])
    z = means[pick] + std * torch.randn(12, D, generator=gen, dtype=torch.float64)
    z[0] = means[0] + 1e-14  # closer to a tiny-variance component than its standard deviation
    z[1] = means[0]
    return z.to(device), means.to(device), logvars.to(device)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_log_variances_stay_exact_in_float64(seed, device):
    z, means, logvars = extreme_case(device, seed)
    args = [t.clone().requires_grad_() for t in (z, means, logvars)]
    got = fastvae.mixture_log_prob(*args)
    want = reference.mixture_log_prob(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    weights = randn(got.shape, device, 7)
    for g, w in zip(torch.autograd.grad((got * weights).sum(), args),
                    torch.autograd.grad((want * weights).sum(), args)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_form_alone_would_cancel_here(device):
    # The case the exact recompute exists for: the matmul form of the quadratic form
    # (1e13-sized terms) loses every digit of the answer.
    z, means, logvars = extreme_case(device)
    inv = torch.exp(-logvars)
    gemm = (z * z) @ inv.T - 2 * z @ (means * inv).T + (means * means * inv).sum(1)
    exact = ((z[:, None] - means) ** 2 * inv).sum(-1)
    assert exact[0, 0] < 1e-12 and (gemm[0, 0] - exact[0, 0]).abs() > 1e-6
    got = fastvae.mixture_log_prob(z[:1], means[:1], logvars[:1])
    want = Normal(means[0], torch.exp(0.5 * logvars[0])).log_prob(z[0]).sum()
    torch.testing.assert_close(got[0], want, rtol=1e-14, atol=0)


@given(batch=st.integers(0, 6), K=st.integers(1, 7), D=st.integers(1, 6), weighted=st.booleans(),
       spread=st.floats(0.1, 12.0), seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference_values_and_gradients(batch, K, D, weighted, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=gen, dtype=torch.float64)
    logvars = (spread * (torch.rand(K, D, generator=gen, dtype=torch.float64) - 0.5)).requires_grad_()
    log_weights = torch.randn(K, generator=gen, dtype=torch.float64).requires_grad_() if weighted else None
    z = (means[torch.randint(0, K, (batch,), generator=gen)]
         + 0.01 * torch.randn(batch, D, generator=gen, dtype=torch.float64)).requires_grad_()
    means.requires_grad_()
    got = fastvae.mixture_log_prob(z, means, logvars, log_weights)
    want = reference.mixture_log_prob(z, means, logvars, log_weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (z, means, logvars, log_weights) if t is not None]
    for g, w in zip(torch.autograd.grad(got.sum(), inputs, allow_unused=True),
                    torch.autograd.grad(want.sum(), inputs, allow_unused=True)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_agrees_with_float64(device):
    means, logvars, log_weights = components(50, 16, device, 3)
    z = randn((64, 16), device, 0, 1.5)
    got = fastvae.mixture_log_prob(z.float(), means.float(), logvars.float(), log_weights.float())
    torch.testing.assert_close(got.double(), fastvae.mixture_log_prob(z, means, logvars, log_weights),
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------
# Gradients, saved memory, opcheck, torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(weighted, device):
    means, logvars, log_weights = components(4, 3, device, 1)
    args = [randn((2, 5, 3), device, 0, 1.5), means, logvars] + ([log_weights] if weighted else [])
    assert torch.autograd.gradcheck(fastvae.mixture_log_prob, [t.requires_grad_() for t in args])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_flagged_pairs(device):
    # Tiny variances with z on top of the components: the pairs go through the exact path.
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    logvars = torch.full((3, 2), -12.0, dtype=torch.float64)
    z = means[[0, 1, 2, 0]] + 1e-3 * torch.randn(4, 2, generator=gen, dtype=torch.float64)
    args = [t.to(device).requires_grad_() for t in (z, means, logvars)]
    assert torch.autograd.gradcheck(fastvae.mixture_log_prob, args, eps=1e-9, atol=1e-4, rtol=1e-5)


@requires_cpp
def test_backward_saves_no_component_by_dimension_tensor():
    N, K, D = 64, 40, 16
    means, logvars, log_weights = (t.requires_grad_() for t in components(K, D, "cpu", 1))
    z = randn((N, D), "cpu", 0).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fastvae.mixture_log_prob(z, means, logvars, log_weights)
    assert saved and max(saved) <= N * K  # the responsibilities; never N * K * D


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.fastvae
    means, logvars, log_weights = (t.requires_grad_() for t in components(5, 3, device, 1))
    z = randn((2, 4, 3), device, 0).requires_grad_()
    torch.library.opcheck(ops.mixture_log_prob.default, (z, means, logvars, log_weights))
    torch.library.opcheck(ops.mixture_log_prob.default, (z, means, logvars, None))
    # The forward and backward halves are not differentiable themselves: checked on plain tensors.
    z, means, logvars, log_weights = (t.detach() for t in (z, means, logvars, log_weights))
    torch.library.opcheck(ops.mixture_log_prob_forward.default, (z, means, logvars, log_weights))
    _, resp = ops.mixture_log_prob_forward(z, means, logvars, log_weights)
    grad = randn((2, 4), device, 5)
    torch.library.opcheck(ops.mixture_log_prob_backward.default, (grad, z, means, logvars, log_weights, resp))
    torch.library.opcheck(ops.mixture_log_prob_backward.default, (grad, z, means, logvars, None, resp))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def loss(z, means, logvars, log_weights):
        return fastvae.mixture_log_prob(z, means, logvars, log_weights).mean()

    args = [t.float().requires_grad_() for t in (randn((16, 6), device, 0),) + components(10, 6, device, 1)]
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(*args)
    want = loss(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Empty inputs and bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    means, logvars, log_weights = (t.requires_grad_() for t in components(4, 3, device, 1))
    z = torch.zeros(0, 3, dtype=torch.float64, device=device, requires_grad=True)
    out = fastvae.mixture_log_prob(z, means, logvars, log_weights)
    assert out.shape == (0,)
    out.sum().backward()
    assert z.grad.shape == (0, 3) and torch.equal(means.grad, torch.zeros_like(means))
    assert torch.equal(log_weights.grad, torch.zeros_like(log_weights))


def test_one_component_is_its_gaussian():
    means, logvars, _ = components(1, 4, "cpu", 1)
    z = randn((5, 4), "cpu", 0)
    want = Normal(means[0], torch.exp(0.5 * logvars[0])).log_prob(z).sum(-1)
    torch.testing.assert_close(fastvae.mixture_log_prob(z, means, logvars), want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    z = torch.zeros(4, 3, dtype=torch.float64)
    means = torch.zeros(5, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="means must have shape \\(num_components, 3\\)"):
        fastvae.mixture_log_prob(z, torch.zeros(5, 2, dtype=torch.float64), means)
    with pytest.raises(RuntimeError, match="means must hold at least one component"):
        fastvae.mixture_log_prob(z, means[:0], means[:0])
    with pytest.raises(RuntimeError, match="logvars must have the shape of means"):
        fastvae.mixture_log_prob(z, means, means[:4])
    with pytest.raises(RuntimeError, match="log_weights must have shape \\(num_components,\\) = \\(5,\\)"):
        fastvae.mixture_log_prob(z, means, means, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="means has dtype .* but z has dtype"):
        fastvae.mixture_log_prob(z, means.float(), means)
    with pytest.raises(RuntimeError, match="z must be a float32 or float64 tensor"):
        fastvae.mixture_log_prob(z.long(), means, means)
    with pytest.raises(RuntimeError, match="z must have shape \\(..., latent_dim\\), got a scalar"):
        fastvae.mixture_log_prob(z[0, 0], means, means)
