"""The mlp decoder's recomputed hidden layers (fastvae/models/architectures/_recompute.py): same numbers, less kept."""

import pytest
import torch
from torch import nn

from fastvae.models.architectures import _recompute
from fastvae.models.architectures._recompute import _RecomputedStack, dropped_bytes, recomputable, run_stack
from fastvae.models.vae import VAE


def _stack(activation, widths=(5, 7, 4)):
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), activation()]
    return nn.Sequential(*layers).double()


def _saved_storages(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("input_needs_grad", [True, False])
def test_gradcheck_against_finite_differences(activation, input_needs_grad):
    layers = _stack(activation)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=input_needs_grad)
    params = [p.detach().clone().requires_grad_() for p in layers.parameters()]
    assert torch.autograd.gradcheck(lambda x, *p: _RecomputedStack.apply(x, activation, *p), (x, *params))


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_same_output_and_gradients_as_the_plain_stack_keeping_only_input_and_output(activation):
    layers = _stack(activation, widths=(5, 9, 8, 6))
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(11, 6, dtype=torch.float64)
    results = []
    for recompute in (True, False):
        layers.zero_grad()
        x.grad = None
        out, saved = _saved_storages(lambda: run_stack(layers, x, recompute, min_bytes=0))
        out.backward(grad_out)
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in layers.parameters()], saved))
    (out, gx, gp, saved), (plain_out, plain_gx, plain_gp, plain_saved) = results
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    torch.testing.assert_close(gx, plain_gx, rtol=1e-13, atol=1e-14)
    for a, b in zip(gp, plain_gp):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    params = {p.untyped_storage().data_ptr() for p in layers.parameters()}
    activations = [t for ptr, t in saved.items() if ptr not in params]
    assert sorted(t.shape for t in activations) == sorted([x.shape, out.shape])  # out: saved by the last tanh
    assert len([ptr for ptr in plain_saved if ptr not in params]) == 4  # x and the three hidden outputs


def test_small_activations_are_kept_large_ones_recomputed():
    layers = _stack(nn.Tanh, widths=(5, 64, 8)).float()
    rows = _recompute.RECOMPUTE_MIN_BYTES // (64 * 4)
    for n, recomputed in ((rows - 1, False), (rows, True)):
        x = torch.randn(n, 5, requires_grad=True)
        assert dropped_bytes(layers, x) == n * 64 * 4
        out = run_stack(layers, x, True)
        assert (type(out.grad_fn.next_functions[0][0]).__name__ == "_RecomputedStackBackward") == recomputed, n


def test_what_is_not_recomputed():
    assert not recomputable(nn.Sequential(nn.Linear(2, 3), nn.Tanh()))  # one layer: nothing to save
    assert not recomputable(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 3), nn.Tanh()))
    assert not recomputable(nn.Sequential(nn.Linear(2, 3, bias=False), nn.Tanh(), nn.Linear(3, 3), nn.Tanh()))
    layers = _stack(nn.Tanh)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # nothing recorded: the plain forward
        torch.testing.assert_close(run_stack(layers, x, True, min_bytes=0), layers(x), rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["analytic", "iwae"])
@pytest.mark.parametrize("fused_head", [True, False])
def test_vae_with_and_without_recomputing_gives_the_same_numbers(objective, fused_head, monkeypatch):
    monkeypatch.setattr(_recompute, "RECOMPUTE_MIN_BYTES", 0)
    models = []
    for recompute in (True, False):
        torch.manual_seed(0)
        models.append(VAE((1, 4, 4), 3, "mlp", condition_dim=2, encoder_config={"hidden": [8]},
                          decoder_config={"hidden": [10, 9, 7], "fused_head": fused_head,
                                          "recompute_hidden": recompute}).double())
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).round()
    condition = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 1])]
    outs = []
    for model in models:
        out = model(x, condition, num_samples=3, objective=objective, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].elbo, outs[1].elbo, rtol=1e-13, atol=1e-12)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-11, atol=1e-13, msg=name)


def test_compiles_in_one_graph():
    layers = _stack(nn.Tanh).float()
    x = torch.randn(4, 5, requires_grad=True)

    def loss(x):
        return run_stack(layers, x, True, min_bytes=0).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.backward()
    grad = x.grad.clone()
    x.grad = None
    want = layers(x).square().sum()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, x.grad)


def test_bad_switch_names_the_argument():
    with pytest.raises(ValueError, match="recompute_hidden must be True or False"):
        VAE((4,), 2, "mlp", decoder_config={"recompute_hidden": 1})
