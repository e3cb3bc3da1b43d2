"""`resnet`: residual convolutional encoder/decoder for larger square images (32 to 128 px).

Each entry of `channels` is one stage that halves (encoder) or doubles (decoder) the
image, made of `blocks` residual blocks. There is no batch normalization on purpose:
it would couple the examples of a batch, and the per-example bounds (ELBO, IWAE) the
VAE reports assume each example is processed on its own.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import Decoder, register_decoder, register_encoder

from ._common import ImageEncoder, check_square_image, check_widths, make_activation, with_condition


class ResidualBlock(nn.Module):
    """act(conv(act(conv(x))) + shortcut(x)); the shortcut projects when shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            make_activation(activation),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = in_channels == out_channels and stride == 1
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, activation: str) -> list[nn.Module]:
    first = ResidualBlock(in_channels, out_channels, stride, activation)
    return [first] + [ResidualBlock(out_channels, out_channels, 1, activation) for _ in range(blocks - 1)]


def _check_blocks(blocks) -> int:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive int, got {blocks!r}")
    return blocks


@register_encoder("resnet")
class ResNetEncoder(ImageEncoder):
    """Residual conv encoder for larger square 1- or 3-channel images; the condition enters as extra channels."""

    def __init__(self, input_shape, latent_dim, condition_dim=0, channels=(32, 64, 128), blocks=1,
                 activation="relu"):
        super().__init__(input_shape, latent_dim, condition_dim)
        channels = check_widths("channels", channels, allow_empty=False)
        blocks = _check_blocks(blocks)
        sizes = check_square_image("input_shape", self.input_shape, len(channels), "resnet", round_up=True)
        layers: list[nn.Module] = [nn.Conv2d(self.input_shape[0] + condition_dim, channels[0], 3, padding=1)]
        in_channels = channels[0]
        for out_channels in channels:
            layers += _stage(in_channels, out_channels, blocks, 2, activation)
            in_channels = out_channels
        self.set_layers(nn.Sequential(*layers), channels[-1], sizes[-1])


@register_decoder("resnet")
class ResNetDecoder(Decoder):
    """Residual decoder mirroring `resnet`: nearest upsampling to the exact encoder sizes, then residual blocks."""

    def __init__(self, output_shape, latent_dim, condition_dim=0, likelihood="bernoulli", channels=(32, 64, 128),
                 blocks=1, activation="relu"):
        super().__init__(output_shape, latent_dim, condition_dim, likelihood)
        channels = check_widths("channels", channels, allow_empty=False)
        blocks = _check_blocks(blocks)
        sizes = check_square_image("output_shape", self.output_shape, len(channels), "resnet", round_up=True)
        self.start_shape = (channels[-1], sizes[-1], sizes[-1])
        self.head = nn.Linear(latent_dim + condition_dim, channels[-1] * sizes[-1] ** 2)
        layers: list[nn.Module] = [make_activation(activation)]
        # Stage i maps sizes[i+1] -> sizes[i], channels[i] -> channels[i-1] (channels[0] at i=0).
        for i in reversed(range(len(channels))):
            layers.append(nn.Upsample(size=(sizes[i], sizes[i]), mode="nearest"))
            layers += _stage(channels[i], channels[max(i - 1, 0)], blocks, 1, activation)
        layers.append(nn.Conv2d(channels[0], self.params_per_element * self.output_shape[0], 3, padding=1))
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor, condition: Tensor | None = None):
        self.check_input(z, condition)
        h = self.head(with_condition(z, condition)).view(-1, *self.start_shape)
        return self.to_output(self.features(h))
