"""The fused decoder head: output layer + reconstruction likelihood in one op, for every declared
likelihood with a fused head, every layout and every device (tests/devices.py), and the VAE's use of it.

The oracle is the path the head replaces: decode with the layer (torch.nn.functional.linear), then
score with the declaration's own Likelihood.log_prob, in float64.
"""

import math

import pytest
import torch
from torch import nn

import fastvae
from fastvae import ops
from fastvae.models import likelihoods, registry
from fastvae.models.vae import VAE
from fastvae.ops import reference

from devices import CUDA_ONLY, DEVICES

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")
HEADS = [name for name in likelihoods.names() if likelihoods.get(name).fused_head is not None]
SETTINGS = {"gaussian_logvar": -0.7}  # the fixed Gaussian's log-variance
# (samples, bias): h (L, B, H) or (B, H); the layer with or without its bias.
LAYOUTS = [pytest.param(3, True, id="stacked-bias"), pytest.param(None, True, id="single-bias"),
           pytest.param(3, False, id="stacked-nobias"), pytest.param(None, False, id="single-nobias")]


def test_every_built_in_likelihood_has_the_fused_head():
    assert {"bernoulli", "gaussian", "gaussian_learned", "continuous_bernoulli", "discretized_logistic"} <= set(HEADS)
    assert {likelihoods.get(name).fused_head for name in HEADS} <= set(ops.FUSED_LIKELIHOODS)
    if fastvae.backend() == "cpp":
        assert set(fastvae._C.fused_likelihoods()) == set(ops.FUSED_LIKELIHOODS)


def data_for(spec, batch, pixels, gen, dtype=torch.float64):
    """x of the kind the likelihood models, with the edge levels 0 and 1 in it."""
    if spec.binarize or spec.data == "binary":
        x = torch.rand(batch, pixels, generator=gen, dtype=torch.float64).round()
    elif spec.data == "real":
        x = torch.randn(batch, pixels, generator=gen, dtype=torch.float64)
    else:  # 8-bit levels, which are also [0, 1] data
        x = torch.randint(0, 256, (batch, pixels), generator=gen).double() / 255
        x.view(-1)[:2] = torch.tensor([0.0, 1.0])[: x.numel()]
    return x.to(dtype)


def head_inputs(name, batch=5, hidden=7, pixels=9, samples=3, bias=True, dtype=torch.float64, device="cpu",
                seed=0):
    """h, weight, bias (leaves needing grad) and x for likelihood `name`; where the second parameter
    has a lower bound, the bias of every other pixel's second output puts it below the bound."""
    spec = likelihoods.get(name)
    gen = torch.Generator().manual_seed(seed)
    k = spec.params_per_element
    shape = (batch, hidden) if samples is None else (samples, batch, hidden)
    h = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(k * pixels, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    b = 0.3 * torch.randn(k * pixels, generator=gen, dtype=torch.float64)
    if k == 2 and spec.second_min is not None:
        b[pixels::2] += spec.second_min - spec.second_shift - 2.0
    x = data_for(spec, batch, pixels, gen)
    leaves = [t.to(device, dtype).requires_grad_() for t in (h, weight, b)]
    return leaves[0], leaves[1], leaves[2] if bias else None, x.to(device, dtype)


def decoded_then_scored(name, h, weight, bias, x):
    """The path the head replaces: the output layer, then the declaration's log_prob."""
    spec = likelihoods.get(name)
    raw = nn.functional.linear(h, weight, bias)
    params = raw.chunk(spec.params_per_element, dim=-1) if spec.params_per_element > 1 else (raw,)
    return spec.log_prob(params, x, SETTINGS)


def fused(name, h, weight, bias, x, precompute=False):
    return likelihoods.get(name).fused_head_log_prob(h, weight, bias, x, SETTINGS, precompute_grads=precompute)


def grads_of(fn, inputs, incoming):
    out = fn()
    leaves = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, leaves, incoming)


