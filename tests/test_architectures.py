"""The built-in architectures: every supported shape, condition and likelihood, built by name.

The losses here are plain PyTorch (not the fused ops), so these tests check only the
architectures' contracts: output shapes, gradients reaching every parameter, and clear
build-time errors for configurations they cannot handle.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvae.models.registry import build_decoder, build_encoder

LATENT = 3
CONDITION = 4
# Small widths keep the sweep fast; the defaults are checked separately below.
SMALL = {"mlp": {"hidden": (16,)}, "conv": {"channels": (4, 8)}, "resnet": {"channels": (4, 8, 8)}}
SHAPES = {
    "mlp": [(784,), (1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 5, 7)],
    "conv": [(1, 8, 8), (3, 16, 16), (1, 28, 28), (3, 32, 32), (1, 64, 64)],
    "resnet": [(1, 8, 8), (3, 28, 28), (3, 32, 32), (1, 64, 64)],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]


def bernoulli_log_likelihood(logits, x):
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian_log_likelihood(mean, x, logvar):
    return -0.5 * ((x - mean) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi)).flatten(1).sum(1)


def log_likelihood(likelihood, decoded, x):
    if likelihood == "bernoulli":
        return bernoulli_log_likelihood(decoded, x)
    if likelihood == "gaussian":
        return gaussian_log_likelihood(decoded, x, torch.zeros_like(decoded))
    return gaussian_log_likelihood(*decoded, x)


def build_pair(name, shape, condition_dim=0, likelihood="bernoulli", **config):
    config = {**SMALL[name], **config}
    encoder = build_encoder(name, input_shape=shape, latent_dim=LATENT, condition_dim=condition_dim, **config)
    decoder = build_decoder(name, output_shape=shape, latent_dim=LATENT, condition_dim=condition_dim,
                            likelihood=likelihood, **config)
    return encoder, decoder


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
@pytest.mark.parametrize("condition_dim", [0, CONDITION])
@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_forward_and_backward(name, shape, condition_dim, likelihood):
    torch.manual_seed(0)
    encoder, decoder = build_pair(name, shape, condition_dim, likelihood)
    batch = 2
    x = torch.rand(batch, *shape)
    condition = torch.eye(CONDITION)[:batch] if condition_dim else None

    mu, logvar = encoder(x, condition)
    assert mu.shape == logvar.shape == (batch, LATENT)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    decoded = decoder(z, condition)
    outputs = decoded if likelihood == "gaussian_learned" else (decoded,)
    assert isinstance(decoded, tuple) == (likelihood == "gaussian_learned")
    assert all(out.shape == (batch, *shape) for out in outputs)

    log_likelihood(likelihood, decoded, x).sum().neg().backward()
    for module in (encoder, decoder):
        for param_name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


def test_the_condition_changes_the_output():
    encoder, decoder = build_pair("conv", (1, 8, 8), condition_dim=2)
    x, z = torch.rand(1, 1, 8, 8), torch.randn(1, LATENT)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert not torch.allclose(encoder(x, a)[0], encoder(x, b)[0])
    assert not torch.allclose(decoder(z, a), decoder(z, b))


def test_examples_are_independent():
    """No batch statistics: an example's output must not depend on the rest of its batch."""
    for name, shape in [("mlp", (1, 8, 8)), ("conv", (1, 8, 8)), ("resnet", (3, 32, 32))]:
        encoder, decoder = build_pair(name, shape)
        x = torch.rand(3, *shape)
        torch.testing.assert_close(encoder(x)[0][:1], encoder(x[:1])[0])
        z = torch.randn(3, LATENT)
        torch.testing.assert_close(decoder(z)[:1], decoder(z[:1]))


def test_defaults_and_the_burda_mlp_build():
    for name, shape in [("mlp", (1, 28, 28)), ("conv", (1, 28, 28)), ("resnet", (3, 64, 64))]:
        encoder = build_encoder(name, input_shape=shape, latent_dim=50)
        decoder = build_decoder(name, output_shape=shape, latent_dim=50)
        assert decoder(encoder(torch.rand(2, *shape))[0]).shape == (2, *shape)
    burda = build_encoder("mlp", input_shape=(784,), latent_dim=50, hidden=(200, 200), activation="tanh")
    widths = [layer.out_features for layer in burda.net if isinstance(layer, torch.nn.Linear)]
    assert widths == [200, 200, 100]


