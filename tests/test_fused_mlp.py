"""fastvae.nn.FusedMLP: a Linear/activation stack as one op, against the nn.Sequential it replaces."""

import copy

import pytest
import torch
from torch import nn

import fastvae
from fastvae import tuning
from fastvae.nn import FusedMLP, FusedStack
from fastvae.ops._mlp import ACTIVATION_CODES

from devices import CUDA_ONLY, DEVICES

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")

_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}

# (sizes, activation after each Linear; "none": no module after it)
LAYOUTS = [
    ([5, 7], ["none"]),
    ([6, 9, 4], ["tanh", "none"]),
    ([6, 9, 8, 3], ["relu", "relu", "none"]),
    ([5, 8, 7, 6, 4], ["sigmoid", "tanh", "relu", "tanh"]),
    ([4, 6, 5], ["identity", "sigmoid"]),
    ([7, 12, 12, 10], ["tanh", "tanh", "none"]),  # the Burda encoder's shape, small
]


def sequential(sizes, activations, bias=True, seed=0):
    """nn.Sequential(Linear, activation, ...) in float64; bias "mixed": every other Linear has one."""
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out, act) in enumerate(zip(sizes[:-1], sizes[1:], activations)):
        has_bias = bias if bias != "mixed" else i % 2 == 0
        layers.append(nn.Linear(fan_in, fan_out, bias=has_bias))
        if act != "none":
            layers.append(_MODULES[act]())
    return nn.Sequential(*layers).double()


def run_with_grads(model, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(grad_out)
    return y.detach(), x.grad, [p.grad for p in model.parameters()]


def assert_same_as_sequential(seq, x, rtol=1e-10, atol=1e-10):
    fused = FusedMLP.from_sequential(copy.deepcopy(seq))
    grad_out = torch.randn(*x.shape[:-1], seq[-1].out_features if isinstance(seq[-1], nn.Linear)
                           else seq[-2].out_features, dtype=x.dtype, device=x.device)
    want, want_x, want_params = run_with_grads(seq, x, grad_out)
    got, got_x, got_params = run_with_grads(fused, x, grad_out)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_x, want_x, rtol=rtol, atol=atol)
    for (name, _), g, w in zip(seq.named_parameters(), got_params, want_params):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=name)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes, activations", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False, "mixed"])
@pytest.mark.parametrize("leading", [(), (3,), (2, 5)])
def test_forward_and_gradients_equal_sequential(device, sizes, activations, bias, leading):
    seq = sequential(sizes, activations, bias).to(device)
    x = torch.randn(*leading, sizes[0], dtype=torch.float64, device=device)
    assert_same_as_sequential(seq, x)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_iwae_shaped_samples_and_many_rows(device):
    # (k, B, D) with k = 50: 1000 rows, split over threads in both passes.
    seq = sequential([10, 40, 40, 12], ["tanh", "tanh", "none"]).to(device)
    assert_same_as_sequential(seq, torch.randn(50, 20, 10, dtype=torch.float64, device=device))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "identity"])
