"""The fused decoder head: output layer + reconstruction likelihood in one op, and the VAE's use of it."""

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Normal

import fastvae
from fastvae import ops
from fastvae.ops import reference
from fastvae.models import registry
from fastvae.models.vae import VAE

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
LIKELIHOODS = ["bernoulli", "gaussian", "gaussian_learned"]


def head_inputs(likelihood, batch=5, hidden=7, pixels=9, samples=3, bias=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = 2 if likelihood == "gaussian_learned" else 1
    shape = (batch, hidden) if samples is None else (samples, batch, hidden)
    h = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(k * pixels, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).to(dtype)
    b = (0.3 * torch.randn(k * pixels, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    x = torch.rand(batch, pixels, generator=gen, dtype=torch.float64).to(dtype)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x, generator=gen)
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    return h, weight, b, x


def unfused(h, weight, bias, x, likelihood, logvar=0.0):
    """The path the fused head replaces: the output layer, then the likelihood op."""
    raw = nn.functional.linear(h, weight, bias)
    if likelihood == "bernoulli":
        return fastvae.bernoulli_log_likelihood(raw, x)
    if likelihood == "gaussian":
        return fastvae.gaussian_log_likelihood(raw, x, logvar)
    pixels = x.shape[-1]
    return fastvae.gaussian_log_likelihood(raw[..., :pixels], x, raw[..., pixels:])


def distributions(h, weight, bias, x, likelihood, logvar=0.0):
    raw = nn.functional.linear(h, weight, bias)
    if likelihood == "bernoulli":
        return Bernoulli(logits=raw).log_prob(x.expand_as(raw)).sum(-1)
    pixels = x.shape[-1]
    if likelihood == "gaussian":
        return Normal(raw, torch.exp(torch.tensor(0.5 * logvar, dtype=raw.dtype))).log_prob(x).sum(-1)
    mean, log_variance = raw[..., :pixels], raw[..., pixels:]
    return Normal(mean, torch.exp(0.5 * log_variance)).log_prob(x).sum(-1)


def fused(h, weight, bias, x, likelihood, logvar=0.0, precompute=False):
    return ops.fused_head_log_likelihood(h, weight, bias, x, likelihood, logvar, precompute_grads=precompute)


def grads_of(fn, inputs, incoming):
    out = fn()
    leaves = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, leaves, incoming)


# ---------------------------------------------------------------------------
# 1. Values and gradients against the unfused path and torch.distributions
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_values_match_unfused_path_and_torch_distributions(likelihood, bias, samples):
    h, weight, b, x = head_inputs(likelihood, samples=samples, bias=bias)
    got = fused(h, weight, b, x, likelihood, -0.7)
    assert got.shape == h.shape[:-1] and got.dtype == torch.float64
    torch.testing.assert_close(got, unfused(h, weight, b, x, likelihood, -0.7), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(got, distributions(h, weight, b, x, likelihood, -0.7), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("incoming", ["per_row", "same_for_every_row"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradients_match_unfused_path(likelihood, bias, incoming, precompute):
    h, weight, b, x = head_inputs(likelihood, bias=bias)
    g = torch.randn(h.shape[:-1], dtype=torch.float64) if incoming == "per_row" else torch.full(h.shape[:-1], -0.3,
                                                                                                  dtype=torch.float64)
    inputs = (h, weight, b)
    want_out, want = grads_of(lambda: unfused(h, weight, b, x, likelihood, 0.4), inputs, g)
    got_out, got = grads_of(lambda: fused(h, weight, b, x, likelihood, 0.4, precompute), inputs, g)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-11)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_many_chunks_and_threads_give_the_unfused_numbers(likelihood):
    # 2100 rows of 50 float64 pixels span several CPU chunks (and threads when there are several).
    h, weight, b, x = head_inputs(likelihood, batch=700, hidden=16, pixels=50, samples=3)
    g = torch.randn(3, 700, dtype=torch.float64)
    for precompute in (False, True):
        want_out, want = grads_of(lambda: unfused(h, weight, b, x, likelihood), (h, weight, b), g)
        got_out, got = grads_of(lambda: fused(h, weight, b, x, likelihood, precompute=precompute), (h, weight, b), g)
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-10)
        for got_grad, want_grad in zip(got, want):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-11, atol=1e-10)


@requires_cpp
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_results_do_not_depend_on_the_thread_count(likelihood):
    h, weight, b, x = head_inputs(likelihood, batch=600, hidden=16, pixels=50, samples=2)
    g = torch.randn(2, 600, dtype=torch.float64)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(grads_of(lambda: fused(h, weight, b, x, likelihood), (h, weight, b), g))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(grads1[0], grads2[0], rtol=0, atol=0)  # per row: no cross-thread sum
    for a, c in zip(grads1[1:], grads2[1:]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-10)  # summed over rows in another order


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_reduced_precision(dtype, tol):
    h, weight, b, x = head_inputs("bernoulli", pixels=784, hidden=32, dtype=dtype)
    got = fused(h, weight, b, x, "bernoulli")
    assert got.dtype == torch.float32
    want = reference.fused_head_log_prob(h.double(), weight.double(), b.double(), x.double(), "bernoulli")
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)
    got.sum().backward()
    assert h.grad.dtype == dtype and weight.grad.dtype == dtype and b.grad.dtype == dtype


def test_images_are_flattened_and_data_dtype_promoted():
    h, weight, b, x = head_inputs("bernoulli", pixels=16)
    got = fused(h, weight, b, x.float().reshape(5, 1, 4, 4), "bernoulli")
    torch.testing.assert_close(got, unfused(h, weight, b, x, "bernoulli"), rtol=1e-12, atol=1e-11)


def test_empty_batch():
    h, weight, b, x = head_inputs("gaussian_learned", batch=0, samples=2)
    out = fused(h, weight, b, x, "gaussian_learned")
    assert out.shape == (2, 0)
    out.sum().backward()
    assert h.grad.shape == h.shape and (weight.grad == 0).all() and (b.grad == 0).all()


# ---------------------------------------------------------------------------
# 2. Training and inference paths
# ---------------------------------------------------------------------------
@requires_cpp
def test_inference_saves_nothing_and_records_no_graph():
    h, weight, b, x = head_inputs("bernoulli")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = fused(h, weight, b, x, "bernoulli", precompute=True)
        detached = fused(h.detach(), weight.detach(), b.detach(), x, "bernoulli", precompute=True)
    assert saved == [] and out.grad_fn is None and detached.grad_fn is None


@requires_cpp
@pytest.mark.parametrize("precompute", [False, True])
def test_training_saves_no_tensor_of_the_output_layers_size(precompute):
    h, weight, b, x = head_inputs("bernoulli", batch=10, hidden=4, pixels=50)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(h, weight, b, x, "bernoulli", precompute=precompute)
    raw_numel = h.shape[0] * h.shape[1] * weight.shape[0]
    assert saved and max(t.numel() for t in saved) < raw_numel


@requires_cpp
def test_double_backward_is_refused():
    h, weight, b, x = head_inputs("bernoulli")
    out = fused(h, weight, b, x, "bernoulli")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), h, create_graph=True)


