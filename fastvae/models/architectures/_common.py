"""Argument checks and small pieces the built-in architectures share.

The checks run in __init__ so a configuration the network cannot handle fails at build
time, naming the argument and the value, rather than as a shape mismatch inside forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import Encoder

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def check_widths(arg: str, widths, allow_empty: bool = True) -> tuple[int, ...]:
    """widths as a tuple of positive ints (layer widths or channel counts)."""
    if isinstance(widths, int):
        widths = (widths,)
    try:
        widths = tuple(widths)
    except TypeError:
        raise ValueError(f"{arg} must be a list of positive ints, got {widths!r}") from None
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{arg} must contain positive ints only, got {widths!r}")
    if not widths and not allow_empty:
        raise ValueError(f"{arg} must not be empty")
    return widths


def check_square_image(arg: str, shape: tuple[int, ...], depth: int, arch: str, round_up: bool = False) -> list[int]:
    """Spatial sizes after each of `depth` stride-2 stages on a (C, S, S) image, C in {1, 3}.

    round_up: the stages give ceil(S / 2) (3x3 kernels, padding 1) instead of floor(S / 2).
    Returning every intermediate size lets a decoder upsample to exactly the input size,
    odd sizes (28 -> 14 -> 7) included.
    """
    if len(shape) != 3:
        raise ValueError(f"{arch} needs {arg} = (channels, height, width), got {shape}")
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(f"{arch} needs 1 or 3 channels, got {arg} = {shape}")
    if height != width:
        raise ValueError(f"{arch} needs square images, got {arg} = {shape}")
    if height < 2**depth:
        raise ValueError(f"{arch} halves the image {depth} times, so it needs height and width >= {2**depth}; "
                         f"got {arg} = {shape} (use fewer channel stages)")
    sizes = [height]
    for _ in range(depth):
        sizes.append((sizes[-1] + round_up) // 2)
    return sizes


def with_condition_channels(x: Tensor, condition: Tensor | None) -> Tensor:
    """Append the condition vector to an image as constant extra channels."""
    if condition is None:
        return x
    planes = condition.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
    return torch.cat([x, planes], dim=1)


class ImageEncoder(Encoder):
    """The part `conv` and `resnet` encoders share: their convolutional `features` run on the image
    with the condition as extra channels, then one linear head maps to (mu, logvar)."""

    def set_layers(self, features: nn.Module, out_channels: int, out_size: int) -> None:
        self.features = features
        self.head = nn.Linear(out_channels * out_size**2, 2 * self.latent_dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input(x, condition)
        h = self.features(with_condition_channels(x, condition))
        mu, logvar = self.head(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar


def with_condition(h: Tensor, condition: Tensor | None) -> Tensor:
    """Append the condition vector to flat features (B, F)."""
    return h if condition is None else torch.cat([h, condition.to(h.dtype)], dim=1)
