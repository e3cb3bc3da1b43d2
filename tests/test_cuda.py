"""The fused ops on CUDA tensors: values, dtypes, gradients, registration, randomness, CUDA graphs.

Everything but the first test needs a GPU and is skipped without one. The CUDA kernels
(csrc/cuda/*.cu) must compute the contract of the CPU ones (docs/DESIGN.md sections 1 and 2):
the same values to float rounding, the same dtypes, and the same in-kernel noise for the
same (seed, offset).
"""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastvae
from fastvae import reference

OPS = (
    "latent_terms",
    "latent_terms_backward",
    "bernoulli_log_prob",
    "bernoulli_log_prob_backward",
    "gaussian_log_prob",
    "gaussian_log_prob_backward",
)


def test_cuda_kernels_registered_when_built():
    """Runs without a GPU: a CUDA build of the extension must register every op for CUDA."""
    if not fastvae.cuda_kernels_built():
        pytest.skip(f"the installed fastvae extension has no CUDA kernels (backend: {fastvae.backend()})")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvae::{op}", "CPU"), op


pytestmark_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and fastvae.cuda_kernels_built()),
    reason="needs a CUDA device and the extension built with its CUDA kernels",
)

CUDA = "cuda"


def make_inputs(batch=5, dim=7, dtype=torch.float64, requires_grad=False, seed=0, device=CUDA):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    logvar = (0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    return mu.requires_grad_(requires_grad), logvar.requires_grad_(requires_grad)


def make_likelihood_inputs(batch=4, pixels=10, samples=None, dtype=torch.float64, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, pixels) if samples is None else (samples, batch, pixels)
    params = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=CUDA, dtype=dtype)
    # Strictly inside (0, 1) so that gradcheck's perturbations keep x a valid Bernoulli target.
    x = (0.1 + 0.8 * torch.rand(batch, pixels, generator=gen, dtype=torch.float64)).to(device=CUDA, dtype=dtype)
    return params.requires_grad_(requires_grad), x


def on_cpu(tensors):
    return [t.detach().cpu() for t in tensors]


# ---------------------------------------------------------------------------
# 1. Values: float64 against the reference and torch.distributions
# ---------------------------------------------------------------------------
@pytestmark_gpu
@pytest.mark.parametrize("num_samples", [None, 1, 4])
def test_latent_float64_matches_reference_and_distributions(num_samples):
    mu, logvar = make_inputs(batch=6, dim=33)
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=torch.float64, device=CUDA)
    out = fastvae.latent_terms(mu, logvar, num_samples, eps=eps)
    assert all(t.device.type == "cuda" for t in out)
    ref = reference.latent_terms(mu.cpu(), logvar.cpu(), eps.cpu(), num_samples)
    for got, want in zip(on_cpu(out), ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    std = torch.exp(0.5 * logvar)
    q = Normal(mu, std)
    z = mu + std * eps
    torch.testing.assert_close(out.kl, kl_divergence(q, Normal(0.0, 1.0)).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_q, q.log_prob(z).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_p, Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-10, atol=1e-12)


@pytestmark_gpu
@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("pixels", [10, 300, 1000])
def test_likelihoods_float64_match_reference_and_distributions(samples, pixels):
    logits, x = make_likelihood_inputs(batch=5, pixels=pixels, samples=samples)
    x = x.round()
    got = fastvae.bernoulli_log_likelihood(logits, x)
    torch.testing.assert_close(got.cpu(), reference.bernoulli_log_prob(logits.cpu(), x.cpu()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1), rtol=1e-10,
                               atol=1e-10)
    for logvar in (-1.5, torch.randn(pixels, dtype=torch.float64, device=CUDA)):
        got = fastvae.gaussian_log_likelihood(logits, x, logvar)
        lv_cpu = logvar.cpu().expand_as(logits.cpu()) if isinstance(logvar, torch.Tensor) else None
        want = reference.gaussian_log_prob(logits.cpu(), x.cpu(), lv_cpu, 0.0 if lv_cpu is not None else logvar)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
        std = torch.exp(0.5 * torch.as_tensor(logvar, dtype=torch.float64, device=CUDA))
        torch.testing.assert_close(got, Normal(logits, std).log_prob(x).sum(-1), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# 2. float32 (in-kernel noise), float16 and bfloat16
# ---------------------------------------------------------------------------
@pytestmark_gpu
@pytest.mark.parametrize("num_samples", [None, 3])
def test_latent_float32_in_kernel_noise_matches_reference(num_samples):
    mu, logvar = make_inputs(batch=16, dim=33, dtype=torch.float32)
    out = fastvae.latent_terms(mu, logvar, num_samples, seed=123, offset=7)
    ref = reference.latent_terms(mu.cpu(), logvar.cpu(), None, num_samples, 123, 7)
    for got, want in zip(on_cpu(out), ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-4)


@pytestmark_gpu
def test_likelihoods_float32_match_reference():
    logits, x = make_likelihood_inputs(batch=64, pixels=784, samples=5, dtype=torch.float32)
    x = x.round()
    got = fastvae.bernoulli_log_likelihood(logits, x)
    assert got.dtype == torch.float32 and got.shape == (5, 64)
    want = reference.bernoulli_log_prob(logits.double().cpu(), x.double().cpu())
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-3)
    got = fastvae.gaussian_log_likelihood(logits, x, -0.5)
    want = reference.gaussian_log_prob(logits.double().cpu(), x.double().cpu(), None, -0.5)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-3)


