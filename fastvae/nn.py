"""fastvae.nn: modules built on fastvae's fused ops.

FusedMLP is an nn.Sequential of nn.Linear layers, each followed by at most one of nn.Tanh,
nn.ReLU, nn.Sigmoid or nn.Identity, whose forward runs the whole stack as one op with one
autograd node (csrc/mlp.cpp): every product through ATen's GEMMs (MKL/oneDNN on CPU, cuBLAS
on CUDA), the bias and activation applied in one pass over each product's output, and one
backward that walks the layers in reverse. It holds the same modules, so it has the same
parameters and state dict as the nn.Sequential it replaces, and the same numbers up to
float rounding.

The plain module loop runs instead (same numbers, per-layer autograd nodes) without the
compiled extension and under torch.autocast, whose per-op casts the fused op would skip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .ops._mlp import ACTIVATION_CODES, mlp_op

# The activation modules the fused op computes, by their names in ACTIVATION_CODES.
ACTIVATION_MODULES = {nn.Identity: "identity", nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}
_MODULE_OF = {name: module for module, name in ACTIVATION_MODULES.items()}

def _describe(name: str, module: nn.Module) -> str:
    return f"module {name} ({module!r})"


def _is_plain_linear(module: nn.Module) -> bool:
    # A subclass that overrides forward computes something else.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class FusedStack:
    """A Linear/activation stack parsed once: its Linear modules and activation codes.

    Calling it runs the stack on x as one op. The parameters are read from the modules
    at every call, so moving or converting the modules (module.to) is seen.
    """

    def __init__(self, named_modules: Iterable[tuple[str, nn.Module]]):
        self.modules: list[nn.Module] = []
        linears: list[nn.Linear] = []
        codes: list[int] = []
        after_linear = False  # whether the previous module is a Linear (an activation may follow)
        for name, module in named_modules:
            self.modules.append(module)
            if _is_plain_linear(module):
                linears.append(module)
                codes.append(ACTIVATION_CODES["identity"])
                after_linear = True
            elif type(module) in ACTIVATION_MODULES and after_linear:
                codes[-1] = ACTIVATION_CODES[ACTIVATION_MODULES[type(module)]]
                after_linear = False
            elif type(module) in ACTIVATION_MODULES:
                raise ValueError(f"FusedMLP: {_describe(name, module)} must follow an nn.Linear: each activation "
                                 "applies to the output of the Linear layer before it")
            else:
                raise ValueError(f"FusedMLP: {_describe(name, module)} cannot be fused: a FusedMLP holds nn.Linear "
                                 "layers, each followed by at most one of nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity")
        if not linears:
            raise ValueError("FusedMLP needs at least one nn.Linear layer")
        self.linears = linears
        self.codes = codes

    def __call__(self, x: Tensor) -> Tensor:
        if not fusable(x):
            for module in self.modules:
                x = module(x)
            return x
        return mlp_op(x, [lin.weight for lin in self.linears], [lin.bias for lin in self.linears], self.codes)


def fusable(x) -> bool:
    """Whether the fused op runs on x: the extension is built, x is a tensor, autocast is off."""
    return mlp_op is not None and isinstance(x, Tensor) and not torch.is_autocast_enabled(x.device.type)


class FusedMLP(nn.Sequential):
    """nn.Sequential(Linear, activation, Linear, ...) as one fused op.

    Built like nn.Sequential (modules, or an OrderedDict of them), from an existing
    nn.Sequential (from_sequential, which shares its modules), or from layer sizes
    (from_sizes). x: (..., in_features); every leading dimension (samples, batch) is a row.
    Supported: nn.Linear (with or without bias), each followed by at most one of nn.Tanh,
    nn.ReLU, nn.Sigmoid, nn.Identity; anything else raises a ValueError naming the module.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self._fused = FusedStack(self._modules.items())  # not named_children, which lists a reused module once

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> FusedMLP:
        """A FusedMLP holding sequential's modules: the same parameters (shared) and state dict keys."""
        if not isinstance(sequential, nn.Sequential):
            raise TypeError(f"FusedMLP.from_sequential takes an nn.Sequential, got {type(sequential).__name__}")
        return cls(OrderedDict(sequential._modules.items()))  # named_children lists a reused module once

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], activation: str = "tanh", *, bias: bool = True,
                   output_activation: str = "identity") -> FusedMLP:
        """Linear(sizes[0], sizes[1]), activation, ..., Linear(sizes[-2], sizes[-1]), output_activation.

        The same modules (and state dict keys: "0.weight", "0.bias", "2.weight", ...) as that
        nn.Sequential; an identity output activation adds no module. activation and
        output_activation: "tanh", "relu", "sigmoid" or "identity".
        """
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"FusedMLP.from_sizes needs at least two positive int sizes, got {sizes!r}")
        for arg, name in (("activation", activation), ("output_activation", output_activation)):
            if name not in _MODULE_OF:
                raise ValueError(f"FusedMLP.from_sizes: {arg} must be one of {sorted(_MODULE_OF)}, got {name!r}")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            last = i == len(sizes) - 2
            name = output_activation if last else activation
            if name != "identity":
                layers.append(_MODULE_OF[name]())
        return cls(*layers)

    def _stack(self) -> FusedStack:
        # nn.Sequential can be edited in place (append, insert, item assignment): parse again then.
        if self._fused.modules != list(self._modules.values()):
            self._fused = FusedStack(self._modules.items())
        return self._fused

    def forward(self, x: Tensor) -> Tensor:
        return self._stack()(x)
