"""Property tests: every fused op against fastvae.ops.reference over drawn shapes, dtypes, value ranges,
sample counts L, noise offsets and row offsets, eps given and drawn in the kernel.

The profiles live in tests/conftest.py: a few examples per test by default, many in CI
(HYPOTHESIS_PROFILE=ci, which .ci/run sets). The tensors are made from a drawn seed, so
hypothesis shrinks the shapes, ranges and options, and a failure replays exactly.

Tolerances: sums are compared to the float64 reference within tol * (sum of the magnitudes of
their terms), tol the rounding of the dtype the op computes in (float32 for float16/bfloat16
inputs, which both the kernels and the reference accumulate in).
"""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fastvae.models import likelihoods
from fastvae import ops
from fastvae.ops import reference
from fastvae.ops._checks import _z_shape

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Rounding of the arithmetic each input dtype is computed in, and of the dtype z is stored in.
SUM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
STORE_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

dtypes = st.sampled_from(DTYPES)
sample_counts = st.one_of(st.none(), st.integers(1, 4))
seeds = st.integers(0, 2**31 - 1)
pixel_shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


def uniform(shape, low, high, seed, dtype):
    """Values drawn in float64 from [low, high], then rounded to dtype (the exact inputs the op sees)."""
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)


def assert_within(got, want, tol, scale, what):
    """|got - want| <= tol * (scale + 1), elementwise, in float64."""
    error = (got.double() - want.double()).abs()
    bound = (tol * (scale.double() + 1)).expand_as(error)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~(error <= bound)
    assert not bad.any(), f"{what}: error {error[bad].max().item():.3g} above {bound[bad].min().item():.3g}"


# ----------------------------------------------------------------------------- latent_terms
def latent_scales(mu, logvar, eps):
    """Per-row magnitude sums of the terms of kl and of log_q/log_p, (B,) and (L, B)."""
    mu, logvar, eps = mu.double(), logvar.double(), eps.double()
    std = torch.exp(0.5 * logvar)
    kl_terms = mu.pow(2) + logvar.exp() + 1 + logvar.abs()
    z = mu + std * eps
    density_terms = eps.pow(2) + logvar.abs() + z.pow(2) + math.log(2 * math.pi)
    return kl_terms.sum(-1), density_terms.sum(-1)


@given(batch=st.integers(0, 6), dim=st.integers(1, 9), num_samples=sample_counts, dtype=dtypes,
       mu_range=st.sampled_from([0.1, 3.0, 30.0]), logvar_range=st.sampled_from([(-1, 1), (-10, 5)]),
       stl=st.booleans(), seed=seeds)
def test_latent_terms_with_given_eps_matches_the_reference(batch, dim, num_samples, dtype, mu_range, logvar_range,
                                                           stl, seed):
    mu = uniform((batch, dim), -mu_range, mu_range, seed, dtype)
    logvar = uniform((batch, dim), *logvar_range, seed + 1, dtype)
    eps = uniform(_z_shape(mu, num_samples), -4, 4, seed + 2, dtype)
    got = ops.latent_terms(mu, logvar, num_samples, eps=eps, stl=stl)
    want = reference.latent_terms(mu.double(), logvar.double(), eps.double(), num_samples, stl=stl)
    kl_scale, density_scale = latent_scales(mu, logvar, eps)
    assert got.z.dtype == dtype
    z_scale = mu.double().abs() + torch.exp(0.5 * logvar.double()) * eps.double().abs()
    assert_within(got.z, want[0], STORE_TOL[dtype], z_scale, "z")
    assert_within(got.kl, want[1], SUM_TOL[dtype], kl_scale, "kl")
    assert_within(got.log_q, want[2], SUM_TOL[dtype], density_scale, "log_q")
    assert_within(got.log_p, want[3], SUM_TOL[dtype], density_scale, "log_p")


@given(batch=st.integers(1, 5), dim=st.integers(1, 6), num_samples=sample_counts,
       dtype=st.sampled_from([torch.float64, torch.float32]), stl=st.booleans(), seed=seeds)
