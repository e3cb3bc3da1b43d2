"""Benchmarks of the prior ops against eager PyTorch, and the memory they keep for backward.

    pytest benchmarks/test_bench_priors.py --benchmark-only --benchmark-json=benchmarks/priors.json
    python benchmarks/report.py benchmarks/priors.json

Sizes (float32): the mixture at B=100, K=500, D=50 (a VampPrior step's log p(z)); the KL to a
conditional diagonal Gaussian prior and the Gaussian log-density at (4096, 256) and (100, 50).
Providers in priors_memory.py: fastvae (the fused op) and eager. And a VampPrior (K=500) training
step, fastvae.VAE against the same model in eager PyTorch (vamp_step.py); kl_breakdown.py splits
the KL's forward+backward time into its parts.
"""

import pytest
import torch

from priors_memory import (LOG_PROB, MIXTURE, MIXTURE_SIZE, PRIOR_KL, gaussian_inputs, mixture_inputs,
                           mixture_saved_bytes)
from providers import run_mode

import kl_breakdown
import vamp_step

SIZES = [(4096, 256), (100, 50)]
MODES = ["forward", "forward+backward"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B={s[0]},D={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PRIOR_KL))
def test_gaussian_kl_with_prior(benchmark, provider, mode, size):
    benchmark.group = f"gaussian_kl with prior {mode} B={size[0]} D={size[1]}"
    benchmark(run_mode(PRIOR_KL[provider], gaussian_inputs(*size, 4), mode))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B={s[0]},D={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(LOG_PROB))
def test_gaussian_log_prob(benchmark, provider, mode, size):
    benchmark.group = f"gaussian_log_prob {mode} B={size[0]} D={size[1]}"
    benchmark(run_mode(LOG_PROB[provider], gaussian_inputs(*size, 3), mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(MIXTURE))
def test_mixture_log_prob(benchmark, provider, mode):
    batch, components, dim = MIXTURE_SIZE
    benchmark.group = f"mixture_log_prob {mode} B={batch} K={components} D={dim}"
    benchmark(run_mode(MIXTURE[provider], mixture_inputs(*MIXTURE_SIZE), mode))


def test_providers_agree():
    inputs = mixture_inputs(*MIXTURE_SIZE)
    torch.testing.assert_close(MIXTURE["fastvae"](*inputs), MIXTURE["eager"](*inputs), rtol=1e-5, atol=1e-4)
    for table, count in ((PRIOR_KL, 4), (LOG_PROB, 3)):
        inputs = gaussian_inputs(100, 50, count)
        torch.testing.assert_close(table["fastvae"](*inputs), table["eager"](*inputs), rtol=1e-5, atol=1e-4)


def test_mixture_saves_ten_times_less_for_backward():
    # A measurement, not a timing: the fused op keeps its inputs and the (B, K)
    # responsibilities; eager keeps (B, K, D) tensors.
    fused, eager = mixture_saved_bytes("fastvae"), mixture_saved_bytes("eager")
    assert eager >= 10 * fused, (fused, eager)


@pytest.mark.parametrize("provider", ["fastvae", "eager"])
def test_vamp_training_step(benchmark, provider):
    """A VampPrior (K=500) training step on the Burda MLP (vamp_step.py has the interleaved table)."""
    builder = vamp_step.fastvae_vamp_step if provider == "fastvae" else vamp_step.eager_vamp_step
    step = builder(vamp_step.minibatches(count=4), 500)
    for _ in range(3):
        step()
    benchmark.group = "VampPrior K=500 training step, MLP 784-200-200-50 B=100, Adam(fused=True)"
    benchmark(step)


def test_kl_breakdown_runs_every_row():
    """benchmarks/kl_breakdown.py at a small size (a smoke run, not a timing)."""
    times = kl_breakdown.measure(8, 4, budget=0.003, rounds=1)
    assert list(times) == ["forward", "fwd+bwd, .grad None", "fwd+bwd, accumulated", "backward alone"]
    assert set(times["backward alone"]) == {"fastvae"}
    assert all(t > 0 for row in times.values() for t in row.values())
    assert "| forward |" in kl_breakdown.table(times)


def test_run_mode_hands_each_call_its_own_gradients():
    """Forward+backward as a training step: every call starts from .grad None, so after several
    calls each leaf holds one call's gradient, not their sum."""
    inputs = gaussian_inputs(16, 8, 4)
    once = torch.autograd.grad(PRIOR_KL["fastvae"](*inputs).sum(), inputs)
    step = run_mode(PRIOR_KL["fastvae"], inputs, "forward+backward")  # three warm-up calls already
    step()
    for leaf, expected in zip(inputs, once):
        torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.parametrize("argv, named", [(["--batch", "0"], "--batch"), (["--dim", "-1"], "--dim"),
                                         (["--budget", "0"], "--budget"), (["--threads", "0"], "--threads")])
def test_kl_breakdown_refuses_bad_arguments(argv, named, capsys):
    with pytest.raises(SystemExit):
        kl_breakdown.main(argv)
    assert named in capsys.readouterr().err
