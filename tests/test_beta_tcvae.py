"""beta-TCVAE (Chen et al. 2018): the minibatch-weighted total correlation against a direct computation
in float64, training with every prior, the command line, and bad settings named."""

import math

import pytest
import torch
from torch.distributions import Normal

from fastvae import cli
from fastvae.models import objectives
from fastvae.models.objectives import LatentBatch, aggregate_log_densities
from fastvae.models.vae import VAE, bound
from fastvae.training.checkpoint import load_model
from fastvae.training.config import TrainConfig
from fastvae.training.trainer import train

SHAPE = (1, 8, 8)


def batch(L=3, B=6, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(B, D, generator=g, dtype=torch.float64) - 1
    z = mu + torch.exp(0.5 * logvar) * torch.randn(L, B, D, generator=g, dtype=torch.float64)
    rec = -10 * torch.rand(L, B, generator=g, dtype=torch.float64)
    log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    kl = (log_q - log_p).mean(0)
    return z, mu, logvar, rec, kl, log_q, log_p


def direct_terms(z, mu, logvar, dataset_size):
    """log q(z) and sum_d log q(z_d) by minibatch-weighted sampling, every pair (sample, posterior) written out."""
    per_dim = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[:, :, None, :])  # (L, B, M, D): z_lb under q(.|x_m)
    log_nm = math.log(dataset_size * mu.shape[0])
    log_qz = torch.logsumexp(per_dim.sum(-1), dim=2) - log_nm
    log_qz_dims = (torch.logsumexp(per_dim, dim=2) - log_nm).sum(-1)
    return log_qz, log_qz_dims


def test_aggregate_log_densities_match_the_direct_computation():
    z, mu, logvar, *_ = batch()
    log_qz, log_qz_dims = aggregate_log_densities(z, mu, logvar, dataset_size=500)
    expected_qz, expected_dims = direct_terms(z, mu, logvar, 500)
    torch.testing.assert_close(log_qz, expected_qz, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_qz_dims, expected_dims, rtol=1e-12, atol=1e-12)


def test_the_bound_is_rec_minus_the_weighted_decomposition():
    z, mu, logvar, rec, kl, log_q, log_p = batch(seed=1)
    settings = {"alpha": 0.7, "gamma": 1.3, "dataset_size": 500}
    got = bound("beta_tcvae", rec, kl, log_q, log_p, 3.0, LatentBatch(z, mu, logvar, settings))
    log_qz, log_qz_dims = direct_terms(z, mu, logvar, 500)
    penalty = 0.7 * (log_q - log_qz) + 3.0 * (log_qz - log_qz_dims) + 1.3 * (log_qz_dims - log_p)
    torch.testing.assert_close(got, (rec - penalty).mean(0), rtol=1e-12, atol=1e-12)


def test_unit_weights_give_the_monte_carlo_elbo_whatever_the_data_set_size():
    z, mu, logvar, rec, kl, log_q, log_p = batch(seed=2)
    for size in (None, 10, 60000):
        latents = LatentBatch(z, mu, logvar, objectives.get("beta_tcvae").settings_with({"dataset_size": size}))
        torch.testing.assert_close(bound("beta_tcvae", rec, kl, log_q, log_p, 1.0, latents),
                                   bound("monte_carlo", rec, kl, log_q, log_p, 1.0), rtol=1e-12, atol=1e-12)


def test_without_a_data_set_size_the_batch_counts_as_the_data_set():
    z, mu, logvar, rec, kl, log_q, log_p = batch(seed=3)
    defaults = objectives.get("beta_tcvae").settings_with(None)
    assert defaults == {"alpha": 1.0, "gamma": 1.0, "dataset_size": None}
    as_batch = bound("beta_tcvae", rec, kl, log_q, log_p, 4.0, LatentBatch(z, mu, logvar, defaults))
    sized = bound("beta_tcvae", rec, kl, log_q, log_p, 4.0, LatentBatch(z, mu, logvar, {**defaults, "dataset_size": 6}))
    torch.testing.assert_close(as_batch, sized)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_beta_tcvae_trains_with_every_prior(prior):
    torch.manual_seed(0)
    model = VAE(SHAPE, 3, encoder_config={"hidden": [16]}, prior=prior)
    x = torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(0)).round()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        out = model(x, num_samples=2, objective="beta_tcvae", beta=4.0, generator=torch.Generator().manual_seed(step),
                    objective_settings={"alpha": 0.5, "dataset_size": 1000})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_the_command_line_trains_beta_tcvae_with_its_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--objective", "beta_tcvae", "--beta", "4", "--tc-alpha", "0.5", "--tc-gamma", "2",
                     "--samples", "2", "--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--out", str(out)]) == 0
    _, state = load_model(out)
    assert (state["train_config"]["tc_alpha"], state["train_config"]["tc_gamma"]) == (0.5, 2.0)
    assert cli.main(["list"]) == 0
    assert any(line.startswith("beta_tcvae") for line in capsys.readouterr().out.splitlines())


def test_the_trainer_gives_the_training_set_size_for_the_estimate(tmp_path):
    trainer, _ = train(TrainConfig(out_dir=str(tmp_path), objective="beta_tcvae", tc_gamma=2.0, epochs=1,
                                   latent_dim=3, arch_config={"hidden": [8]}))
    assert trainer.objective_settings == {"alpha": 1.0, "gamma": 2.0, "dataset_size": len(trainer.train_set)}
    default, _ = train(TrainConfig(out_dir=str(tmp_path / "b"), epochs=1, latent_dim=3, arch_config={"hidden": [8]}))
    assert default.objective_settings == {}


@pytest.mark.parametrize("args, message", [
    (["--tc-alpha", "0.5"], "tc_alpha (--tc-alpha) is a setting of objective beta_tcvae, not of 'analytic'"),
    (["--objective", "beta_tcvae", "--tc-gamma", "-1"], "--tc-gamma must be finite and >= 0, got -1"),
    (["--objective", "beta_tcvae", "--tc-alpha", "nan"], "--tc-alpha must be finite and >= 0, got nan"),
])
def test_bad_weights_are_refused_naming_the_option(args, message, tmp_path, capsys):
    assert cli.main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err


def test_settings_an_objective_does_not_declare_and_missing_latents_are_named():
    model = VAE(SHAPE, 3, encoder_config={"hidden": [8]})
    x = torch.rand(4, *SHAPE).round()
    with pytest.raises(ValueError, match=r"objective 'beta_tcvae' has no setting 'delta' \(its settings: alpha, gamma"):
        model(x, objective="beta_tcvae", objective_settings={"delta": 1.0})
    with pytest.raises(ValueError, match="objective 'iwae' has no setting 'alpha' \\(its settings: none\\)"):
        model(x, objective="iwae", objective_settings={"alpha": 1.0})
    z, mu, logvar, rec, kl, log_q, log_p = batch()
    with pytest.raises(ValueError, match="objective 'beta_tcvae' needs the batch's latents"):
        bound("beta_tcvae", rec, kl, log_q, log_p)


def test_beta_tcvae_compiles_without_graph_breaks():
    model = VAE(SHAPE, 3, encoder_config={"hidden": [16]}, prior="mog")
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0)).round()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    settings = {"gamma": 2.0, "dataset_size": 100}
    torch.manual_seed(0)  # the noise comes from torch's default generator, in both
    eager = model(x, num_samples=2, objective="beta_tcvae", objective_settings=settings)
    torch.manual_seed(0)
    traced = compiled(x, num_samples=2, objective="beta_tcvae", objective_settings=settings)
    torch.testing.assert_close(traced.elbo, eager.elbo)