def test_latent_terms_gradients_match_reference_autograd(batch, dim, num_samples, dtype, stl, seed):
    mu = uniform((batch, dim), -3, 3, seed, dtype).requires_grad_()
    logvar = uniform((batch, dim), -4, 2, seed + 1, dtype).requires_grad_()
    eps = uniform(_z_shape(mu, num_samples), -3, 3, seed + 2, dtype)
    upstream = [uniform(t.shape, -1, 1, seed + 3 + i, t.dtype)
                for i, t in enumerate(reference.latent_terms(mu, logvar, eps, num_samples))]

    def grads(outputs):
        return torch.autograd.grad(sum((o * g).sum() for o, g in zip(outputs, upstream)), (mu, logvar))

    got = grads(ops.latent_terms(mu, logvar, num_samples, eps=eps, stl=stl))
    want = grads(reference.latent_terms(mu, logvar, eps, num_samples, stl=stl))
    scale = 1 + mu.detach().abs() + logvar.detach().exp() * (1 + eps.abs().amax(0) if num_samples else 1 + eps.abs())
    for g, w, name in zip(got, want, ("mu", "logvar")):
        assert_within(g, w, 10 * SUM_TOL[dtype] * (num_samples or 1), scale, f"grad of {name}")


@given(batch=st.integers(1, 6), dim=st.integers(1, 9), num_samples=sample_counts,
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       noise_seed=st.integers(0, 2**63 - 1), offset=st.integers(0, 2**40), row_offset=st.integers(0, 10**6),
       seed=seeds)
def test_drawn_noise_is_the_reference_stream(batch, dim, num_samples, dtype, noise_seed, offset, row_offset, seed):
    mu = uniform((batch, dim), -2, 2, seed, dtype)
    logvar = uniform((batch, dim), -3, 1, seed + 1, dtype)
    got = ops.latent_terms(mu, logvar, num_samples, seed=noise_seed, offset=offset, row_offset=row_offset)
    want = reference.latent_terms(mu, logvar, None, num_samples, noise_seed, offset, row_offset)
    # The kernels draw in float32 (the reference in float64, then rounds): eps agrees to float32 rounding.
    eps = (want[0].double() - mu.double()) / torch.exp(0.5 * logvar.double())
    z_scale = mu.double().abs() + torch.exp(0.5 * logvar.double()) * (1 + eps.abs())
    assert_within(got.z, want[0], max(STORE_TOL[dtype], 2e-6), z_scale, "z")
    _, density_scale = latent_scales(mu, logvar, eps)
    assert_within(got.log_p, want[3], max(SUM_TOL[dtype], 1e-5), density_scale, "log_p")


@given(batch=st.integers(2, 9), dim=st.integers(1, 5), num_samples=sample_counts, noise_seed=seeds,
       cut=st.integers(1, 8), row_offset=st.integers(0, 1000), seed=seeds)
def test_shards_with_row_offsets_draw_exactly_their_rows(batch, dim, num_samples, noise_seed, cut, row_offset, seed):
    cut = min(cut, batch - 1)
    mu, logvar = uniform((batch, dim), -2, 2, seed, torch.float32), uniform((batch, dim), -2, 1, seed + 1,
                                                                             torch.float32)
    whole = ops.latent_terms(mu, logvar, num_samples, seed=noise_seed, row_offset=row_offset)
    first = ops.latent_terms(mu[:cut], logvar[:cut], num_samples, seed=noise_seed, row_offset=row_offset)
    rest = ops.latent_terms(mu[cut:], logvar[cut:], num_samples, seed=noise_seed, row_offset=row_offset + cut)
    assert torch.equal(torch.cat([first.z, rest.z], dim=-2), whole.z)
    assert torch.equal(torch.cat([first.log_q, rest.log_q], dim=-1), whole.log_q)


@given(batch=st.integers(1, 5), dim=st.integers(1, 6), num_samples=st.integers(1, 4), noise_seed=seeds, seed=seeds)
def test_more_samples_extend_the_draw(batch, dim, num_samples, noise_seed, seed):
    """Sample l's noise depends on l, not on L: L samples begin with the L - 1 (and the single) draw."""
    mu, logvar = uniform((batch, dim), -2, 2, seed, torch.float64), uniform((batch, dim), -2, 1, seed + 1,
                                                                              torch.float64)
    more = ops.latent_terms(mu, logvar, num_samples + 1, seed=noise_seed).z
    assert torch.equal(ops.latent_terms(mu, logvar, num_samples, seed=noise_seed).z, more[:num_samples])
    assert torch.equal(ops.latent_terms(mu, logvar, seed=noise_seed).z, more[0])


# ----------------------------------------------------------------------------- likelihoods
def likelihood_inputs(batch, pixels, num_samples, seed, dtype, low, high):
    params_shape = (batch, *pixels) if num_samples is None else (num_samples, batch, *pixels)
    return uniform(params_shape, low, high, seed, dtype)


@given(batch=st.integers(0, 5), pixels=pixel_shapes, num_samples=sample_counts, dtype=dtypes,
       logit_range=st.sampled_from([0.01, 3.0, 30.0, 100.0]), binary=st.booleans(), seed=seeds)