@pytestmark_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    mu, logvar = make_inputs(batch=8, dim=300, dtype=dtype)
    eps = torch.randn(8, 300, device=CUDA).to(dtype)
    out = fastvae.latent_terms(mu, logvar, eps=eps)
    assert out.z.dtype == dtype
    assert out.kl.dtype == out.log_q.dtype == out.log_p.dtype == torch.float32
    ref = reference.latent_terms(mu.double().cpu(), logvar.double().cpu(), eps.double().cpu())
    torch.testing.assert_close(out.kl.double().cpu(), ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.log_q.double().cpu(), ref[2], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.log_p.double().cpu(), ref[3], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.z.double().cpu(), ref[0], rtol=1e-2, atol=1e-2)
    # The CUDA and CPU kernels agree on dtypes and values.
    cpu = fastvae.latent_terms(mu.cpu(), logvar.cpu(), eps=eps.cpu())
    for got, want in zip(on_cpu(out), cpu):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-3)

    logits, x = make_likelihood_inputs(batch=8, pixels=784, samples=2, dtype=dtype)
    x = x.round()
    for got, want in [
        (fastvae.bernoulli_log_likelihood(logits, x), reference.bernoulli_log_prob(logits.double(), x.double())),
        (fastvae.gaussian_log_likelihood(logits, x, -1.0),
         reference.gaussian_log_prob(logits.double(), x.double(), None, -1.0)),
    ]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-2)


@pytestmark_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward_dtypes(dtype):
    mu, logvar = make_inputs(batch=4, dim=16, dtype=dtype, requires_grad=True)
    out = fastvae.latent_terms(mu, logvar, 2, seed=1)
    (out.z.float().sum() + out.kl.sum() + out.log_q.sum() + out.log_p.sum()).backward()
    assert mu.grad.dtype == dtype and logvar.grad.dtype == dtype
    logits, x = make_likelihood_inputs(batch=4, pixels=20, dtype=dtype, requires_grad=True)
    fastvae.gaussian_log_likelihood(logits, x, -1.0).sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------------------
# 3. Gradients (float64)
# ---------------------------------------------------------------------------
@pytestmark_gpu
@pytest.mark.parametrize("num_samples", [None, 3])
def test_latent_gradcheck(num_samples):
    mu, logvar = make_inputs(batch=3, dim=4, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m, lv: tuple(fastvae.latent_terms(m, lv, num_samples, seed=5)), (mu, logvar)
    )


@pytestmark_gpu
@pytest.mark.parametrize("stl", [False, True])
def test_latent_gradients_match_reference_autograd(stl):
    mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True)
    weights = [torch.randn(3, 4, 6), torch.randn(4), torch.randn(3, 4), torch.randn(3, 4)]
    weights = [w.to(device=CUDA, dtype=torch.float64) for w in weights]

    def loss(outputs):
        return sum((w * o).sum() for w, o in zip(weights, outputs))

    got = torch.autograd.grad(loss(fastvae.latent_terms(mu, logvar, 3, seed=9, stl=stl)), (mu, logvar))
    eps = torch.stack([reference.philox_normal(4 * 6, 9, sample=l) for l in range(3)]).view(3, 4, 6)
    eps = eps.double().to(CUDA)
    want = torch.autograd.grad(loss(reference.latent_terms(mu, logvar, eps, 3, stl=stl)), (mu, logvar))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytestmark_gpu