def test_float32_activations_match_torch(device, activation):
    # One Linear with the identity weight: the output is the activation of the input itself,
    # over the whole range (the polynomial branches, their switch at |x| = 1/4, tails, inf, NaN).
    values = torch.cat([torch.linspace(-30, 30, 4001), torch.linspace(-0.3, 0.3, 2001),
                        torch.tensor([0.0, -0.0, 1e-30, -1e-8, 0.25, -0.25, float("inf"), -float("inf")])])
    x = values.to(device).unsqueeze(1)
    fused = FusedMLP(nn.Linear(1, 1), _MODULES[activation]()).to(device)
    with torch.no_grad():
        fused[0].weight.fill_(1.0)
        fused[0].bias.zero_()
        got = fused(x)
    want = _MODULES[activation]()(x)
    torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-7)
    nan = fused(torch.full((1, 1), float("nan"), device=device))
    assert torch.isnan(nan).all()


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_float32_network_matches_float64(device):
    seq = sequential([20, 30, 30, 8], ["tanh", "sigmoid", "none"]).to(device)
    x = torch.randn(64, 20, dtype=torch.float64, device=device)
    fused = FusedMLP.from_sequential(copy.deepcopy(seq)).float()
    grad_out = torch.randn(64, 8, dtype=torch.float64, device=device)
    got, got_x, got_params = run_with_grads(fused, x.float(), grad_out.float())
    want, want_x, want_params = run_with_grads(seq, x, grad_out)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, want_x.float(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_params, want_params):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-4)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_takes_the_aten_passes(device):
    seq = sequential([8, 16, 4], ["relu", "none"]).to(device)
    x = torch.randn(10, 8, dtype=torch.float64, device=device)
    fused = FusedMLP.from_sequential(copy.deepcopy(seq)).bfloat16()
    xb = x.bfloat16().requires_grad_()
    got = fused(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), seq(x).detach(), rtol=3e-2, atol=3e-2)
    got.sum().backward()
    xd = x.clone().requires_grad_()
    seq(xd).sum().backward()
    torch.testing.assert_close(xb.grad.double(), xd.grad, rtol=5e-2, atol=5e-2)
    for p, q in zip(fused.parameters(), seq.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=5e-2, atol=1e-1)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_an_expanded_gradient(device):
    seq = sequential([6, 9, 3], ["tanh", "sigmoid"]).to(device)
    fused = FusedMLP.from_sequential(copy.deepcopy(seq))
    with torch.no_grad():  # a transposed weight and a strided bias hold the same values
        fused[0].weight = nn.Parameter(fused[0].weight.t().contiguous().t())
        fused[2].bias = nn.Parameter(torch.stack([fused[2].bias, fused[2].bias], 1)[:, 0])
    assert not fused[0].weight.is_contiguous() and not fused[2].bias.is_contiguous()
    x = torch.randn(6, 4, 5, dtype=torch.float64, device=device).transpose(0, 2)  # (5, 4, 6), strided
    grads = []
    for model in (seq, fused):
        xi = x.clone().requires_grad_() if model is seq else x.detach().requires_grad_()
        model(xi).sum().backward()  # the incoming gradient is one value expanded (stride 0)
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for g, w in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@requires_cpp
def test_double_backward_is_refused_with_a_message():
    fused = FusedMLP.from_sizes([4, 5, 2]).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="FusedMLP has no double backward"):
        torch.autograd.grad(fused(x).sum(), x, create_graph=True)


