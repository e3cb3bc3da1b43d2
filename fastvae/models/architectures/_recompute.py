"""A stack of (Linear, tanh or ReLU) layers that keeps only its input and output for backward.

With IWAE's k samples the decoder runs on k x B rows, and autograd keeps every hidden
layer's output for the backward (tanh and ReLU keep their output, the next Linear its input:
the same tensor). The fused head already keeps nothing of the output layer's size, so those
activations are what an IWAE step still holds. Here the backward recomputes them from the
input instead: all layers but the last run a second time. The last activation stays an
ordinary autograd node, so its output (which the fused head keeps anyway) is not recomputed
and the gradient arriving here has already passed through it. For the Burda et al. decoder
(50-200-200) that is one 50x200 product per row, about 2% of a training step, for one
(k*B, 200) activation less.

tanh and ReLU have derivatives that their output gives (1 - y^2; y > 0), so the backward
needs nothing but the recomputed outputs, and it writes each layer's pre-activation gradient
over that layer's recomputed output (aten's tanh_backward / threshold_backward into their
input): recomputing adds one activation-sized buffer to the backward's peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

_aten = torch.ops.aten


def _tanh_grad(grad: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    return _aten.tanh_backward(grad, y) if out is None else _aten.tanh_backward.grad_input(grad, y, grad_input=out)


def _relu_grad(grad: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    if out is None:
        return _aten.threshold_backward(grad, y, 0.0)
    return _aten.threshold_backward.grad_input(grad, y, 0.0, grad_input=out)


# activation module -> (in-place activation, its gradient from the output: (grad, y, out=None) -> grad * f'(y))
_ACTIVATIONS = {nn.Tanh: (Tensor.tanh_, _tanh_grad), nn.ReLU: (Tensor.relu_, _relu_grad)}


def recomputable(layers: Sequence[nn.Module]) -> bool:
    """Whether layers alternate nn.Linear (with bias) and an activation whose derivative its output gives,
    and are deep enough (two layers or more) that recomputing saves something."""
    pairs = list(zip(layers[::2], layers[1::2]))
    return (len(layers) >= 4 and len(layers) % 2 == 0
            and all(isinstance(lin, nn.Linear) and lin.bias is not None and type(act) in _ACTIVATIONS
                    for lin, act in pairs))


class _RecomputedStack(torch.autograd.Function):
    """The stack up to its last Linear (the caller applies the last activation), saving only x."""

    @staticmethod
    def forward(ctx, x, activation, *weights_and_biases):
        act, _ = _ACTIVATIONS[activation]
        ctx.activation = activation
        weights, biases = weights_and_biases[::2], weights_and_biases[1::2]
        h = x
        for weight, bias in zip(weights[:-1], biases[:-1]):
            h = act(F.linear(h, weight, bias))
        ctx.save_for_backward(x, *weights_and_biases)
        return F.linear(h, weights[-1], biases[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        act, act_grad = _ACTIVATIONS[ctx.activation]
        weights, biases = params[::2], params[1::2]
        inputs = [x]  # the input of each layer: x, then the recomputed hidden outputs
        for weight, bias in zip(weights[:-1], biases[:-1]):
            inputs.append(act(F.linear(inputs[-1], weight, bias)))
        grads: list[Tensor | None] = [None] * len(params)
        grad_pre = grad_out  # the gradient before layer i's activation (the last one's applied outside)
        for i in reversed(range(len(weights))):
            if ctx.needs_input_grad[2 + 2 * i]:
                grads[2 * i] = grad_pre.t() @ inputs[i]
            if ctx.needs_input_grad[3 + 2 * i]:
                grads[2 * i + 1] = grad_pre.sum(0)
            if i == 0:
                grad_x = grad_pre @ weights[0] if ctx.needs_input_grad[0] else None
                break
            grad = grad_pre @ weights[i]
            y = inputs.pop()  # layer i - 1's output; layer i is done with it: overwrite it
            grad_pre = act_grad(grad, y, out=y)
            del grad, y
        return (grad_x, None, *grads)


# Below this many bytes of dropped activations recomputing is not worth its extra pass: an SGVB
# step of the MNIST MLP (batch 100, L=1) would drop 80 KB and run 2-3% slower; IWAE k=50 drops 3.8 MiB.
RECOMPUTE_MIN_BYTES = 1 << 20


def dropped_bytes(layers: Sequence[nn.Module], x: Tensor) -> int:
    """Bytes of the hidden outputs that recomputing would not keep: all but the last layer's."""
    widths = [lin.out_features for lin in layers[::2]][:-1]
    return x.shape[0] * sum(widths) * x.element_size()


def recomputes(layers: Sequence[nn.Module], x: Tensor, recompute: bool, min_bytes: int | None = None) -> bool:
    """Whether run_stack recomputes: recompute is on, autograd records, the layers are recomputable
    and it drops at least min_bytes (default RECOMPUTE_MIN_BYTES)."""
    min_bytes = RECOMPUTE_MIN_BYTES if min_bytes is None else min_bytes
    return recompute and torch.is_grad_enabled() and recomputable(layers) and dropped_bytes(layers, x) >= min_bytes


def run_stack(layers: Sequence[nn.Module], x: Tensor, recompute: bool, min_bytes: int | None = None,
              fused: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The layers applied to x in turn; through _RecomputedStack when it `recomputes`, else through
    `fused` (the same layers as one op, fastvae.nn.FusedStack) when given.

    layers: a list (or nn.Sequential) of modules. A plain list is cheaper per call: slicing an
    nn.Sequential builds a new module every time.
    """
    if not recomputes(layers, x, recompute, min_bytes):
        if fused is not None:
            return fused(x)
        for layer in layers:
            x = layer(x)
        return x
    params = [p for lin in layers[::2] for p in (lin.weight, lin.bias)]
    return layers[-1](_RecomputedStack.apply(x, type(layers[1]), *params))