def test_bernoulli_matches_the_reference(batch, pixels, num_samples, dtype, logit_range, binary, seed):
    logits = likelihood_inputs(batch, pixels, num_samples, seed, dtype, -logit_range, logit_range)
    x = uniform((batch, *pixels), 0, 1, seed + 1, dtype)
    x = x.round() if binary else x
    got = ops.bernoulli_log_likelihood(logits, x)
    flat_logits = logits.double().flatten(-len(pixels))
    flat_x = x.double().flatten(1)
    want = reference.bernoulli_log_prob(flat_logits, flat_x)
    scale = (flat_x * flat_logits.abs() + torch.nn.functional.softplus(flat_logits)).sum(-1)
    assert_within(got, want, SUM_TOL[dtype], scale, "log p")


@given(batch=st.integers(1, 4), pixels=pixel_shapes, num_samples=sample_counts,
       dtype=st.sampled_from([torch.float64, torch.float32]), logit_range=st.sampled_from([0.5, 5.0, 50.0]),
       seed=seeds)
def test_bernoulli_gradients_match_reference_autograd(batch, pixels, num_samples, dtype, logit_range, seed):
    logits = likelihood_inputs(batch, pixels, num_samples, seed, dtype, -logit_range, logit_range).requires_grad_()
    x = uniform((batch, *pixels), 0, 1, seed + 1, dtype).requires_grad_()
    upstream = uniform(logits.shape[: logits.dim() - len(pixels)], -1, 1, seed + 2, dtype)

    def grads(log_p):
        return torch.autograd.grad((log_p * upstream).sum(), (logits, x))

    got = grads(ops.bernoulli_log_likelihood(logits, x))
    want = grads(reference.bernoulli_log_prob(logits.flatten(-len(pixels)), x.flatten(1)))
    assert_within(got[0], want[0].view(logits.shape), SUM_TOL[dtype], torch.ones(()), "grad of logits")
    assert_within(got[1], want[1].view(x.shape), SUM_TOL[dtype] * (num_samples or 1),
                  torch.tensor(logit_range), "grad of x")


@given(batch=st.integers(0, 5), pixels=pixel_shapes, num_samples=sample_counts, dtype=dtypes,
       logvar_kind=st.sampled_from(["float", "tensor", "per_pixel"]), logvar_range=st.sampled_from([(-1, 1), (-8, 4)]),
       seed=seeds)
def test_gaussian_matches_the_reference(batch, pixels, num_samples, dtype, logvar_kind, logvar_range, seed):
    mean = likelihood_inputs(batch, pixels, num_samples, seed, dtype, -2, 3)
    x = uniform((batch, *pixels), -1, 2, seed + 1, dtype)
    if logvar_kind == "float":
        logvar = float(uniform((), *logvar_range, seed + 2, torch.float64))
        full_logvar = torch.full(mean.shape, logvar, dtype=torch.float64)
    else:
        logvar = uniform(mean.shape if logvar_kind == "tensor" else pixels, *logvar_range, seed + 2, dtype)
        full_logvar = logvar.double().expand(mean.shape)
    got = ops.gaussian_log_likelihood(mean, x, logvar)
    n = len(pixels)
    flat_mean, flat_x, flat_logvar = mean.double().flatten(-n), x.double().flatten(1), full_logvar.flatten(-n)
    want = reference.gaussian_log_prob(flat_mean, flat_x, flat_logvar)
    scale = ((flat_x - flat_mean).pow(2) * torch.exp(-flat_logvar) + flat_logvar.abs() + math.log(2 * math.pi)).sum(-1)
    assert_within(got, want, SUM_TOL[dtype], scale, "log p")


@given(batch=st.integers(1, 4), pixels=pixel_shapes, num_samples=sample_counts,
       dtype=st.sampled_from([torch.float64, torch.float32]), learned=st.booleans(), seed=seeds)