@requires_cpp
@pytest.mark.parametrize("frozen", ["first", "all_but_last", "x_only"])
def test_gradients_asked_for_only(frozen):
    # The backward stops at the lowest layer that needs a gradient, and computes only those asked for.
    seq = sequential([6, 9, 8, 3], ["tanh", "relu", "none"])
    fused = FusedMLP.from_sequential(copy.deepcopy(seq))
    linears = [0, 2, 4]
    frozen_layers = {"first": [0], "all_but_last": [0, 2], "x_only": linears}[frozen]
    for model in (seq, fused):
        for i in frozen_layers:
            model[i].requires_grad_(False)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=frozen == "x_only")
    grad_out = torch.randn(7, 3, dtype=torch.float64)
    outs = []
    for model in (seq, fused):
        y = model(x)
        grads = torch.autograd.grad(y, [p for p in model.parameters() if p.requires_grad]
                                    + ([x] if x.requires_grad else []), grad_out)
        outs.append((y, grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    assert len(outs[1][1]) == len(outs[0][1])
    for g, w in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@requires_cpp
def test_no_grad_and_inference_mode_keep_nothing():
    seq = sequential([6, 9, 8, 3], ["tanh", "relu", "none"])
    fused = FusedMLP.from_sequential(seq)
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        y = fused(x)
    assert y.grad_fn is None
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, seq(x).detach(), rtol=1e-12, atol=1e-12)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    seq = sequential([4, 5, 3, 2], ["tanh", "sigmoid", "relu"], bias="mixed").to(device)
    fused = FusedMLP.from_sequential(seq)
    params = list(fused.parameters())
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, *values):
        return torch.func.functional_call(fused, dict(zip([n for n, _ in fused.named_parameters()], values)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def op_args(device, requires_grad=True):
    seq = sequential([5, 6, 4, 3], ["tanh", "relu", "none"], bias="mixed").to(device)
    stack = FusedStack(seq._modules.items())
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=requires_grad)
    weights = [lin.weight for lin in stack.linears]
    biases = [lin.bias for lin in stack.linears]
    return x, weights, biases, stack.codes


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, weights, biases, codes = op_args(device)
    torch.library.opcheck(torch.ops.fastvae.mlp.default, (x, weights, biases, codes))
    with torch.no_grad():
        outputs = torch.ops.fastvae.mlp_forward(x, weights, biases, codes)
        torch.library.opcheck(torch.ops.fastvae.mlp_forward.default, (x, weights, biases, codes))
        grad = torch.randn_like(outputs[-1])
        for needs in ([1, 1, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0, 0]):
            torch.library.opcheck(torch.ops.fastvae.mlp_backward.default,
                                  (grad, x, weights, outputs[:-1], codes, needs))


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_compiles_in_one_graph(device):
    seq = sequential([6, 9, 8, 3], ["tanh", "relu", "none"]).to(device)
    fused = FusedMLP.from_sequential(copy.deepcopy(seq))
    x = torch.randn(4, 2, 6, dtype=torch.float64, device=device)
    grad_out = torch.randn(4, 2, 3, dtype=torch.float64, device=device)
    compiled = torch.compile(fused, fullgraph=True, dynamic=False)
    got, got_x, got_params = run_with_grads(compiled, x, grad_out)
    want, want_x, want_params = run_with_grads(seq, x, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_x, want_x, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_params, want_params):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_state_dict_round_trips_with_sequential():
    seq = sequential([6, 9, 8, 3], ["tanh", "relu", "none"], bias="mixed")
    fused = FusedMLP.from_sizes([6, 9, 8, 3], "tanh").double()
    assert list(FusedMLP.from_sizes([6, 9, 8, 3]).state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                                                    "4.weight", "4.bias"]
    fused = FusedMLP.from_sequential(sequential([6, 9, 8, 3], ["tanh", "relu", "none"], bias="mixed", seed=1))
    assert list(fused.state_dict()) == list(seq.state_dict())
    fused.load_state_dict(seq.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-12, atol=1e-12)
    other = sequential([6, 9, 8, 3], ["tanh", "relu", "none"], bias="mixed", seed=2)
    other.load_state_dict(fused.state_dict())
    torch.testing.assert_close(other(x), seq(x), rtol=0, atol=0)


def test_from_sequential_shares_the_parameters():
    seq = sequential([4, 5, 2], ["tanh", "none"])
    fused = FusedMLP.from_sequential(seq)
    assert all(p is q for p, q in zip(seq.parameters(), fused.parameters()))


def test_from_sizes_builds_the_sequential_layout():
    fused = FusedMLP.from_sizes([4, 8, 8, 2], "relu", bias=False, output_activation="sigmoid")
    assert [type(m) for m in fused] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert all(m.bias is None for m in fused if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="activation must be one of"):
        FusedMLP.from_sizes([4, 2], "gelu")
    with pytest.raises(ValueError, match="at least two positive int sizes"):
        FusedMLP.from_sizes([4])


@requires_cpp
def test_a_reused_activation_module_and_edits_in_place():
    act = nn.Tanh()
    seq = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act).double()
    fused = FusedMLP.from_sequential(seq)
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-12, atol=1e-12)
    fused.append(nn.Linear(4, 2).double())
    seq.append(fused[-1])
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-12, atol=1e-12)
    fused.append(nn.Dropout())
    with pytest.raises(ValueError, match=r"module 5 \(Dropout"):
        fused(x)


@pytest.mark.parametrize("layers, match", [
    ((nn.Linear(3, 4), nn.GELU()), r"module 1 \(GELU\(approximate='none'\)\) cannot be fused"),
    ((nn.Tanh(), nn.Linear(3, 4)), r"module 0 \(Tanh\(\)\) must follow an nn.Linear"),
    ((nn.Linear(3, 4), nn.Tanh(), nn.ReLU()), r"module 2 \(ReLU\(\)\) must follow an nn.Linear"),
    ((nn.Linear(3, 4), nn.LayerNorm(4)), r"module 1 \(LayerNorm"),
    ((), "at least one nn.Linear"),
])
def test_unsupported_modules_are_named(layers, match):
    with pytest.raises(ValueError, match=match):
        FusedMLP(*layers)