# ---------------------------------------------------------------------------
# 3. gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradcheck(likelihood, precompute):
    h, weight, b, x = head_inputs(likelihood, batch=3, hidden=4, pixels=5, samples=2)
    # A per-row output (gradcheck's incoming gradients differ per row) and its sum (the same for every row).
    assert torch.autograd.gradcheck(lambda *t: fused(*t, x, likelihood, -0.2, precompute), (h, weight, b))
    assert torch.autograd.gradcheck(lambda *t: fused(*t, x, likelihood, -0.2, precompute).sum(), (h, weight, b))


@requires_cpp
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_opcheck(likelihood):
    h, weight, b, x = head_inputs(likelihood, batch=3, hidden=4, pixels=5)
    for args in [(h, weight, b, x, likelihood, 0.3, False), (h, weight, None, x, likelihood, 0.0, True)]:
        torch.library.opcheck(torch.ops.fastvae.fused_head_log_prob.default, args)
    torch.library.opcheck(torch.ops.fastvae.fused_head_log_prob_with_grads.default,
                          (h.detach(), weight.detach(), b.detach(), x, likelihood, 0.3))
    grad = torch.randn(h.shape[:-1], dtype=torch.float64)
    for needs in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(torch.ops.fastvae.fused_head_log_prob_backward.default,
                              (grad, h.detach(), weight.detach(), b.detach(), x, likelihood, 0.3, *needs))