def incoming_for(kind, shape, device):
    if kind == "per_row":
        return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    return torch.full(shape, -0.3, dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------
# 1. Values and gradients: the layer, then Likelihood.log_prob (float64, 1e-10)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples,bias", LAYOUTS)
@pytest.mark.parametrize("name", HEADS)
def test_values_equal_decoding_then_log_prob(name, samples, bias, device):
    h, weight, b, x = head_inputs(name, samples=samples, bias=bias, device=device)
    want = decoded_then_scored(name, h, weight, b, x)
    for precompute in (False, True):
        got = fused(name, h, weight, b, x, precompute)
        assert got.shape == h.shape[:-1] and got.dtype == torch.float64 and got.device == h.device
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("incoming", ["per_row", "same_for_every_row"])
@pytest.mark.parametrize("samples,bias", LAYOUTS)
@pytest.mark.parametrize("name", HEADS)
def test_gradients_equal_decoding_then_log_prob(name, samples, bias, incoming, precompute, device):
    h, weight, b, x = head_inputs(name, samples=samples, bias=bias, device=device)
    g = incoming_for(incoming, h.shape[:-1], device)
    want_out, want = grads_of(lambda: decoded_then_scored(name, h, weight, b, x), (h, weight, b), g)
    got_out, got = grads_of(lambda: fused(name, h, weight, b, x, precompute), (h, weight, b), g)
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", HEADS)
def test_the_head_matches_its_reference(name):
    spec = likelihoods.get(name)
    h, weight, b, x = head_inputs(name)
    want = reference.fused_head_log_prob(h, weight, b, x, spec.fused_head, SETTINGS["gaussian_logvar"],
                                         spec.second_shift, spec.second_min)
    torch.testing.assert_close(fused(name, h, weight, b, x), want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", ["gaussian", "discretized_logistic"])
def test_a_two_parameter_likelihood_takes_one_second_value_from_a_one_parameter_layer(name):
    h, weight, b, x = head_inputs("bernoulli")  # weight (P, H): the layer gives the first parameter only
    raw = nn.functional.linear(h, weight, b)
    public = getattr(ops, f"{name}_log_likelihood")
    want = public(raw, x, -0.4) if name == "gaussian" else public(raw, -0.4, x)
    got = ops.fused_head_log_likelihood(h, weight, b, x, name, -0.4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", HEADS)
def test_many_chunks_and_threads_give_the_unfused_numbers(name):
    # 2100 rows of 50 float64 pixels span several CPU chunks (and threads when there are several).
    h, weight, b, x = head_inputs(name, batch=700, hidden=16, pixels=50, samples=3)
    g = incoming_for("per_row", (3, 700), "cpu")
    want_out, want = grads_of(lambda: decoded_then_scored(name, h, weight, b, x), (h, weight, b), g)
    for precompute in (False, True):
        got_out, got = grads_of(lambda: fused(name, h, weight, b, x, precompute), (h, weight, b), g)
        torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-9)
        for got_grad, want_grad in zip(got, want):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-9)


@requires_cpp
@pytest.mark.parametrize("name", HEADS)
def test_results_do_not_depend_on_the_thread_count(name):
    h, weight, b, x = head_inputs(name, batch=600, hidden=16, pixels=50, samples=2)
    g = incoming_for("per_row", (2, 600), "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(grads_of(lambda: fused(name, h, weight, b, x), (h, weight, b), g))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(grads1[0], grads2[0], rtol=0, atol=0)  # per row: no cross-thread sum
    for a, c in zip(grads1[1:], grads2[1:]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-10)  # summed over rows in another order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("name", HEADS)
def test_reduced_precision(name, dtype, tol, device):
    h, weight, b, x = head_inputs(name, pixels=196, hidden=32, device=device)
    want = fused(name, h, weight, b, x).detach()
    low = [t.detach().to(dtype).requires_grad_() for t in (h, weight, b)]
    got = fused(name, *low, x.to(dtype))
    assert got.dtype == torch.float32
    # Relative to the row sums' size: a float32 or bfloat16 layer's rounding moves every pixel's term.
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)
    got.sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in low)


def test_images_are_flattened_and_data_dtype_promoted():
    h, weight, b, x = head_inputs("bernoulli", pixels=16)
    got = fused("bernoulli", h, weight, b, x.float().reshape(5, 1, 4, 4))
    torch.testing.assert_close(got, decoded_then_scored("bernoulli", h, weight, b, x), rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", HEADS)
def test_empty_batch(name, device):
    h, weight, b, x = head_inputs(name, batch=0, samples=2, device=device)
    out = fused(name, h, weight, b, x)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert h.grad.shape == h.shape and (weight.grad == 0).all() and (b.grad == 0).all()


def test_the_old_name_gaussian_learned_still_works():
    h, weight, b, x = head_inputs("gaussian_learned")
    got = ops.fused_head_log_likelihood(h, weight, b, x, "gaussian_learned")
    pixels = x.shape[-1]
    raw = nn.functional.linear(h, weight, b)
    want = ops.gaussian_log_likelihood(raw[..., :pixels], x, raw[..., pixels:])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


# ---------------------------------------------------------------------------
# 2. Training and inference paths
# ---------------------------------------------------------------------------
@requires_cpp
def test_inference_saves_nothing_and_records_no_graph():
    h, weight, b, x = head_inputs("bernoulli")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = fused("bernoulli", h, weight, b, x, precompute=True)
        detached = fused("bernoulli", h.detach(), weight.detach(), b.detach(), x, precompute=True)
    assert saved == [] and out.grad_fn is None and detached.grad_fn is None


@requires_cpp
@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("name", HEADS)
def test_training_saves_no_tensor_of_the_output_layers_size(name, precompute):
    h, weight, b, x = head_inputs(name, batch=10, hidden=4, pixels=50)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(name, h, weight, b, x, precompute=precompute)
    raw_numel = h.shape[0] * h.shape[1] * weight.shape[0]
    assert saved and max(t.numel() for t in saved) < raw_numel


@requires_cpp
def test_double_backward_is_refused():
    h, weight, b, x = head_inputs("bernoulli")
    out = fused("bernoulli", h, weight, b, x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), h, create_graph=True)