@requires_cpp
def test_bad_inputs_are_named():
    fused = FusedMLP.from_sizes([5, 4, 3]).double()
    with pytest.raises(RuntimeError, match=r"weights\[0\] has dtype Double but x has dtype Float"):
        fused(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match=r"weights\[0\] must have shape \(out_features, 6\) to match x's last"):
        fused(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        fused(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="x must have shape \\(..., in_features\\), got a scalar"):
        fused(torch.tensor(1.0, dtype=torch.float64))
    x, weights, biases, codes = op_args("cpu", requires_grad=False)
    with pytest.raises(RuntimeError, match=r"activations\[1\] must be 0 \(identity\), 1 \(tanh\), 2 \(relu\)"):
        torch.ops.fastvae.mlp(x, weights, biases, [1, 7, 0])
    with pytest.raises(RuntimeError, match=r"biases\[0\] must have shape \(6,\)"):
        torch.ops.fastvae.mlp(x, weights, [torch.zeros(5, dtype=torch.float64), None, None], codes)
    with pytest.raises(RuntimeError, match="biases must hold one entry"):
        torch.ops.fastvae.mlp(x, weights, biases[:2], codes)
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have shape \(out_features, 6\) to match weights\[0\]"):
        torch.ops.fastvae.mlp(x, [weights[0], weights[2], weights[1]], [None] * 3, codes)
    outputs = torch.ops.fastvae.mlp_forward(x, weights, biases, codes)
    with pytest.raises(RuntimeError, match="grad must have the output's shape"):
        torch.ops.fastvae.mlp_backward(torch.zeros(3, 3, dtype=torch.float64), x, weights, outputs[:-1], codes,
                                       [1] * 7)
    with pytest.raises(RuntimeError, match="outputs must hold every layer's output"):
        torch.ops.fastvae.mlp_backward(outputs[-1], x, weights, outputs, codes, [1] * 7)


@requires_cpp
@pytest.mark.parametrize("device", CUDA_ONLY)
def test_device_mismatch_is_named(device):
    fused = FusedMLP.from_sizes([5, 4, 3]).double().to(device)
    with pytest.raises(RuntimeError, match=r"weights\[0\] is on cuda:0 but x is on cpu"):
        fused(torch.randn(2, 5, dtype=torch.float64))


@requires_cpp
def test_autocast_runs_the_module_loop():
    # Under autocast each Linear casts its inputs; the fused op would skip those casts, so the
    # plain loop runs and the dtypes are what nn.Sequential gives.
    seq = sequential([6, 9, 3], ["tanh", "none"]).float()
    fused = FusedMLP.from_sequential(seq)
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), seq(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@requires_cpp
def test_results_do_not_depend_on_the_thread_count():
    seq = sequential([30, 64, 64, 10], ["tanh", "relu", "none"]).float()
    fused = FusedMLP.from_sequential(seq)
    x = torch.randn(3000, 30)
    grad_out = torch.randn(3000, 10)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fused.zero_grad()
            runs.append(run_with_grads(fused, x, grad_out))
    finally:
        torch.set_num_threads(before)
    (y1, gx1, gp1), (y2, gx2, gp2) = runs
    # The bias sums are the fused pass's own: bitwise the same whatever the threads.
    for i in (1, 3, 5):
        assert torch.equal(gp1[i], gp2[i]), i


def test_activation_codes_cover_the_modules():
    from fastvae.nn import ACTIVATION_MODULES

    assert set(ACTIVATION_MODULES.values()) == set(ACTIVATION_CODES)


# ---------------------------------------------------------------------------
# The built-in mlp architecture with the fused stack (fused_mlp=True or FASTVAE_FUSED_MLP=1).
# ---------------------------------------------------------------------------
def mlp_vae(fused, fused_head=True, recompute=True):
    from fastvae import VAE

    torch.manual_seed(0)
    return VAE((1, 4, 4), 3, "mlp", condition_dim=2,
               encoder_config={"hidden": [12, 10], "fused_mlp": fused},
               decoder_config={"hidden": [10, 9], "fused_mlp": fused, "fused_head": fused_head,
                               "recompute_hidden": recompute}).double()


def train_losses(model, steps=4, objective="analytic", num_samples=1):
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).round()
    condition = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 1, 0])]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(x, condition, num_samples=num_samples, objective=objective, generator=generator).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@requires_cpp