def test_gaussian_gradients_match_reference_autograd(batch, pixels, num_samples, dtype, learned, seed):
    mean = likelihood_inputs(batch, pixels, num_samples, seed, dtype, -2, 2).requires_grad_()
    x = uniform((batch, *pixels), -1, 1, seed + 1, dtype)
    logvar = uniform(mean.shape, -3, 2, seed + 2, dtype).requires_grad_() if learned else -1.5
    upstream = uniform(mean.shape[: mean.dim() - len(pixels)], -1, 1, seed + 3, dtype)
    inputs = (mean, logvar) if learned else (mean,)
    n = len(pixels)

    def grads(log_p):
        return torch.autograd.grad((log_p * upstream).sum(), inputs)

    got = grads(ops.gaussian_log_likelihood(mean, x, logvar))
    ref_logvar = logvar.flatten(-n) if learned else None
    want = grads(reference.gaussian_log_prob(mean.flatten(-n), x.flatten(1), ref_logvar, -1.5))
    scale = (1 + (x - mean.detach()).pow(2)) * (torch.exp(-logvar.detach()) if learned else math.exp(1.5))
    for g, w in zip(got, want):
        assert_within(g, w.view(g.shape), SUM_TOL[dtype], scale, "gradient")


# ----------------------------------------------------------------------------- every declared likelihood
# Each likelihood whose declaration names a reference (every fused one) is checked here through its
# declaration, as the model calls it: a new fused likelihood gets these tests without an edit.
FUSED = [name for name in likelihoods.names() if likelihoods.get(name).reference is not None]


def data_of_kind(kind, shape, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    if kind == "binary":
        x = torch.randint(0, 2, shape, generator=generator).double()
    elif kind == "8bit":
        x = torch.randint(0, 256, shape, generator=generator).double() / 255
    elif kind == "unit":
        x = torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        x = 6 * torch.rand(shape, generator=generator, dtype=torch.float64) - 3
    return x.to(dtype)


def declared_inputs(spec, batch, pixels, num_samples, dtype, param_range, seed):
    params = tuple(likelihood_inputs(batch, pixels, num_samples, seed + i, dtype, -param_range, param_range)
                   for i in range(spec.params_per_element))
    x = data_of_kind(spec.data, (batch, *pixels), seed + 10, dtype)
    settings = {"gaussian_logvar": float(uniform((), -param_range, param_range, seed + 11, torch.float64))}
    return params, x, settings


def element_magnitudes(spec, params, x, settings):
    """Sum over pixels of |log p| per element (the reference on one-pixel rows): the size of what is summed."""
    pixels = math.prod(x.shape[1:])
    rows = x.shape[0] * pixels
    lead = params[0].shape[: params[0].dim() - x.dim()]
    one_pixel = tuple(p.double().reshape(*lead, rows, 1) for p in params)
    per_element = spec.reference(one_pixel, x.double().reshape(rows, 1), settings)
    return per_element.abs().reshape(*lead, x.shape[0], pixels).sum(-1)


@given(name=st.sampled_from(FUSED), batch=st.integers(0, 4), pixels=pixel_shapes, num_samples=sample_counts,
       dtype=dtypes, param_range=st.sampled_from([0.5, 3.0, 10.0]), seed=seeds)
def test_every_fused_likelihood_matches_its_reference(name, batch, pixels, num_samples, dtype, param_range, seed):
    spec = likelihoods.get(name)
    params, x, settings = declared_inputs(spec, batch, pixels, num_samples, dtype, param_range, seed)
    got = spec.log_prob(params, x, settings)
    want = spec.reference(tuple(p.double() for p in params), x.double(), settings)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within(got, want, SUM_TOL[dtype], element_magnitudes(spec, params, x, settings), f"{name} log p")


@given(name=st.sampled_from(FUSED), batch=st.integers(1, 3), pixels=pixel_shapes, num_samples=sample_counts,
       dtype=st.sampled_from([torch.float64, torch.float32]), param_range=st.sampled_from([0.5, 3.0, 10.0]),
       seed=seeds)
def test_every_fused_likelihood_has_the_gradients_of_its_reference(name, batch, pixels, num_samples, dtype,
                                                                   param_range, seed):
    spec = likelihoods.get(name)
    params, x, settings = declared_inputs(spec, batch, pixels, num_samples, dtype, param_range, seed)
    upstream = uniform(params[0].shape[: params[0].dim() - len(pixels)], -1, 1, seed + 20, torch.float64)

    def grads(log_prob, inputs):
        inputs = tuple(p.detach().requires_grad_() for p in inputs)
        log_p = log_prob(inputs, x if inputs[0].dtype == dtype else x.double(), settings)
        return torch.autograd.grad((log_p.double() * upstream).sum(), inputs)

    got = grads(spec.log_prob, params)
    want = grads(spec.reference, tuple(p.double() for p in params))  # float64: the exact gradient
    for g, w, param_name in zip(got, want, spec.params):
        # One element's gradient is a few terms of its own size: float rounding of each.
        assert_within(g, w, 10 * STORE_TOL[dtype], w.abs(), f"{name}: gradient of {param_name}")
