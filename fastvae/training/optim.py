"""The optimizer step of the training loop: torch's fused Adam/AdamW kernel, called directly.

`torch.optim.Adam(fused=True).step()` runs one fused kernel over every parameter, but around it
Python work that does not depend on the model's size: a profiler hook, a grad-mode switch, a state
check per parameter, grouping by device and dtype. In the MNIST training loop (784-200-200-50, batches
of 100, one thread) that took 300-600 us of a ~6 ms step, a few times what the same code costs when
timed alone (the loop's matrices push it out of the caches). `fused_step` calls the same kernel
(`torch._fused_adam_` / `torch._fused_adamw_`) with the same arguments on the optimizer's own state,
so the update is bit-identical (tests/test_optim.py checks it) and the optimizer object, its state
dict and its learning rate stay torch's. Anything it does not cover exactly goes to
`optimizer.step()`: other optimizers, non-fused ones, the first step (torch creates the state),
amsgrad, maximize, capturable, a tensor learning rate, a grad scaler, step hooks, mixed devices or
dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_KERNELS = {False: torch._fused_adam_, True: torch._fused_adamw_}  # by decoupled_weight_decay
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as optimizer_module

    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or optimizer_module._global_optimizer_pre_hooks or optimizer_module._global_optimizer_post_hooks)


def _group_lists(optimizer: torch.optim.Optimizer, group: dict):
    """(params, grads, exp_avgs, exp_avg_sqs, steps) of a group, or None where the direct call
    would not be exactly what optimizer.step() does."""
    if not group.get("fused") or any(group.get(flag) for flag in _UNSUPPORTED_FLAGS) \
            or isinstance(group["lr"], Tensor):
        return None
    params = [p for p in group["params"] if p.grad is not None]
    states = [optimizer.state.get(p) for p in params]
    if not all(states) or any(p.grad.is_sparse or p.is_complex() for p in params):
        return None
    if len({(p.device, p.dtype) for p in params}) > 1:
        return None
    return (params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states])


def fused_step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() for a fused Adam or AdamW, without torch.optim's per-step Python."""
    groups = None
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and not _has_step_hooks(optimizer) \
            and getattr(optimizer, "grad_scale", None) is None:
        groups = [_group_lists(optimizer, group) for group in optimizer.param_groups]
    if groups is None or any(lists is None for lists in groups):
        optimizer.step()
        return
    with torch.no_grad():
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps) in zip(optimizer.param_groups, groups):
            if not params:
                continue
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            _KERNELS[bool(group.get("decoupled_weight_decay"))](
                params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def clear_grads(parameters) -> None:
    """optimizer.zero_grad(set_to_none=True) for these parameters, without its profiler hook."""
    for p in parameters:
        p.grad = None
