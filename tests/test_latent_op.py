"""The fused latent op: values, gradients, registration, randomness, bad inputs."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import fastvae
from fastvae import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")


def make_inputs(batch=5, dim=7, dtype=torch.float64, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    logvar = (0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).to(dtype)
    return mu.requires_grad_(requires_grad), logvar.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------
# 1. Values against the reference and torch.distributions
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [None, 1, 4])
def test_float64_matches_torch_distributions(num_samples):
    mu, logvar = make_inputs()
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=torch.float64)
    out = fastvae.latent_terms(mu, logvar, num_samples, eps=eps)
    std = torch.exp(0.5 * logvar)
    q = Normal(mu, std)
    z = mu + std * eps
    torch.testing.assert_close(out.z, z, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.kl, kl_divergence(q, Normal(0.0, 1.0)).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_q, q.log_prob(z).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_p, Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("num_samples", [None, 3])
def test_matches_reference(dtype, tol, num_samples):
    mu, logvar = make_inputs(batch=16, dim=33, dtype=dtype)
    out = fastvae.latent_terms(mu, logvar, num_samples, seed=123, offset=7)
    ref = reference.latent_terms(mu, logvar, None, num_samples, 123, 7)
    # In-kernel noise is drawn in float32, so z agrees to float32 rounding in every dtype.
    noise_tol = max(tol, 2e-6)
    for got, want in zip(out, ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=noise_tol, atol=noise_tol * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    mu, logvar = make_inputs(batch=8, dim=300, dtype=dtype)
    eps = torch.randn(8, 300).to(dtype)
    out = fastvae.latent_terms(mu, logvar, eps=eps)
    assert out.z.dtype == dtype and out.kl.dtype == torch.float32 and out.log_q.dtype == torch.float32
    ref = reference.latent_terms(mu.double(), logvar.double(), eps.double())
    torch.testing.assert_close(out.kl.double(), ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.log_p.double(), ref[3], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.z.double(), ref[0], rtol=1e-2, atol=1e-2)


def test_extreme_logvar_is_exact_where_float32_can_hold_it():
    mu = torch.zeros(1, 3)
    logvar = torch.tensor([[80.0, -80.0, 0.0]])
    kl = fastvae.latent_terms(mu, logvar, eps=torch.zeros(1, 3)).kl
    expected = 0.5 * (math.exp(80.0) - 1 - 80.0 + math.exp(-80.0) - 1 + 80.0)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(expected, rel=1e-5)


def test_nan_and_inf_propagate_to_their_row_only():
    mu, logvar = make_inputs(batch=3, dim=4, dtype=torch.float32)
    mu[1, 2] = float("nan")
    logvar[2, 0] = float("inf")
    out = fastvae.latent_terms(mu, logvar, seed=1)
    # (logvar = inf gives inf - inf inside the KL formula: NaN, as in torch.distributions.)
    assert torch.isnan(out.kl[1]) and not torch.isfinite(out.kl[2]) and torch.isfinite(out.kl[0])
    assert torch.isfinite(out.z[0]).all() and torch.isnan(out.z[1, 2])


# ---------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [None, 3])
def test_gradcheck(num_samples):
    # (stl=True is deliberately not the gradient of the outputs: it drops log_q's score
    # term. It is checked against the reference's autograd below instead.)
    mu, logvar = make_inputs(batch=3, dim=4, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m, lv: tuple(fastvae.latent_terms(m, lv, num_samples, seed=5)), (mu, logvar)
    )


@pytest.mark.parametrize("stl", [False, True])
def test_gradients_match_reference_autograd(stl):
    mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True)
    weights = [torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    weights += [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]

    def loss(outputs):
        return sum((w * o).sum() for w, o in zip(weights, outputs))

    got = torch.autograd.grad(loss(fastvae.latent_terms(mu, logvar, 3, seed=9, stl=stl)), (mu, logvar))
    eps = torch.stack([reference.philox_normal(4 * 6, 9, sample=l) for l in range(3)]).view(3, 4, 6).double()
    want = torch.autograd.grad(loss(reference.latent_terms(mu, logvar, eps, 3, stl=stl)), (mu, logvar))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_unused_outputs_get_no_gradient_work():
    mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True)
    out = fastvae.latent_terms(mu, logvar, seed=3)
    out.kl.sum().backward()
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (torch.exp(logvar.detach()) - 1))


@requires_cpp
def test_backward_saves_no_eps_or_std():
    mu, logvar = make_inputs(batch=64, dim=16, dtype=torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fastvae.latent_terms(mu, logvar, 4, seed=0)
    # Only z (an output the decoder keeps anyway), mu and logvar: docs/DESIGN.md section 1.
    assert sorted(t.numel() for t in saved) == sorted([out.z.numel(), mu.numel(), logvar.numel()])


# ---------------------------------------------------------------------------
# 3. Registration: opcheck; 4. torch.compile
# ---------------------------------------------------------------------------
@requires_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_eps", [False, True])
def test_opcheck(requires_grad, with_eps):
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32, requires_grad=requires_grad)
    eps = torch.randn(2, 3, 5) if with_eps else None
    torch.library.opcheck(torch.ops.fastvae.latent_terms.default, (mu, logvar, eps, 2, 11, 0, 0, False))
    torch.library.opcheck(torch.ops.fastvae.latent_terms.default, (mu, logvar, None, None, 11, 0, 3, True))


@requires_cpp
def test_opcheck_backward_op():
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32)
    z = torch.randn(2, 3, 5)
    grads = (torch.randn(2, 3, 5), torch.randn(3), None, torch.randn(2, 3))
    torch.library.opcheck(torch.ops.fastvae.latent_terms_backward.default, (*grads, z, mu, logvar, False))


@requires_cpp  # the reference backend draws its noise with NumPy, which Dynamo cannot trace
def test_torch_compile_fullgraph():
    def elbo_terms(mu, logvar):
        out = fastvae.latent_terms(mu, logvar, 2, seed=4)
        return (out.log_p - out.log_q).mean() - out.kl.mean() + out.z.pow(2).mean()

    mu, logvar = make_inputs(batch=4, dim=3, dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(elbo_terms, fullgraph=True, backend="aot_eager")
    got = compiled(mu, logvar)
    want = elbo_terms(mu, logvar)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (mu, logvar))
    want_grads = torch.autograd.grad(elbo_terms(mu, logvar), (mu, logvar))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------
def test_philox_known_answer():
    # Random123's published test vector for philox4x32-10 with zero counter and key.
    words = reference.philox4x32_10([0], 0, 0)
    assert [int(w[0]) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# Shapes where the kernels draw noise for several short rows at once (spans that stop at a sample's
# end and at a thread's last row), rows that are split into several spans, and a shard's row_offset.
@pytest.mark.parametrize("batch,dim,row_offset", [(3, 37, 0), (301, 24, 5), (2, 1500, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_in_kernel_noise_is_the_reference_stream(batch, dim, row_offset, threads):
    mu, logvar = torch.zeros(batch, dim), torch.zeros(batch, dim)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        z = fastvae.latent_terms(mu, logvar, 3, seed=2**40 + 3, offset=5, row_offset=row_offset).z
    finally:
        torch.set_num_threads(before)
    n = (row_offset + batch) * dim
    expected = torch.stack([reference.philox_normal(n, 2**40 + 3, 5, sample=l)[row_offset * dim :] for l in range(3)])
    torch.testing.assert_close(z, expected.view(3, batch, dim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_samples", [None, 3])
def test_row_offset_draws_a_shard_of_the_global_batch(num_samples):
    mu, logvar = make_inputs(batch=10, dim=7, dtype=torch.float32)
    whole = fastvae.latent_terms(mu, logvar, num_samples, seed=21).z
    first = fastvae.latent_terms(mu[:4], logvar[:4], num_samples, seed=21).z
    second = fastvae.latent_terms(mu[4:], logvar[4:], num_samples, seed=21, row_offset=4).z
    torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=0, atol=0)


def test_same_seed_same_samples_different_seed_different_samples():
    mu, logvar = make_inputs(dtype=torch.float32)
    a = fastvae.latent_terms(mu, logvar, 3, seed=1).z
    assert torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=1).z)
    assert not torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=2).z)
    assert not torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=1, offset=1).z)


def test_manual_seed_makes_draws_reproducible():
    mu, logvar = make_inputs(dtype=torch.float32)
    torch.manual_seed(0)
    first = [fastvae.reparameterize(mu, logvar) for _ in range(2)]
    torch.manual_seed(0)
    second = [fastvae.reparameterize(mu, logvar) for _ in range(2)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])
    gen = torch.Generator().manual_seed(7)
    third = fastvae.reparameterize(mu, logvar, generator=gen)
    assert torch.equal(third, fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7)))


@requires_cpp
def test_cpu_seed_helper_draws_what_random_would():
    # fastvae._C.draw_cpu_seed is the fast path of the wrapper's seed draw; a seed must not depend
    # on which path drew it, or on whether the extension is built.
    from fastvae import _C

    torch.manual_seed(3)
    want = [int(torch.empty((), dtype=torch.int64).random_()) for _ in range(3)]
    torch.manual_seed(3)
    assert [_C.draw_cpu_seed() for _ in range(3)] == want
    gen = torch.Generator().manual_seed(5)
    want = int(torch.empty((), dtype=torch.int64).random_(generator=gen))
    assert _C.draw_cpu_seed(torch.Generator().manual_seed(5)) == want
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        _C.draw_cpu_seed(5)
    with pytest.raises(TypeError, match="at most one argument"):
        _C.draw_cpu_seed(None, None)
    # Through the public function (its one-step CPU call), a bad generator is named; a rejected
    # argument of the one-step call leaves the default generator's state alone.
    mu, logvar = make_inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match="latent_terms: generator must be a torch.Generator or None, got str"):
        fastvae.latent_terms(mu, logvar, generator="seed")
    torch.manual_seed(3)
    with pytest.raises(TypeError):
        _C.latent_terms_cpu_seed(mu, logvar, None, None, "not an int", False)
    after_error = _C.draw_cpu_seed()
    torch.manual_seed(3)
    assert after_error == _C.draw_cpu_seed()


@requires_cpp
@pytest.mark.parametrize("num_samples", [None, 3])
def test_direct_cpu_call_matches_the_torch_ops_path(num_samples):
    # The common call (CPU tensors, eager, seed drawn from torch's generator) runs in one step of
    # the extension (fastvae._C.latent_terms_cpu_seed); it must give what the general path gives,
    # values and gradients, and must leave no reference behind.
    import weakref

    mu, logvar = make_inputs(batch=6, dim=9, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(11)
    fast = fastvae.latent_terms(mu, logvar, num_samples, row_offset=2)
    torch.manual_seed(11)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    slow = fastvae.latent_terms(mu, logvar, num_samples, seed=seed, row_offset=2)
    for got, want in zip(fast, slow):
        assert torch.equal(got, want)
    weights = [torch.randn_like(t) for t in fast]
    got = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, fast)), (mu, logvar))
    want = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, slow)), (mu, logvar))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    z = weakref.ref(fast.z)
    del fast
    assert z() is None


@requires_cpp
def test_torch_function_modes_still_see_the_op():
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    mu, logvar = make_inputs(dtype=torch.float32)
    with Record():
        fastvae.latent_terms(mu, logvar)
    assert any("latent_terms" in name for name in seen), seen


def test_noise_is_standard_normal():
    n = 1_000_000
    eps = fastvae.reparameterize(torch.zeros(1000, 1000), torch.zeros(1000, 1000), seed=12345).double().flatten()
    assert eps.numel() == n
    # Sampling error of the mean is 1/sqrt(n) = 1e-3; of the variance sqrt(2/n) = 1.4e-3. Allow 5 sigma.
    assert abs(eps.mean().item()) < 5e-3
    assert abs(eps.var().item() - 1.0) < 7e-3
    # Third and fourth moments: skew 0 (se sqrt(6/n)), excess kurtosis 0 (se sqrt(24/n)).
    assert abs(eps.pow(3).mean().item()) < 5 * math.sqrt(6 / n) * 2
    assert abs(eps.pow(4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    # Tail mass beyond 3 sigma: 0.0027 for N(0, 1).
    assert abs((eps.abs() > 3).double().mean().item() - 0.0026998) < 5e-4


def test_noise_does_not_depend_on_thread_count():
    mu, logvar = torch.zeros(512, 256), torch.zeros(512, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastvae.reparameterize(mu, logvar, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, fastvae.reparameterize(mu, logvar, seed=3))


# ---------------------------------------------------------------------------
# Shapes and layouts
# ---------------------------------------------------------------------------
def test_non_contiguous_inputs():
    base_mu, base_logvar = make_inputs(batch=6, dim=10)
    mu, logvar = base_mu.t().contiguous().t(), base_logvar[:, ::1]
    mu_nc = torch.randn(10, 6, dtype=torch.float64).t()
    mu_nc.copy_(base_mu)
    assert not mu_nc.is_contiguous()
    eps = torch.randn(6, 20, dtype=torch.float64)[:, ::2]
    got = fastvae.latent_terms(mu_nc, logvar, eps=eps)
    want = fastvae.latent_terms(mu.contiguous(), logvar.contiguous(), eps=eps.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_empty_batch_gives_empty_outputs():
    out = fastvae.latent_terms(torch.zeros(0, 4), torch.zeros(0, 4), 2, seed=0)
    assert out.z.shape == (2, 0, 4) and out.kl.shape == (0,) and out.log_q.shape == (2, 0)


def test_zero_latent_dim_gives_zero_sums():
    out = fastvae.latent_terms(torch.zeros(3, 0), torch.zeros(3, 0), 2, seed=0)
    assert out.z.shape == (2, 3, 0)
    for total in (out.kl, out.log_q, out.log_p):
        assert torch.equal(total, torch.zeros_like(total))


def test_large_latent_dim_crosses_noise_chunks():
    mu, logvar = make_inputs(batch=2, dim=1500, dtype=torch.float32)
    out = fastvae.latent_terms(mu, logvar, 2, seed=8)
    ref = reference.latent_terms(mu, logvar, None, 2, 8)
    torch.testing.assert_close(out.z, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_q, ref[2], rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------
# 5. Bad inputs: a clear exception, never a crash
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mu,logvar,kwargs,error,match",
    [
        (torch.zeros(3), torch.zeros(3), {}, RuntimeError, "mu must have shape"),
        (torch.zeros(3, 4), torch.zeros(3, 5), {}, RuntimeError, "logvar must have the shape of mu"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64), {}, RuntimeError,
         "floating-point"),
        (torch.zeros(3, 4, dtype=torch.complex64), torch.zeros(3, 4, dtype=torch.complex64), {}, RuntimeError,
         "floating-point"),
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), {}, RuntimeError, "dtype"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"num_samples": 0}, ValueError, "num_samples must be in"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"num_samples": 2.0}, TypeError, "num_samples must be an int"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"eps": torch.zeros(2, 3, 4)}, RuntimeError, "eps must have"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"seed": -1}, ValueError, "seed must be in"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"seed": 2**64}, ValueError, "seed must be in"),
        ([[0.0]], torch.zeros(1, 1), {}, TypeError, "mu must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mu, logvar, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvae.latent_terms(mu, logvar, **kwargs)


def test_mismatched_devices_raise():
    meta = torch.zeros(3, 4, device="meta")
    with pytest.raises(RuntimeError, match="same device|is on"):
        fastvae.latent_terms(torch.zeros(3, 4), meta, seed=0)


@requires_cpp
def test_direct_op_call_is_validated_too():
    with pytest.raises(RuntimeError, match="num_samples must be >= 1"):
        torch.ops.fastvae.latent_terms(torch.zeros(2, 2), torch.zeros(2, 2), None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="row_offset must be >= 0"):
        torch.ops.fastvae.latent_terms(torch.zeros(2, 2), torch.zeros(2, 2), None, 1, 0, 0, -1)
    with pytest.raises(RuntimeError, match="grad_z must have the shape of z"):
        torch.ops.fastvae.latent_terms_backward(
            torch.zeros(3), None, None, None, torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), False
        )