# ---------------------------------------------------------------------------
# 3. gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("samples,bias", LAYOUTS[:2])
@pytest.mark.parametrize("name", HEADS)
def test_gradcheck(name, samples, bias, precompute, device):
    h, weight, b, x = head_inputs(name, batch=3, hidden=4, pixels=5, samples=samples, bias=bias, device=device)
    leaves = tuple(t for t in (h, weight, b) if t is not None)

    def head(*t):
        return fused(name, t[0], t[1], t[2] if bias else None, x, precompute)

    # A per-row output (gradcheck's incoming gradients differ per row) and its sum (the same for every row).
    assert torch.autograd.gradcheck(head, leaves)
    assert torch.autograd.gradcheck(lambda *t: head(*t).sum(), leaves)


def _op_args(name, h, weight, b, x):
    """The head op's arguments after (h, weight, bias, x), as the declaration calls it."""
    spec = likelihoods.get(name)
    return spec.fused_head, SETTINGS["gaussian_logvar"], spec.second_shift, spec.second_min


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", HEADS)
def test_opcheck(name, device):
    h, weight, b, x = head_inputs(name, batch=3, hidden=4, pixels=5, device=device)
    likelihood, value, shift, low = _op_args(name, h, weight, b, x)
    for args in [(h, weight, b, x, likelihood, value, False, shift, low),
                 (h, weight, None, x, likelihood, value, True, shift, low)]:
        torch.library.opcheck(torch.ops.fastvae.fused_head_log_prob.default, args)
    plain = (h.detach(), weight.detach(), b.detach(), x, likelihood, value)
    torch.library.opcheck(torch.ops.fastvae.fused_head_log_prob_with_grads.default, (*plain, shift, low))
    grad = torch.randn(h.shape[:-1], dtype=torch.float64, device=device)
    for needs in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(torch.ops.fastvae.fused_head_log_prob_backward.default,
                              (grad, *plain, *needs, shift, low))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", HEADS)
