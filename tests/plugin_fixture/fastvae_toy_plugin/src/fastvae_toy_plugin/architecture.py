"""`toy_mlp`: a one-layer architecture, registered when fastvae loads this entry point."""

import math

from torch import nn

from fastvae.registry import Decoder, Encoder, register_decoder, register_encoder


@register_encoder("toy_mlp")
class ToyEncoder(Encoder):
    """Linear encoder from the toy plugin."""

    def __init__(self, input_shape, latent_dim, condition_dim=0, scale=1.0):
        super().__init__(input_shape, latent_dim, condition_dim)
        self.scale = scale
        self.linear = nn.Linear(math.prod(self.input_shape), 2 * latent_dim)

    def forward(self, x, condition=None):
        self.check_input(x, condition)
        mu, logvar = (self.scale * self.linear(x.flatten(1))).chunk(2, dim=1)
        return mu, logvar


@register_decoder("toy_mlp")
class ToyDecoder(Decoder):
    """Linear decoder from the toy plugin."""

    def __init__(self, output_shape, latent_dim, condition_dim=0, likelihood="bernoulli"):
        super().__init__(output_shape, latent_dim, condition_dim, likelihood)
        self.linear = nn.Linear(latent_dim, self.params_per_element * self.output_numel)

    def forward(self, z, condition=None):
        self.check_input(z, condition)
        return self.to_output(self.linear(z))