@pytest.mark.parametrize("samples", [None, 2])
def test_likelihood_gradcheck(samples):
    logits, x = make_likelihood_inputs(batch=3, pixels=5, samples=samples, requires_grad=True)
    x.requires_grad_()
    assert torch.autograd.gradcheck(fastvae.bernoulli_log_likelihood, (logits, x))
    logvar = (0.3 * torch.randn(5, dtype=torch.float64, device=CUDA)).requires_grad_()
    assert torch.autograd.gradcheck(fastvae.gaussian_log_likelihood, (logits, x, logvar))
    assert torch.autograd.gradcheck(lambda m, t: fastvae.gaussian_log_likelihood(m, t, -0.7), (logits, x))


@pytestmark_gpu
def test_cuda_gradients_match_cpu_gradients():
    weights = (torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    grads = {}
    for device in ("cpu", CUDA):
        mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True, device=device)
        out = fastvae.latent_terms(mu, logvar, 3, seed=21, offset=2, stl=True)
        loss = (weights[0].to(device) * out.z).sum() + (weights[1].to(device) * out.kl).sum()
        loss = loss + out.log_q.sum() - 0.5 * out.log_p.sum()
        grads[device] = on_cpu(torch.autograd.grad(loss, (mu, logvar)))
    for g, w in zip(grads[CUDA], grads["cpu"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 4. Registration: opcheck
# ---------------------------------------------------------------------------
@requires_cuda_kernels
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_latent(requires_grad):
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32, requires_grad=requires_grad)
    eps = torch.randn(2, 3, 5, device=CUDA)
    op = torch.ops.fastvae.latent_terms.default
    torch.library.opcheck(op, (mu, logvar, eps, 2, 11, 0, 0, False))
    torch.library.opcheck(op, (mu, logvar, None, 2, 11, 0, 7, False))
    torch.library.opcheck(op, (mu, logvar, None, None, 11, 3, 0, True))


@requires_cuda_kernels
def test_opcheck_latent_backward():
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32)
    z = torch.randn(2, 3, 5, device=CUDA)
    grads = (torch.randn(2, 3, 5, device=CUDA), torch.randn(3, device=CUDA), None, torch.randn(2, 3, device=CUDA))
    op = torch.ops.fastvae.latent_terms_backward.default
    torch.library.opcheck(op, (*grads, z, mu, logvar, False))
    grads = (None, None, torch.randn(2, 3, device=CUDA), None)
    torch.library.opcheck(op, (*grads, z, mu, logvar, True))


@requires_cuda_kernels
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_likelihoods(requires_grad):
    logits, x = make_likelihood_inputs(batch=3, pixels=7, samples=2, dtype=torch.float32,
                                       requires_grad=requires_grad)
    logvar = torch.randn(2, 3, 7, device=CUDA).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastvae.bernoulli_log_prob.default, (logits, x))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob.default, (logits, x, None, -0.5))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob.default, (logits, x, logvar, 0.0))
    grad = torch.randn(2, 3, device=CUDA)
    torch.library.opcheck(torch.ops.fastvae.bernoulli_log_prob_backward.default, (grad, logits.detach(), x, True))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob_backward.default,
                          (grad, logits.detach(), x, logvar.detach(), 0.0, True))
    torch.library.opcheck(torch.ops.fastvae.gaussian_log_prob_backward.default,
                          (grad, logits.detach(), x, None, -1.0, False))


