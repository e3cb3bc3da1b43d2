"""The fused Linear/activation stack's ops (csrc/mlp.cpp): activation codes, fakes, the op handle.

    fastvae::mlp(x, weights, biases, activations) -> y          (one autograd node; no hidden output kept
                                                                  outside training)
    fastvae::mlp_forward(...) -> every layer's output           (what the backward reads)
    fastvae::mlp_backward(grad, x, weights, outputs, activations, needs_grad) -> (grad_x, grad_weights, grad_biases)

The fakes run the same checks as the kernels, with the same messages. fastvae.nn.FusedMLP is
the public face; this module is what the dispatcher imports for the fakes (set_python_module).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import backend
from ._checks import _check_same, _check_tensor, _require

# The schema's activation codes, as csrc/mlp.h numbers them.
ACTIVATION_CODES = {"identity": 0, "tanh": 1, "relu": 2, "sigmoid": 3}


def _check_stack(x: Tensor, weights, biases, activations) -> None:
    _check_tensor(x, "x")
    layers = len(weights)
    _require(layers >= 1, "fastvae: mlp needs at least one layer, got an empty weights list")
    _require(len(biases) == layers,
             f"fastvae: mlp: biases must hold one entry (a tensor or None) per layer, {layers}, got {len(biases)}")
    _require(len(activations) == layers,
             f"fastvae: mlp: activations must hold one code per layer, {layers}, got {len(activations)}")
    _require(x.dim() >= 1, "fastvae: x must have shape (..., in_features), got a scalar")
    features = x.shape[-1]
    for i, (weight, bias, code) in enumerate(zip(weights, biases, activations)):
        _check_same(weight, x, f"weights[{i}]", "x")
        source = "x's last dimension" if i == 0 else f"weights[{i - 1}]'s rows"
        _require(weight.dim() == 2 and weight.shape[1] == features,
                 f"fastvae: weights[{i}] must have shape (out_features, {features}) to match {source}, "
                 f"got {list(weight.shape)}")
        if bias is not None:
            _check_same(bias, x, f"biases[{i}]", "x")
            _require(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     f"fastvae: biases[{i}] must have shape ({weight.shape[0]},) (weights[{i}]'s rows), "
                     f"got {list(bias.shape)}")
        _require(0 <= code < len(ACTIVATION_CODES),
                 f"fastvae: activations[{i}] must be 0 (identity), 1 (tanh), 2 (relu) or 3 (sigmoid), got {code}")
        features = weight.shape[0]


def _outputs_like(x: Tensor, weights) -> list[Tensor]:
    return [x.new_empty((*x.shape[:-1], weight.shape[0])) for weight in weights]


if backend() == "cpp":
    from .. import _C  # noqa: F401  (the ops must be registered before their fakes)

    @torch.library.register_fake("fastvae::mlp")
    def _mlp_fake(x, weights, biases, activations):
        _check_stack(x, weights, biases, activations)
        return _outputs_like(x, weights[-1:])[0]

    @torch.library.register_fake("fastvae::mlp_forward")
    def _mlp_forward_fake(x, weights, biases, activations):
        _check_stack(x, weights, biases, activations)
        return _outputs_like(x, weights)

    @torch.library.register_fake("fastvae::mlp_backward")
    def _mlp_backward_fake(grad, x, weights, outputs, activations, needs_grad):
        _check_stack(x, weights, [None] * len(weights), activations)
        _require(len(needs_grad) == 1 + 2 * len(weights),
                 f"fastvae: mlp_backward: needs_grad must hold 1 + 2 * {len(weights)} flags (x, then each "
                 f"layer's weight and bias), got {len(needs_grad)}")
        out_shape = (*x.shape[:-1], weights[-1].shape[0])
        _require(tuple(grad.shape) == out_shape,
                 f"fastvae: grad must have the output's shape {list(out_shape)}, got {list(grad.shape)}")
        def grad_or_empty(needed: int, shape) -> Tensor:
            return x.new_empty(shape if needed else (0,))

        grad_x = grad_or_empty(needs_grad[0], x.shape)
        grad_weights = [grad_or_empty(needs_grad[1 + 2 * i], w.shape) for i, w in enumerate(weights)]
        grad_biases = [grad_or_empty(needs_grad[2 + 2 * i], (w.shape[0],)) for i, w in enumerate(weights)]
        return grad_x, grad_weights, grad_biases

    mlp_op = torch.ops.fastvae.mlp.default
else:
    mlp_op = None