@requires_cpp
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_torch_compile_fullgraph(likelihood):
    h, weight, b, x = head_inputs(likelihood, dtype=torch.float32)
    g = torch.randn(h.shape[:-1])

    def loss(h, weight, b):
        return (fused(h, weight, b, x, likelihood, 0.1, precompute=True) * g).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(loss(h, weight, b), (h, weight, b))
    got = torch.autograd.grad(compiled(h, weight, b), (h, weight, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


# ---------------------------------------------------------------------------
# 4. Bad inputs
# ---------------------------------------------------------------------------
def _bad_cases():
    h, weight, b, x = head_inputs("bernoulli")
    h, weight, b = h.detach(), weight.detach(), b.detach()
    return [
        ((h[0, 0], weight, b, x, "bernoulli"), "h must have shape"),
        ((h[:, :4], weight, b, x, "bernoulli"), "h must have shape"),
        ((h, weight[:, :3], b, x, "bernoulli"), "weight must have shape"),
        ((h, weight, b, x, "gaussian_learned"), r"weight must have shape \(2 \* num_pixels"),
        ((h, weight, b[:4], x, "bernoulli"), "bias must have shape"),
        ((h, weight.float(), b, x, "bernoulli"), "weight has dtype"),
        ((h, weight, b.float(), x, "bernoulli"), "bias has dtype"),
        ((h.int(), weight, b, x, "bernoulli"), "h must be a floating-point tensor"),
        ((h, weight, b, x, "poisson"), "likelihood must be"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_argument(case):
    args, match = _bad_cases()[case]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.fused_head_log_likelihood(*args)


@requires_cpp
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_direct_op_calls_are_validated(case):
    (h, weight, b, x, likelihood), match = _bad_cases()[case]
    if x.dim() == 2 and h.dtype == x.dtype:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastvae.fused_head_log_prob(h, weight, b, x, likelihood, 0.0, False)


def test_bernoulli_data_outside_unit_interval_and_x_needing_grad():
    h, weight, b, x = head_inputs("bernoulli")
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        fused(h, weight, b, x + 2, "bernoulli")
    with pytest.raises(RuntimeError, match="does not differentiate with respect to x"):
        fused(h, weight, b, x.clone().requires_grad_(), "bernoulli")


# ---------------------------------------------------------------------------
# 5. The VAE: the mlp decoder takes the fused head, with the same numbers
# ---------------------------------------------------------------------------
def _vae_pair(likelihood, condition_dim=0, hidden=(16, 12)):
    models = []
    for fused_head in (True, False):
        torch.manual_seed(0)
        models.append(VAE((1, 4, 4), 3, "mlp", likelihood=likelihood, condition_dim=condition_dim,
                          encoder_config={"hidden": [8]}, decoder_config={"hidden": list(hidden),
                                                                          "fused_head": fused_head}).double())
    return models


@pytest.mark.parametrize("objective", ["analytic", "monte_carlo", "iwae"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_vae_gives_the_same_elbo_and_gradients_with_and_without_the_fused_head(likelihood, objective):
    fused_model, plain_model = _vae_pair(likelihood, condition_dim=2)
    assert registry.fused_output_layer(fused_model.decoder) is not None
    assert registry.fused_output_layer(plain_model.decoder) is None
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).round()
    condition = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 0, 1])]
    outs = []
    for model in (fused_model, plain_model):
        out = model(x, condition, num_samples=4, objective=objective, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        outs.append(out)
    assert callable(outs[0]._decoded) and not callable(outs[1]._decoded)  # the fused path ran: no logits held
    torch.testing.assert_close(outs[0].elbo, outs[1].elbo, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(outs[0].rec, outs[1].rec, rtol=1e-12, atol=1e-11)
    for (name, p), q in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(outs[0].decoded, outs[1].decoded)  # decoded on demand


def test_fused_and_plain_decoders_share_state_dicts():
    fused_model, plain_model = _vae_pair("bernoulli")
    assert fused_model.state_dict().keys() == plain_model.state_dict().keys()
    plain_model.load_state_dict(fused_model.state_dict())


def test_mlp_decoder_without_hidden_layers_and_a_bad_switch():
    fused_model, plain_model = _vae_pair("gaussian", hidden=())
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    a = fused_model(x, num_samples=2, generator=torch.Generator().manual_seed(1)).elbo
    b = plain_model(x, num_samples=2, generator=torch.Generator().manual_seed(1)).elbo
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="fused_head must be True or False"):
        VAE((4,), 2, "mlp", decoder_config={"fused_head": "yes"})


class CustomHeadDecoder(nn.Module):
    """A decoder that is no registry.Decoder subclass, opting in by the contract alone."""

    fused_head = True

    def __init__(self, pixels, latent_dim):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(latent_dim, 10), nn.ReLU())
        self.output_layer = nn.Linear(10, pixels)

    def hidden(self, z, condition=None):
        return self.body(z)

    def forward(self, z, condition=None):
        return self.output_layer(self.hidden(z, condition))


def test_custom_decoder_opts_in_by_the_contract_and_out_by_its_switch():
    torch.manual_seed(0)
    decoder = CustomHeadDecoder(6, 2).double()
    model = VAE((6,), 2, "mlp", decoder=decoder, encoder_config={"hidden": [5]}).double()
    x = torch.rand(4, 6, dtype=torch.float64).round()
    fused_out = model(x, num_samples=3, objective="iwae", generator=torch.Generator().manual_seed(0))
    decoder.fused_head = False
    plain_out = model(x, num_samples=3, objective="iwae", generator=torch.Generator().manual_seed(0))
    assert registry.fused_output_layer(decoder) is None
    torch.testing.assert_close(fused_out.elbo, plain_out.elbo, rtol=1e-12, atol=1e-11)


def test_a_submodule_named_hidden_does_not_opt_in():
    decoder = nn.Module()
    decoder.hidden, decoder.output_layer = nn.Sequential(nn.Linear(2, 3)), nn.Linear(3, 4)
    assert registry.fused_output_layer(decoder) is None


@pytest.mark.parametrize("name,shape,config", [("conv", (1, 8, 8), {"channels": [4]}),
                                               ("resnet", (1, 8, 8), {"channels": [4]})])
def test_convolutional_decoders_keep_the_unfused_path(name, shape, config):
    model = VAE(shape, 2, name, encoder_config=config, decoder_config=config)
    assert registry.fused_output_layer(model.decoder) is None
    out = model(torch.rand(2, *shape).round(), num_samples=2)
    assert not callable(out._decoded) and out.decoded.shape == (2, 2, *shape)


# ---------------------------------------------------------------------------
# 6. CUDA (skipped without a GPU): the same numbers as the CPU op
# ---------------------------------------------------------------------------
@pytest.mark.skipif(not (torch.cuda.is_available() and fastvae.cuda_kernels_built()), reason="no CUDA device/kernels")
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_cuda_matches_cpu(likelihood):
    h, weight, b, x = head_inputs(likelihood, batch=300, hidden=16, pixels=50)
    g = torch.randn(h.shape[:-1], dtype=torch.float64)
    want_out, want = grads_of(lambda: fused(h, weight, b, x, likelihood, 0.3), (h, weight, b), g)
    cuda = [t.detach().cuda().requires_grad_() for t in (h, weight, b)]
    got_out, got = grads_of(lambda: fused(*cuda, x.cuda(), likelihood, 0.3, precompute=True), cuda, g.cuda())
    torch.testing.assert_close(got_out.cpu(), want_out, rtol=1e-12, atol=1e-10)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=1e-11, atol=1e-10)