# ---------------------------------------------------------------------------
# 5. Randomness: the same (seed, offset) gives the same z on CPU and CUDA
# ---------------------------------------------------------------------------
@pytestmark_gpu
@pytest.mark.parametrize("row_offset", [0, 3])
@pytest.mark.parametrize("shape", [(3, 37, 2), (2, 1500, 2), (5, 4, None), (1, 1, 3)])
def test_in_kernel_noise_agrees_between_cpu_and_cuda(shape, row_offset):
    batch, dim, samples = shape
    mu, logvar = make_inputs(batch=batch, dim=dim, dtype=torch.float32, device="cpu")
    kwargs = dict(seed=2**40 + 3, offset=5, row_offset=row_offset)
    cpu = fastvae.latent_terms(mu, logvar, samples, **kwargs)
    gpu = fastvae.latent_terms(mu.to(CUDA), logvar.to(CUDA), samples, **kwargs)
    got = on_cpu(gpu)
    torch.testing.assert_close(got[0], cpu.z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], cpu.kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[2], cpu.log_q, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[3], cpu.log_p, rtol=1e-5, atol=1e-3)


@pytestmark_gpu
def test_in_kernel_noise_is_the_reference_stream_in_every_dtype():
    expected = torch.stack([reference.philox_normal(3 * 37, 2**40 + 3, 5, sample=l) for l in range(2)])
    expected = expected.view(2, 3, 37).double()
    for dtype, tol in [(torch.float64, 1e-5), (torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 3e-3)]:
        zeros = torch.zeros(3, 37, device=CUDA, dtype=dtype)
        z = fastvae.latent_terms(zeros, zeros, 2, seed=2**40 + 3, offset=5).z
        assert z.dtype == dtype
        torch.testing.assert_close(z.double().cpu(), expected, rtol=tol, atol=tol)


@pytestmark_gpu
@pytest.mark.parametrize("num_samples", [None, 3])
def test_row_offset_draws_a_shard_of_the_global_batch(num_samples):
    mu, logvar = make_inputs(batch=10, dim=7, dtype=torch.float32)
    whole = fastvae.latent_terms(mu, logvar, num_samples, seed=21).z
    first = fastvae.latent_terms(mu[:4], logvar[:4], num_samples, seed=21).z
    second = fastvae.latent_terms(mu[4:], logvar[4:], num_samples, seed=21, row_offset=4).z
    torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=0, atol=0)
    ref = reference.latent_terms(mu[4:].cpu(), logvar[4:].cpu(), None, num_samples, 21, 0, 4)
    torch.testing.assert_close(second.cpu(), ref[0], rtol=1e-5, atol=1e-5)


@pytestmark_gpu
def test_cuda_seeding_is_reproducible():
    mu, logvar = make_inputs(dtype=torch.float32)
    torch.manual_seed(0)
    first = [fastvae.reparameterize(mu, logvar) for _ in range(2)]
    torch.manual_seed(0)
    second = [fastvae.reparameterize(mu, logvar) for _ in range(2)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])
    a = fastvae.latent_terms(mu, logvar, 3, seed=1).z
    assert torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=1).z)
    assert not torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=1, offset=1).z)


