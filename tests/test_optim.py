"""fastvae.training.optim: the trainer's direct call of torch's fused Adam/AdamW kernel."""

import pytest
import torch

from fastvae.training.optim import clear_grads, fused_step
from fastvae.training.trainer import make_optimizer


def model_and_optimizer(name, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = make_optimizer(name, model.parameters(), 1e-2) if not kwargs else \
        torch.optim.Adam(model.parameters(), lr=1e-2, fused=True, **kwargs)
    return model, optimizer


def train(name, step, steps=6, **kwargs):
    model, optimizer = model_and_optimizer(name, **kwargs)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.05
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        clear_grads(model.parameters())
        model(torch.randn(11, 7, generator=gen)).square().sum().backward()
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (i + 1)  # a schedule changing the rate between steps
        step(optimizer)
    return model, optimizer


def count_torch_steps(optimizer):
    """Counts the calls that reach optimizer.step()."""
    calls, step = [], optimizer.step
    optimizer.step = lambda *args, **kwargs: (calls.append(1), step(*args, **kwargs))[1]
    return calls


def fused_step_counting(record):
    def step(optimizer):
        if not hasattr(optimizer, "_counted"):
            optimizer._counted = count_torch_steps(optimizer)
            record.append(optimizer._counted)
        fused_step(optimizer)

    return step


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_same_bits_as_optimizer_step(name):
    record = []
    direct, direct_opt = train(name, fused_step_counting(record))
    assert record == [[1]]  # torch's step ran once, creating the state; the kernel was called directly after
    torch_model, torch_opt = train(name, lambda opt: opt.step())
    for a, b in zip(direct.parameters(), torch_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(direct_opt.state.values(), torch_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("name, kwargs", [("sgd", {}), ("adagrad", {}), ("adam", {"amsgrad": True}),
                                          ("adam", {"maximize": True})])
def test_what_it_does_not_cover_goes_to_optimizer_step(name, kwargs):
    direct, _ = train(name, fused_step, **kwargs)
    torch_model, _ = train(name, lambda opt: opt.step(), **kwargs)
    for a, b in zip(direct.parameters(), torch_model.parameters()):
        assert torch.equal(a, b)


def test_step_hooks_still_run():
    model, optimizer = model_and_optimizer("adam")
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    for _ in range(3):
        clear_grads(model.parameters())
        model(torch.ones(2, 7)).sum().backward()
        fused_step(optimizer)
    assert len(calls) == 3


def test_parameters_without_gradient_are_left_alone():
    model, optimizer = model_and_optimizer("adam")
    frozen = model[2].weight
    for i in range(3):
        clear_grads(model.parameters())
        model(torch.ones(2, 7)).sum().backward()
        if i > 0:
            frozen.grad = None
            before = frozen.detach().clone()
        fused_step(optimizer)
        if i > 0:
            assert torch.equal(frozen, before)
