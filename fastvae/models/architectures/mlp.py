"""`mlp`: the fully connected encoder/decoder of Kingma & Welling (2014).

Flattens any input shape, so it is the architecture that works everywhere. Burda et al.
(2016) use hidden=(200, 200) with tanh for their 784-200-200-50 models.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ... import ops, tuning
from ...nn import FusedMLP, FusedStack
from ..registry import Decoder, Encoder, register_decoder, register_encoder

from ._common import check_widths, make_activation, with_condition
from ._recompute import recomputes, run_stack


def _mlp(in_features: int, hidden: tuple[int, ...], out_features: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), make_activation(activation)]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


def _choice(name: str, value) -> bool:
    """A fast-path switch as given, or for None the rule for this CPU (fastvae/tuning.py; its
    environment variable forces it). fastvae.VAE fills the None ones before, the same way unless
    FASTVAE_TUNING=calibrate."""
    if value is None:
        return tuning.rule(name).value
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None ({tuning.CHOICES[name].env} or the CPU's rule "
                         f"decides), got {value!r}")
    return value


@register_encoder("mlp")
class MLPEncoder(Encoder):
    """Fully connected encoder (Kingma & Welling 2014); flattens any input shape.

    sparse_input: the first layer runs fastvae.sparse_input_linear, which works from the
    nonzeros of the input (binarized images are mostly zeros) and falls back to the dense
    product for dense inputs. Same numbers as nn.Linear up to float rounding; same state dict.
    fused_mlp: the whole stack runs as one op (fastvae.nn.FusedMLP), its first layer dense.
    None for either: as fastvae/tuning.py decides for this CPU (its rules, or a calibration with
    FASTVAE_TUNING=calibrate; FASTVAE_SPARSE_INPUT / FASTVAE_FUSED_MLP force it); sparse_input
    is off when fused.
    """

    def __init__(self, input_shape, latent_dim, condition_dim=0, hidden=(500,), activation="tanh",
                 sparse_input=None, fused_mlp=None):
        super().__init__(input_shape, latent_dim, condition_dim)
        hidden = check_widths("hidden", hidden)
        self.fused_mlp = _choice("fused_mlp", fused_mlp)
        if sparse_input is None:
            sparse_input = not self.fused_mlp and _choice("sparse_input", None)
        sparse_input = _choice("sparse_input", sparse_input)
        if sparse_input and self.fused_mlp:
            raise ValueError("sparse_input=True and the fused stack (fused_mlp=True or FASTVAE_FUSED_MLP=1) exclude "
                             "each other: the fused stack computes the first layer dense; turn one of them off")
        self.sparse_input = sparse_input
        net = _mlp(math.prod(self.input_shape) + condition_dim, hidden, 2 * latent_dim, activation)
        self.net = FusedMLP.from_sequential(net) if self.fused_mlp else net
        # The layers as a plain list: registered once, as net.<i> (see MLPDecoder._hidden_layers).
        self._layers = list(self.net)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input(x, condition)
        h = with_condition(x.flatten(1), condition)
        if self.fused_mlp:
            mu, logvar = self.net(h).chunk(2, dim=1)
            return mu, logvar
        first, *others = self._layers
        h = ops.sparse_input_linear(h, first.weight, first.bias) if self.sparse_input else first(h)
        for layer in others:
            h = layer(h)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar


@register_decoder("mlp")
class MLPDecoder(Decoder):
    """Fully connected decoder (Kingma & Welling 2014); reshapes to any output shape.

    Takes the fused head (registry.Decoder): its last layer is linear. fused_head=False makes
    the VAE run the plain forward and the likelihood op instead (same numbers up to float
    rounding, more memory).
    recompute_hidden (with two hidden layers or more): autograd keeps only z and the last
    hidden layer; the backward recomputes the others (fastvae/models/architectures/_recompute.py).
    Same numbers; for IWAE's k x B rows it saves (len(hidden) - 1) activations of (k*B, width).
    It applies when that saves at least 1 MiB (RECOMPUTE_MIN_BYTES), where it pays for its pass.
    fused_mlp: the hidden layers (and, without the fused head, the output layer) run as one op
    (fastvae.nn.FusedStack) wherever recompute_hidden does not apply. Same state dict either way.
    None for fused_head or fused_mlp: as fastvae/tuning.py decides for this CPU (its rules, or a
    calibration with FASTVAE_TUNING=calibrate; FASTVAE_FUSED_HEAD / FASTVAE_FUSED_MLP force it).
    """

    def __init__(self, output_shape, latent_dim, condition_dim=0, likelihood="bernoulli", hidden=(500,),
                 activation="tanh", fused_head=None, recompute_hidden=True, fused_mlp=None):
        super().__init__(output_shape, latent_dim, condition_dim, likelihood)
        hidden = check_widths("hidden", hidden)
        if not isinstance(recompute_hidden, bool):
            raise ValueError(f"recompute_hidden must be True or False, got {recompute_hidden!r}")
        self.fused_head = _choice("fused_head", fused_head)
        self.recompute_hidden = recompute_hidden
        self.net = _mlp(latent_dim + condition_dim, hidden, self.params_per_element * self.output_numel, activation)
        # The layers before the output layer, as a plain list: registered once, as net.<i>, and
        # not re-sliced (slicing an nn.Sequential builds a module) at every call of hidden().
        self._hidden_layers = list(self.net)[:-1]
        self.fused_mlp = _choice("fused_mlp", fused_mlp)
        named = list(self.net._modules.items())
        self._fused_net = FusedStack(named) if self.fused_mlp else None
        self._fused_hidden = FusedStack(named[:-1]) if self.fused_mlp and hidden else None

    @property
    def output_layer(self) -> nn.Linear:
        # A property, not a second attribute: the layer stays registered once, as net.<i> in state dicts.
        return self.net[-1]

    def hidden(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """The last hidden layer (N, H), the input of output_layer."""
        self.check_input(z, condition)
        return run_stack(self._hidden_layers, with_condition(z, condition), self.recompute_hidden,
                         fused=self._fused_hidden)

    def forward(self, z: Tensor, condition: Tensor | None = None):
        if self._fused_net is None:
            return self.to_output(self.output_layer(self.hidden(z, condition)))
        self.check_input(z, condition)
        h = with_condition(z, condition)
        if recomputes(self._hidden_layers, h, self.recompute_hidden):
            return self.to_output(self.output_layer(run_stack(self._hidden_layers, h, True)))
        return self.to_output(self._fused_net(h))