@pytestmark_gpu
def test_cuda_noise_is_standard_normal():
    n = 1_000_000
    zeros = torch.zeros(1000, 1000, device=CUDA)
    eps = fastvae.reparameterize(zeros, zeros, seed=12345).double().flatten()
    assert abs(eps.mean().item()) < 5e-3
    assert abs(eps.var().item() - 1.0) < 7e-3
    assert abs(eps.pow(4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)


# ---------------------------------------------------------------------------
# 6. torch.compile, including CUDA graphs (mode="reduce-overhead")
# ---------------------------------------------------------------------------
def _elbo_step(mu, logvar, x):
    out = fastvae.latent_terms(mu, logvar, 2, seed=11, offset=3)
    rec = fastvae.bernoulli_log_likelihood(out.z, x, check_range=False)
    rec_g = fastvae.gaussian_log_likelihood(out.z, x, -1.0)
    iwae = torch.logsumexp(rec + out.log_p - out.log_q, dim=0) - math.log(2)
    return -(rec.mean(0) - out.kl).mean() - iwae.mean() - 0.01 * rec_g.mean()


@requires_cuda_kernels
def test_torch_compile_fullgraph_inductor():
    mu, logvar = make_inputs(batch=8, dim=6, dtype=torch.float32, requires_grad=True)
    x = torch.rand(8, 6, device=CUDA).round()
    compiled = torch.compile(_elbo_step, fullgraph=True)
    got = compiled(mu, logvar, x)
    want = _elbo_step(mu, logvar, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (mu, logvar)), torch.autograd.grad(want, (mu, logvar))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@requires_cuda_kernels
def test_torch_compile_reduce_overhead_cuda_graphs():
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(_elbo_step, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, recording, then replays
        mu, logvar = make_inputs(batch=8, dim=6, dtype=torch.float32, requires_grad=True, seed=step)
        x = torch.rand(8, 6, device=CUDA).round()
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(mu, logvar, x)
        got_grads = [g.clone() for g in torch.autograd.grad(loss, (mu, logvar))]
        got = loss.detach().clone()
        want = _elbo_step(mu, logvar, x)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, torch.autograd.grad(want, (mu, logvar))):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# ---------------------------------------------------------------------------
# 7. Shapes, layouts and bad inputs on CUDA
# ---------------------------------------------------------------------------
@pytestmark_gpu
def test_non_contiguous_and_empty_inputs():
    base_mu, logvar = make_inputs(batch=6, dim=10)
    mu = torch.empty(10, 6, dtype=torch.float64, device=CUDA).t()
    mu.copy_(base_mu)
    assert not mu.is_contiguous()
    eps = torch.randn(6, 20, dtype=torch.float64, device=CUDA)[:, ::2]
    got = fastvae.latent_terms(mu, logvar, eps=eps)
    want = fastvae.latent_terms(base_mu, logvar, eps=eps.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    out = fastvae.latent_terms(torch.zeros(0, 4, device=CUDA), torch.zeros(0, 4, device=CUDA), 2, seed=0)
    assert out.z.shape == (2, 0, 4) and out.kl.shape == (0,) and out.log_q.shape == (2, 0)
    empty = fastvae.bernoulli_log_likelihood(torch.zeros(2, 0, 5, device=CUDA), torch.zeros(0, 5, device=CUDA))
    assert empty.shape == (2, 0)
    zero_dim = fastvae.latent_terms(torch.zeros(3, 0, device=CUDA), torch.zeros(3, 0, device=CUDA), seed=0)
    assert torch.equal(zero_dim.kl, torch.zeros(3, device=CUDA))


@pytestmark_gpu
def test_nan_and_inf_propagate_to_their_row_only():
    mu, logvar = make_inputs(batch=3, dim=4, dtype=torch.float32)
    mu[1, 2] = float("nan")
    logvar[2, 0] = float("inf")
    out = fastvae.latent_terms(mu, logvar, seed=1)
    assert torch.isnan(out.kl[1]) and not torch.isfinite(out.kl[2]) and torch.isfinite(out.kl[0])
    assert torch.isfinite(out.z[0]).all() and torch.isnan(out.z[1, 2])


@pytestmark_gpu
def test_extreme_logvar_is_exact_where_float32_can_hold_it():
    mu = torch.zeros(1, 3, device=CUDA)
    logvar = torch.tensor([[80.0, -80.0, 0.0]], device=CUDA)
    kl = fastvae.latent_terms(mu, logvar, eps=torch.zeros(1, 3, device=CUDA)).kl
    expected = 0.5 * (math.exp(80.0) - 1 - 80.0 + math.exp(-80.0) - 1 + 80.0)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(expected, rel=1e-5)


@requires_cuda_kernels
def test_bad_inputs_raise_clear_errors():
    mu, logvar = make_inputs(batch=3, dim=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="same device|is on"):
        fastvae.latent_terms(mu, logvar.cpu(), seed=0)
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.latent_terms(mu, logvar, torch.zeros(3, 4), None, 0, 0)
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.latent_terms_backward(
            None, torch.zeros(3), None, None, torch.zeros(3, 4, device=CUDA), mu, logvar, False
        )
    logits, x = make_likelihood_inputs(batch=3, pixels=5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.bernoulli_log_prob(logits, x.cpu())
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.bernoulli_log_prob_backward(torch.zeros(3), logits, x, False)
    with pytest.raises(RuntimeError, match="num_samples must be >= 1"):
        torch.ops.fastvae.latent_terms(mu, logvar, None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="row_offset must be >= 0"):
        torch.ops.fastvae.latent_terms(mu, logvar, None, 1, 0, 0, -1)