@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("objective, num_samples", [("analytic", 1), ("iwae", 5)])
@pytest.mark.parametrize("recompute", [True, False])
def test_vae_trains_the_same_with_the_fused_stack(fused_head, objective, num_samples, recompute, monkeypatch):
    from fastvae.models.architectures import _recompute

    monkeypatch.setattr(_recompute, "RECOMPUTE_MIN_BYTES", 0)  # recompute applies (and takes precedence) when on
    fused, plain = mlp_vae(True, fused_head, recompute), mlp_vae(False, fused_head, recompute)
    assert isinstance(fused.encoder.net, FusedMLP) and not isinstance(plain.encoder.net, FusedMLP)
    assert list(fused.state_dict()) == list(plain.state_dict())
    want = train_losses(plain, objective=objective, num_samples=num_samples)
    got = train_losses(fused, objective=objective, num_samples=num_samples)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10, msg=name)


@requires_cpp
def test_fused_stack_runs_as_one_node_in_the_vae():
    model = mlp_vae(True, fused_head=True)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64).round()
    condition = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 1, 0])]
    with torch.profiler.profile() as prof:
        model(x, condition).loss.backward()
    names = {event.key for event in prof.key_averages()}
    assert {"fastvae::mlp", "fastvae::mlp_forward", "fastvae::mlp_backward"} <= names
    assert "aten::tanh" not in names and "aten::linear" not in names


def test_fused_mlp_environment_variable(monkeypatch):
    from fastvae import VAE

    monkeypatch.setenv("FASTVAE_FUSED_MLP", "1")
    model = VAE((8,), 2, "mlp", encoder_config={"hidden": [6]}, decoder_config={"hidden": [6]})
    assert isinstance(model.encoder.net, FusedMLP) and model.decoder.fused_mlp
    assert not model.encoder.sparse_input
    monkeypatch.setenv("FASTVAE_FUSED_MLP", "0")
    model = VAE((8,), 2, "mlp", encoder_config={"hidden": [6]}, decoder_config={"hidden": [6]})
    assert not isinstance(model.encoder.net, FusedMLP) and not model.decoder.fused_mlp
    assert model.encoder.sparse_input == tuning.rule("sparse_input").value  # the CPU's rule (tests/conftest.py)
    model = VAE((8,), 2, "mlp", encoder_config={"fused_mlp": True})
    assert isinstance(model.encoder.net, FusedMLP)
    monkeypatch.setenv("FASTVAE_FUSED_MLP", "yes")
    with pytest.raises(ValueError, match="FASTVAE_FUSED_MLP must be 0 or 1, got 'yes'"):
        VAE((8,), 2, "mlp")


def test_fused_mlp_arguments_are_checked(monkeypatch):
    from fastvae import VAE

    with pytest.raises(ValueError, match="fused_mlp must be True, False or None"):
        VAE((8,), 2, "mlp", encoder_config={"fused_mlp": 1})
    with pytest.raises(ValueError, match="sparse_input=True and the fused stack"):
        VAE((8,), 2, "mlp", encoder_config={"fused_mlp": True, "sparse_input": True})
    monkeypatch.setenv("FASTVAE_FUSED_MLP", "1")
    with pytest.raises(ValueError, match="sparse_input=True and the fused stack"):
        VAE((8,), 2, "mlp", encoder_config={"sparse_input": True})


@requires_cpp
def test_fused_vae_state_dict_loads_into_the_plain_one():
    fused, plain = mlp_vae(True), mlp_vae(False)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.1)
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64).round()
    condition = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 1, 0])]
    mu_f, logvar_f = fused.encode(x, condition)
    mu_p, logvar_p = plain.encode(x, condition)
    torch.testing.assert_close(mu_f, mu_p, rtol=1e-12, atol=1e-12)
    z = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(fused.decode(z, condition), plain.decode(z, condition), rtol=1e-12, atol=1e-12)


def test_the_docs_page_runs():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "nn.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/nn.md python block {index}", "exec"), {"__name__": "docs_nn"})
