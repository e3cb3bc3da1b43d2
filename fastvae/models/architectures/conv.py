"""`conv`: strided convolutions for small square images with 1 or 3 channels.

Each entry of `channels` is one stride-2 stage (4x4 kernels), so the image must be at
least 2**len(channels) pixels wide: 8x8 digits, 28x28 MNIST, 32x32 CIFAR, 64x64 faces.
The decoder mirrors the encoder with transposed convolutions whose output_padding
restores odd sizes, so it produces exactly the input shape.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import Decoder, register_decoder, register_encoder

from ._common import ImageEncoder, check_square_image, check_widths, make_activation, with_condition


@register_encoder("conv")
class ConvEncoder(ImageEncoder):
    """Strided-conv encoder for square 1- or 3-channel images; the condition enters as extra channels."""

    def __init__(self, input_shape, latent_dim, condition_dim=0, channels=(32, 64), activation="relu"):
        super().__init__(input_shape, latent_dim, condition_dim)
        channels = check_widths("channels", channels, allow_empty=False)
        sizes = check_square_image("input_shape", self.input_shape, len(channels), "conv")
        layers: list[nn.Module] = []
        in_channels = self.input_shape[0] + condition_dim
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), make_activation(activation)]
            in_channels = out_channels
        self.set_layers(nn.Sequential(*layers), channels[-1], sizes[-1])


@register_decoder("conv")
class ConvDecoder(Decoder):
    """Transposed-conv decoder mirroring `conv`; the condition is concatenated to z."""

    def __init__(self, output_shape, latent_dim, condition_dim=0, likelihood="bernoulli", channels=(32, 64),
                 activation="relu"):
        super().__init__(output_shape, latent_dim, condition_dim, likelihood)
        channels = check_widths("channels", channels, allow_empty=False)
        sizes = check_square_image("output_shape", self.output_shape, len(channels), "conv")
        self.start_shape = (channels[-1], sizes[-1], sizes[-1])
        self.head = nn.Linear(latent_dim + condition_dim, channels[-1] * sizes[-1] ** 2)
        # Stage i maps sizes[i+1] -> sizes[i], channels[i] -> channels[i-1] (the image's at i=0).
        outs = (self.params_per_element * self.output_shape[0],) + channels[:-1]
        layers: list[nn.Module] = [make_activation(activation)]
        for i in reversed(range(len(channels))):
            padding = sizes[i] - 2 * sizes[i + 1]
            layers.append(nn.ConvTranspose2d(channels[i], outs[i], 4, stride=2, padding=1, output_padding=padding))
            if i > 0:
                layers.append(make_activation(activation))
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor, condition: Tensor | None = None):
        self.check_input(z, condition)
        h = self.head(with_condition(z, condition)).view(-1, *self.start_shape)
        return self.to_output(self.features(h))