def test_torch_compile_fullgraph(name, device):
    h, weight, b, x = head_inputs(name, device=device)
    g = incoming_for("per_row", h.shape[:-1], device)

    def loss(h, weight, b):
        return (fused(name, h, weight, b, x, precompute=True) * g).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(loss(h, weight, b), (h, weight, b))
    got = torch.autograd.grad(compiled(h, weight, b), (h, weight, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# 4. Bad inputs name the argument and what was expected
# ---------------------------------------------------------------------------
def _bad_cases():
    h, weight, b, x = (t.detach() if t.requires_grad else t for t in head_inputs("bernoulli"))
    wide = torch.cat([weight, weight]), torch.cat([b, b])
    return [
        ((h[0, 0], weight, b, x, "bernoulli"), {}, "h must have shape"),
        ((h[:, :4], weight, b, x, "bernoulli"), {}, "h must have shape"),
        ((h, weight[:, :3], b, x, "bernoulli"), {}, "weight must have shape"),
        ((h, weight, b, x, "gaussian_learned"), {}, r"weight must have shape \(2 \* num_pixels"),
        ((h, *wide, x, "bernoulli"), {}, r"weight must have shape \(1 \* num_pixels, hidden\) = \(9, 7\) for"),
        ((h, *wide, x, "continuous_bernoulli"), {}, r"weight must have shape \(1 \* num_pixels"),
        ((h, weight[:5], b[:5], x, "discretized_logistic"), {}, r"or \(2 \* num_pixels, hidden\) = \(18, 7\) "
                                                                 r"\(log_scale from the layer\)"),
        ((h, weight, b[:4], x, "bernoulli"), {}, "bias must have shape"),
        ((h, weight, b.float(), x, "bernoulli"), {}, "bias has dtype"),
        ((h, weight.float(), b, x, "bernoulli"), {}, "weight has dtype"),
        ((h.int(), weight, b, x, "bernoulli"), {}, "h must be a floating-point tensor"),
        ((h, weight, b, x, "poisson"), {}, "likelihood must be one of 'bernoulli', 'gaussian'"),
        ((h, weight, b, x, "gaussian", math.nan), {}, "logvar_value must be finite"),
        ((h, *wide, x, "gaussian"), {"second_shift": math.inf}, "second_shift must be finite"),
        ((h, *wide, x, "gaussian"), {"second_min": math.nan}, "second_min must be a number or None"),
        ((h, weight, b, x, "gaussian", "big"), {}, "logvar must be a float"),
        ((h, *wide, x, "gaussian"), {"second_min": "low"}, "second_min must be a float"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_argument(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.fused_head_log_likelihood(*args, **kwargs)


@requires_cpp
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_direct_op_calls_are_validated(case):
    (h, weight, b, x, likelihood, *value), kwargs, match = _bad_cases()[case]
    op_value = value[0] if value else 0.0
    shift, low = kwargs.get("second_shift", 0.0), kwargs.get("second_min")
    typed = all(isinstance(v, float) for v in (op_value, shift)) and (low is None or isinstance(low, float))
    if x.dim() == 2 and h.dtype == x.dtype and typed and likelihood != "gaussian_learned":
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastvae.fused_head_log_prob(h, weight, b, x, likelihood, op_value, False, shift, low)


@pytest.mark.parametrize("name", [n for n in HEADS if likelihoods.get(n).data in ("unit", "8bit")])
def test_data_outside_the_unit_interval_and_x_needing_grad(name):
    h, weight, b, x = head_inputs(name)
    spec = likelihoods.get(name)
    args = (spec.fused_head, 0.0)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        ops.fused_head_log_likelihood(h, weight, b, x + 2, *args)
    ops.fused_head_log_likelihood(h, weight, b, x + 2, *args, check_range=False)  # skipped on request
    with pytest.raises(RuntimeError, match="does not differentiate with respect to x"):
        ops.fused_head_log_likelihood(h, weight, b, x.clone().requires_grad_(), *args)


def test_a_likelihood_without_a_fused_head_says_so():
    spec = likelihoods.Likelihood(name="plain", description="", params=("mean",), data="real",
                                  log_prob=lambda *a: None, mean=lambda p: p[0], sample=lambda *a: None)
    h, weight, b, x = head_inputs("gaussian")
    with pytest.raises(ValueError, match="declares no fused head"):
        spec.fused_head_log_prob(h, weight, b, x, SETTINGS)


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
@pytest.mark.parametrize("name", HEADS)
def test_vae_gives_the_same_elbo_and_gradients_with_and_without_the_fused_head(name, objective):
    fused_model, plain_model = _vae_pair(name, condition_dim=2)
    assert registry.fused_output_layer(fused_model.decoder) is not None
    assert registry.fused_output_layer(plain_model.decoder) is None
    x = data_for(likelihoods.get(name), 6, 16, torch.Generator().manual_seed(2)).reshape(6, 1, 4, 4)
    condition = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 0, 1])]
    outs = []
    for model in (fused_model, plain_model):
        out = model(x, condition, num_samples=4, objective=objective, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        outs.append(out)
    assert callable(outs[0]._decoded) and not callable(outs[1]._decoded)  # the fused path ran: no logits held
    torch.testing.assert_close(outs[0].elbo, outs[1].elbo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[0].rec, outs[1].rec, rtol=1e-10, atol=1e-10)
    for (param_name, p), q in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=param_name)
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
    with pytest.raises(ValueError, match="fused_head must be True, False or None"):
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
# 6. CUDA against CPU (skipped without a GPU): the same numbers, precomputed or recomputed
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("name", HEADS)
def test_cuda_matches_cpu(name, device):
    h, weight, b, x = head_inputs(name, batch=300, hidden=16, pixels=50)
    g = incoming_for("per_row", h.shape[:-1], "cpu")
    want_out, want = grads_of(lambda: fused(name, h, weight, b, x), (h, weight, b), g)
    on_device = [t.detach().to(device).requires_grad_() for t in (h, weight, b)]
    got_out, got = grads_of(lambda: fused(name, *on_device, x.to(device), precompute=True), on_device, g.to(device))
    torch.testing.assert_close(got_out.cpu(), want_out, rtol=1e-12, atol=1e-10)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=1e-11, atol=1e-10)