def test_double_precision_with_a_float_condition():
    encoder, decoder = build_pair("conv", (1, 8, 8), condition_dim=2)
    encoder, decoder = encoder.double(), decoder.double()
    condition = torch.tensor([[1.0, 0.0]])  # one-hot labels usually arrive as float32
    mu, _ = encoder(torch.rand(1, 1, 8, 8, dtype=torch.float64), condition)
    assert decoder(mu, condition).dtype == torch.float64


@pytest.mark.parametrize(
    "name,shape,config,message",
    [
        ("mlp", (1, 8, 8), {"hidden": (16, -4)}, r"hidden must contain positive ints only, got \(16, -4\)"),
        ("mlp", (1, 8, 8), {"hidden": "wide"}, "hidden must contain positive ints"),
        ("mlp", (1, 8, 8), {"activation": "sigmoid"}, "activation must be one of.*'sigmoid'"),
        ("mlp", (1, 8, 8), {"latent_dim": 0}, "latent_dim must be a positive int, got 0"),
        ("mlp", (1, 0, 8), {}, r"input_shape must be a non-empty tuple of positive ints, got \(1, 0, 8\)"),
        ("mlp", (1, 8, 8), {"condition_dim": -1}, "condition_dim must be an int >= 0, got -1"),
        ("conv", (2, 8, 8), {}, r"1 or 3 channels, got input_shape = \(2, 8, 8\)"),
        ("conv", (1, 8, 16), {}, r"square images, got input_shape = \(1, 8, 16\)"),
        ("conv", (64,), {}, r"input_shape = \(channels, height, width\), got \(64,\)"),
        ("conv", (1, 8, 8), {"channels": (4, 4, 4, 4)}, r"height and width >= 16; got input_shape = \(1, 8, 8\)"),
        ("conv", (1, 8, 8), {"channels": ()}, "channels must not be empty"),
        ("conv", (1, 8, 8), {"channels": (0, 4)}, r"channels must contain positive ints only, got \(0, 4\)"),
        ("resnet", (3, 32, 32), {"blocks": 0}, "blocks must be a positive int, got 0"),
        ("resnet", (4, 32, 32), {}, r"1 or 3 channels, got input_shape = \(4, 32, 32\)"),
    ],
)
def test_bad_encoder_configs_fail_at_build_time(name, shape, config, message):
    config = {"latent_dim": LATENT, **config}
    with pytest.raises(ValueError, match=message):
        build_encoder(name, input_shape=shape, **config)


@pytest.mark.parametrize("name", ["mlp", "conv", "resnet"])
def test_bad_decoder_configs_fail_at_build_time(name):
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'. Known likelihoods: bernoulli"):
        build_decoder(name, output_shape=(1, 8, 8), latent_dim=LATENT, likelihood="poisson")
    if name != "mlp":
        with pytest.raises(ValueError, match=r"1 or 3 channels, got output_shape = \(2, 8, 8\)"):
            build_decoder(name, output_shape=(2, 8, 8), latent_dim=LATENT)


@pytest.mark.parametrize("name", ["mlp", "conv", "resnet"])
def test_forward_rejects_wrong_shapes_clearly(name):
    encoder, decoder = build_pair(name, (1, 8, 8), condition_dim=2)
    condition = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, \*\(1, 8, 8\)\), got \(2, 1, 16, 16\)"):
        encoder(torch.rand(2, 1, 16, 16), condition)
    with pytest.raises(ValueError, match=r"expects a condition of shape \(2, 2\), got None"):
        encoder(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=rf"expects z of shape \(N, {LATENT}\), got \(2, 5\)"):
        decoder(torch.randn(2, 5), condition)
    with pytest.raises(ValueError, match=r"expects a condition of shape \(2, 2\), got \(2, 3\)"):
        decoder(torch.randn(2, LATENT), torch.zeros(2, 3))
    unconditional, _ = build_pair(name, (1, 8, 8))
    with pytest.raises(ValueError, match="condition_dim=0 but a condition was given"):
        unconditional(torch.rand(2, 1, 8, 8), condition)
