"""The fused latent op: values, gradients, registration, randomness, bad inputs.

Most tests run on every device of tests/devices.py (CUDA where a GPU and the CUDA kernels
are there); the CUDA kernels must compute the CPU ones' contract: the same values to float
rounding, the same dtypes, and the same in-kernel noise for the same (seed, offset).
"""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import fastvae
from devices import CUDA_ONLY, DEVICES, generator_for
from fastvae.ops import reference

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")


def make_inputs(batch=5, dim=7, dtype=torch.float64, requires_grad=False, seed=0, device="cpu"):
    # Drawn on the CPU whatever the device, so every device sees the same numbers.
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    logvar = (0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    return mu.requires_grad_(requires_grad), logvar.requires_grad_(requires_grad)


def on_cpu(tensors):
    return [t.detach().cpu() for t in tensors]


# ---------------------------------------------------------------------------
# 1. Values against the reference and torch.distributions
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_samples", [None, 1, 4])
def test_float64_matches_torch_distributions(num_samples, device):
    mu, logvar = make_inputs(batch=6, dim=33, device=device)
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    out = fastvae.latent_terms(mu, logvar, num_samples, eps=eps)
    assert all(t.device == mu.device for t in out)
    std = torch.exp(0.5 * logvar)
    q = Normal(mu, std)
    z = mu + std * eps
    # The kernels may fuse mu + std*eps into one FMA (one rounding, not two): where the sum
    # cancels to near 0 that differs from this z by more than rtol alone allows, hence atol.
    torch.testing.assert_close(out.z, z, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.kl, kl_divergence(q, Normal(0.0, 1.0)).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_q, q.log_prob(z).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_p, Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("num_samples", [None, 3])
def test_matches_reference(dtype, tol, num_samples, device):
    mu, logvar = make_inputs(batch=16, dim=33, dtype=dtype, device=device)
    out = fastvae.latent_terms(mu, logvar, num_samples, seed=123, offset=7)
    ref = reference.latent_terms(mu.cpu(), logvar.cpu(), None, num_samples, 123, 7)
    # In-kernel noise is drawn in float32, so z agrees to float32 rounding in every dtype.
    noise_tol = max(tol, 2e-6)
    for got, want in zip(on_cpu(out), ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=noise_tol, atol=noise_tol * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype, device):
    mu, logvar = make_inputs(batch=8, dim=300, dtype=dtype, device=device)
    eps = torch.randn(8, 300).to(device=device, dtype=dtype)
    out = fastvae.latent_terms(mu, logvar, eps=eps)
    assert out.z.dtype == dtype and out.kl.dtype == torch.float32 and out.log_q.dtype == torch.float32
    assert out.log_p.dtype == torch.float32
    ref = reference.latent_terms(mu.double().cpu(), logvar.double().cpu(), eps.double().cpu())
    torch.testing.assert_close(out.kl.double().cpu(), ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.log_q.double().cpu(), ref[2], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.log_p.double().cpu(), ref[3], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.z.double().cpu(), ref[0], rtol=1e-2, atol=1e-2)
    # Every device's kernels agree with the CPU ones on dtypes and values.
    cpu = fastvae.latent_terms(mu.cpu(), logvar.cpu(), eps=eps.cpu())
    for got, want in zip(on_cpu(out), cpu):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward_dtypes(dtype, device):
    mu, logvar = make_inputs(batch=4, dim=16, dtype=dtype, requires_grad=True, device=device)
    out = fastvae.latent_terms(mu, logvar, 2, seed=1)
    (out.z.float().sum() + out.kl.sum() + out.log_q.sum() + out.log_p.sum()).backward()
    assert mu.grad.dtype == dtype and logvar.grad.dtype == dtype
    assert torch.isfinite(mu.grad.float()).all() and torch.isfinite(logvar.grad.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logvar_is_exact_where_float32_can_hold_it(device):
    mu = torch.zeros(1, 3, device=device)
    logvar = torch.tensor([[80.0, -80.0, 0.0]], device=device)
    kl = fastvae.latent_terms(mu, logvar, eps=torch.zeros(1, 3, device=device)).kl
    expected = 0.5 * (math.exp(80.0) - 1 - 80.0 + math.exp(-80.0) - 1 + 80.0)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate_to_their_row_only(device):
    mu, logvar = make_inputs(batch=3, dim=4, dtype=torch.float32, device=device)
    mu[1, 2] = float("nan")
    logvar[2, 0] = float("inf")
    out = fastvae.latent_terms(mu, logvar, seed=1)
    # (logvar = inf gives inf - inf inside the KL formula: NaN, as in torch.distributions.)
    assert torch.isnan(out.kl[1]) and not torch.isfinite(out.kl[2]) and torch.isfinite(out.kl[0])
    assert torch.isfinite(out.z[0]).all() and torch.isnan(out.z[1, 2])


# ---------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_samples", [None, 3])
def test_gradcheck(num_samples, device):
    # (stl=True is deliberately not the gradient of the outputs: it drops log_q's score
    # term. It is checked against the reference's autograd below instead.)
    mu, logvar = make_inputs(batch=3, dim=4, requires_grad=True, device=device)
    assert torch.autograd.gradcheck(
        lambda m, lv: tuple(fastvae.latent_terms(m, lv, num_samples, seed=5)), (mu, logvar)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stl", [False, True])
def test_gradients_match_reference_autograd(stl, device):
    mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True, device=device)
    weights = [torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    weights += [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    weights = [w.to(device) for w in weights]

    def loss(outputs):
        return sum((w * o).sum() for w, o in zip(weights, outputs))

    got = torch.autograd.grad(loss(fastvae.latent_terms(mu, logvar, 3, seed=9, stl=stl)), (mu, logvar))
    eps = torch.stack([reference.philox_normal(4 * 6, 9, sample=l) for l in range(3)]).view(3, 4, 6).double()
    eps = eps.to(device)
    want = torch.autograd.grad(loss(reference.latent_terms(mu, logvar, eps, 3, stl=stl)), (mu, logvar))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_gradients_match_the_cpu_kernels(device):
    weights = (torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    grads = {}
    for where in ("cpu", device):
        mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True, device=where)
        out = fastvae.latent_terms(mu, logvar, 3, seed=21, offset=2, stl=True)
        loss = (weights[0].to(where) * out.z).sum() + (weights[1].to(where) * out.kl).sum()
        loss = loss + out.log_q.sum() - 0.5 * out.log_p.sum()
        grads[where] = on_cpu(torch.autograd.grad(loss, (mu, logvar)))
    for g, w in zip(grads[device], grads["cpu"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_unused_outputs_get_no_gradient_work(device):
    mu, logvar = make_inputs(batch=4, dim=6, requires_grad=True, device=device)
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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_eps", [False, True])
def test_opcheck(requires_grad, with_eps, device):
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32, requires_grad=requires_grad, device=device)
    eps = torch.randn(2, 3, 5, device=device) if with_eps else None
    torch.library.opcheck(torch.ops.fastvae.latent_terms.default, (mu, logvar, eps, 2, 11, 0, 0, False))
    torch.library.opcheck(torch.ops.fastvae.latent_terms.default, (mu, logvar, None, None, 11, 3, 7, True))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_from_generator(requires_grad, device):
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32, requires_grad=requires_grad, device=device)
    op = torch.ops.fastvae.latent_terms_from_generator.default
    assert torch.Tag.nondeterministic_seeded in op.tags
    # opcheck compares runs of the op, calling torch.manual_seed before each: with the default
    # generator every check applies. A generator of one's own is not reseeded, so the checks
    # that compare values are left out for it.
    torch.library.opcheck(op, (mu, logvar, 2, None, 0, False))
    torch.library.opcheck(op, (mu, logvar, None, None, 3, True))
    torch.library.opcheck(op, (mu, logvar, 2, generator_for(device, 5), 0, False),
                          test_utils=("test_schema", "test_faketensor"))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    mu, logvar = make_inputs(batch=3, dim=5, dtype=torch.float32, device=device)
    z = torch.randn(2, 3, 5, device=device)
    grads = (torch.randn(2, 3, 5, device=device), torch.randn(3, device=device), None,
             torch.randn(2, 3, device=device))
    op = torch.ops.fastvae.latent_terms_backward.default
    torch.library.opcheck(op, (*grads, z, mu, logvar, False))
    grads = (None, None, torch.randn(2, 3, device=device), None)
    torch.library.opcheck(op, (*grads, z, mu, logvar, True))


@requires_cpp  # the reference backend draws its noise with NumPy, which Dynamo cannot trace
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def elbo_terms(mu, logvar):
        out = fastvae.latent_terms(mu, logvar, 2, seed=4)
        return (out.log_p - out.log_q).mean() - out.kl.mean() + out.z.pow(2).mean()

    mu, logvar = make_inputs(batch=4, dim=3, dtype=torch.float32, requires_grad=True, device=device)
    # Inductor's CPU code generation takes minutes on a loaded machine; aot_eager traces the
    # same graph (fakes, autograd) without it.
    compiled = torch.compile(elbo_terms, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    got = compiled(mu, logvar)
    want = elbo_terms(mu, logvar)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (mu, logvar))
    want_grads = torch.autograd.grad(elbo_terms(mu, logvar), (mu, logvar))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_draws_fresh_noise_without_a_seed(device):
    # Without seed= the draw is part of the compiled graph (fastvae::latent_terms_from_generator):
    # no graph break under fullgraph=True, new noise at every call, torch.manual_seed
    # reproduces it, and it is the noise eager code draws from the same generator state.
    def sample(mu, logvar):
        out = fastvae.latent_terms(mu, logvar, 2)
        return out.z, (out.log_p - out.log_q).mean() - out.kl.mean() + out.z.pow(2).mean()

    mu, logvar = make_inputs(batch=4, dim=3, dtype=torch.float32, requires_grad=True, device=device)
    compiled = torch.compile(sample, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.manual_seed(0)
    first, loss = compiled(mu, logvar)
    second, _ = compiled(mu, logvar)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    again, _ = compiled(mu, logvar)
    assert torch.equal(again, first)
    torch.manual_seed(0)
    eager, eager_loss = sample(mu, logvar)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    got = torch.autograd.grad(loss, (mu, logvar))
    want = torch.autograd.grad(eager_loss, (mu, logvar))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _elbo_step(mu, logvar, x, **noise):
    out = fastvae.latent_terms(mu, logvar, 2, **noise)
    rec = fastvae.bernoulli_log_likelihood(out.z, x, check_range=False)
    rec_g = fastvae.gaussian_log_likelihood(out.z, x, -1.0)
    iwae = torch.logsumexp(rec + out.log_p - out.log_q, dim=0) - math.log(2)
    return -(rec.mean(0) - out.kl).mean() - iwae.mean() - 0.01 * rec_g.mean(), out.z


@requires_cpp
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_torch_compile_reduce_overhead_cuda_graphs(device):
    # mode="reduce-overhead" records the compiled step into a CUDA graph and replays it:
    # with seed= the values are eager's; without, each replay draws fresh noise.
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    step = lambda mu, logvar, x: _elbo_step(mu, logvar, x, seed=11, offset=3)  # noqa: E731
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    drawn = torch.compile(_elbo_step, mode="reduce-overhead", fullgraph=True)
    noises = []
    for i in range(4):  # warm-up, recording, then replays
        mu, logvar = make_inputs(batch=8, dim=6, dtype=torch.float32, requires_grad=True, seed=i, device=device)
        x = torch.rand(8, 6, device=device).round()
        torch.compiler.cudagraph_mark_step_begin()
        loss, _ = compiled(mu, logvar, x)
        got_grads = [g.clone() for g in torch.autograd.grad(loss, (mu, logvar))]
        got = loss.detach().clone()
        want, _ = step(mu, logvar, x)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, torch.autograd.grad(want, (mu, logvar))):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.compiler.cudagraph_mark_step_begin()
        _, z = drawn(*make_inputs(batch=8, dim=6, dtype=torch.float32, device=device), x)
        noises.append(z.clone())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for earlier, later in zip(noises, noises[1:]):
        assert not torch.equal(earlier, later)


@requires_cpp
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_graph_replays_draw_fresh_noise(device):
    # A captured graph reads the generator's Philox offset when it is replayed (torch's
    # graph-safe RNG), so each replay draws new noise: what an eager call would draw from the
    # generator's state at that moment, reproducible with torch.manual_seed.
    mu, logvar = make_inputs(batch=8, dim=37, dtype=torch.float32, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        fastvae.latent_terms(mu, logvar, 2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastvae.latent_terms(mu, logvar, 2)
    torch.manual_seed(0)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(out.z.clone())
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])
    torch.manual_seed(0)
    eager = [fastvae.latent_terms(mu, logvar, 2).z for _ in range(3)]
    for got, want in zip(replays, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


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


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_the_reference_stream_in_every_dtype(device):
    expected = torch.stack([reference.philox_normal(3 * 37, 2**40 + 3, 5, sample=l) for l in range(2)])
    expected = expected.view(2, 3, 37).double()
    for dtype, tol in [(torch.float64, 1e-5), (torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 3e-3)]:
        zeros = torch.zeros(3, 37, device=device, dtype=dtype)
        z = fastvae.latent_terms(zeros, zeros, 2, seed=2**40 + 3, offset=5).z
        assert z.dtype == dtype
        torch.testing.assert_close(z.double().cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("row_offset", [0, 3])
@pytest.mark.parametrize("shape", [(3, 37, 2), (2, 1500, 2), (5, 4, None), (1, 1, 3)])
def test_in_kernel_noise_agrees_with_the_cpu_kernels(shape, row_offset, device):
    batch, dim, samples = shape
    mu, logvar = make_inputs(batch=batch, dim=dim, dtype=torch.float32)
    kwargs = dict(seed=2**40 + 3, offset=5, row_offset=row_offset)
    cpu = fastvae.latent_terms(mu, logvar, samples, **kwargs)
    got = on_cpu(fastvae.latent_terms(mu.to(device), logvar.to(device), samples, **kwargs))
    torch.testing.assert_close(got[0], cpu.z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], cpu.kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[2], cpu.log_q, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[3], cpu.log_p, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_samples", [None, 3])
def test_row_offset_draws_a_shard_of_the_global_batch(num_samples, device):
    mu, logvar = make_inputs(batch=10, dim=7, dtype=torch.float32, device=device)
    whole = fastvae.latent_terms(mu, logvar, num_samples, seed=21).z
    first = fastvae.latent_terms(mu[:4], logvar[:4], num_samples, seed=21).z
    second = fastvae.latent_terms(mu[4:], logvar[4:], num_samples, seed=21, row_offset=4).z
    torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=0, atol=0)
    ref = reference.latent_terms(mu[4:].cpu(), logvar[4:].cpu(), None, num_samples, 21, 0, 4)
    torch.testing.assert_close(second.cpu(), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_samples_different_seed_different_samples(device):
    mu, logvar = make_inputs(dtype=torch.float32, device=device)
    a = fastvae.latent_terms(mu, logvar, 3, seed=1).z
    assert torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=1).z)
    assert not torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=2).z)
    assert not torch.equal(a, fastvae.latent_terms(mu, logvar, 3, seed=1, offset=1).z)


@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_makes_draws_reproducible(device):
    mu, logvar = make_inputs(dtype=torch.float32, device=device)
    torch.manual_seed(0)
    first = [fastvae.reparameterize(mu, logvar) for _ in range(2)]
    torch.manual_seed(0)
    second = [fastvae.reparameterize(mu, logvar) for _ in range(2)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])
    third = fastvae.reparameterize(mu, logvar, generator=generator_for(device, 7))
    assert torch.equal(third, fastvae.reparameterize(mu, logvar, generator=generator_for(device, 7)))
    assert not torch.equal(third, fastvae.reparameterize(mu, logvar, generator=generator_for(device, 8)))


@pytest.mark.parametrize("device", DEVICES)
def test_drawn_noise_is_the_noise_of_the_drawn_seed(device):
    # Without seed=, the op draws (seed, offset) from the generator as fastvae.ops.draw_seed does
    # (on CPU one seed from the generator's stream; on CUDA its seed and Philox offset, which
    # moves on): eager results are what an explicit seed= of those values gives.
    mu, logvar = make_inputs(batch=6, dim=9, dtype=torch.float32, device=device)
    gen = generator_for(device, 123)
    seeds = [fastvae.ops.draw_seed(mu.device, gen) for _ in range(2)]
    gen = generator_for(device, 123)
    for seed, offset in seeds:
        drawn = fastvae.latent_terms(mu, logvar, 3, generator=gen, row_offset=1)
        chosen = fastvae.latent_terms(mu, logvar, 3, seed=seed, offset=offset, row_offset=1)
        for got, want in zip(drawn, chosen):
            assert torch.equal(got, want)


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


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_standard_normal(device):
    n = 1_000_000
    zeros = torch.zeros(1000, 1000, device=device)
    eps = fastvae.reparameterize(zeros, zeros, seed=12345).double().flatten()
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
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base_mu, base_logvar = make_inputs(batch=6, dim=10, device=device)
    mu, logvar = base_mu.t().contiguous().t(), base_logvar[:, ::1]
    mu_nc = torch.randn(10, 6, dtype=torch.float64, device=device).t()
    mu_nc.copy_(base_mu)
    assert not mu_nc.is_contiguous()
    eps = torch.randn(6, 20, dtype=torch.float64, device=device)[:, ::2]
    got = fastvae.latent_terms(mu_nc, logvar, eps=eps)
    want = fastvae.latent_terms(mu.contiguous(), logvar.contiguous(), eps=eps.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_empty_outputs(device):
    empty = torch.zeros(0, 4, device=device)
    out = fastvae.latent_terms(empty, empty, 2, seed=0)
    assert out.z.shape == (2, 0, 4) and out.kl.shape == (0,) and out.log_q.shape == (2, 0)
    out = fastvae.latent_terms(empty, empty, 2)
    assert out.z.shape == (2, 0, 4) and out.kl.shape == (0,) and out.log_q.shape == (2, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_latent_dim_gives_zero_sums(device):
    out = fastvae.latent_terms(torch.zeros(3, 0, device=device), torch.zeros(3, 0, device=device), 2, seed=0)
    assert out.z.shape == (2, 3, 0)
    for total in (out.kl, out.log_q, out.log_p):
        assert torch.equal(total, torch.zeros_like(total))


@pytest.mark.parametrize("device", DEVICES)
def test_large_latent_dim_crosses_noise_chunks(device):
    mu, logvar = make_inputs(batch=2, dim=1500, dtype=torch.float32, device=device)
    out = fastvae.latent_terms(mu, logvar, 2, seed=8)
    ref = reference.latent_terms(mu.cpu(), logvar.cpu(), None, 2, 8)
    torch.testing.assert_close(out.z.cpu(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_q.cpu(), ref[2], rtol=1e-5, atol=1e-3)


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
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cpu_and_cuda_tensors_mixed_raise(device):
    mu, logvar = make_inputs(batch=3, dim=4, dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match="same device|is on"):
        fastvae.latent_terms(mu, logvar.cpu(), seed=0)
    with pytest.raises(RuntimeError, match="same device|is on"):
        fastvae.latent_terms(mu, logvar.cpu())
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.latent_terms(mu, logvar, torch.zeros(3, 4), None, 0, 0)
    with pytest.raises(RuntimeError, match="same device|is on"):
        torch.ops.fastvae.latent_terms_backward(
            None, torch.zeros(3), None, None, torch.zeros(3, 4, device=device), mu, logvar, False
        )
    with pytest.raises(RuntimeError, match="generator"):
        fastvae.latent_terms(mu, logvar, generator=torch.Generator())


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_call_is_validated_too(device):
    zeros = torch.zeros(2, 2, device=device)
    with pytest.raises(RuntimeError, match="num_samples must be >= 1"):
        torch.ops.fastvae.latent_terms(zeros, zeros, None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="row_offset must be >= 0"):
        torch.ops.fastvae.latent_terms(zeros, zeros, None, 1, 0, 0, -1)
    with pytest.raises(RuntimeError, match="num_samples must be >= 1"):
        torch.ops.fastvae.latent_terms_from_generator(zeros, zeros, 0, None)
    with pytest.raises(RuntimeError, match="row_offset must be >= 0"):
        torch.ops.fastvae.latent_terms_from_generator(zeros, zeros, 1, None, -1)
    # A rejected call leaves the generator's state alone.
    gen = generator_for(device, 3)
    state = gen.get_state()
    with pytest.raises(RuntimeError, match="logvar must have the shape of mu"):
        torch.ops.fastvae.latent_terms_from_generator(zeros, zeros[:1], 1, gen)
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(RuntimeError, match="grad_z must have the shape of z"):
        torch.ops.fastvae.latent_terms_backward(
            torch.zeros(3), None, None, None, torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), False
        )
