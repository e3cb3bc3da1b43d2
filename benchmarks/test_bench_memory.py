"""Memory measurements, run with the benchmarks (they record numbers; they time nothing)."""

import torch

from memory import saved_bytes
from providers import LATENT


def test_saved_for_backward_is_only_z_mu_logvar():
    batch, dim, samples = 256, 64, 5
    mu = torch.randn(batch, dim, requires_grad=True)
    logvar = torch.randn(batch, dim, requires_grad=True)
    fused = saved_bytes(LATENT["fastvae"], mu, logvar, samples)
    eager = saved_bytes(LATENT["eager"], mu, logvar, samples)
    element = 4
    assert fused == (samples * batch * dim + 2 * batch * dim) * element  # z, mu, logvar: no eps, no std
    assert eager > fused


def test_fused_head_saves_only_its_inputs_for_the_iwae_step():
    from fused_head import BATCH, SAMPLES, batches, head_bytes_saved, make_model

    x = batches(1)[0]
    element, hidden, pixels = 4, 200, 784
    inputs = (SAMPLES * BATCH * hidden + pixels * hidden + pixels + BATCH * pixels) * element  # h, W, b, x
    logits = SAMPLES * BATCH * pixels * element
    assert head_bytes_saved(make_model("fused"), x) == inputs  # no (L, B, P) tensor
    bias = pixels * element  # the unfused linear layer does not keep its bias, the likelihood op keeps the logits
    assert head_bytes_saved(make_model("unfused"), x) == inputs - bias + logits
