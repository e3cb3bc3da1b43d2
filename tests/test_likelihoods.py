"""Likelihood and objective declarations: the tables, what reads them, "auto", and plugins end to end."""

import re
import shutil

import pytest
import torch
from plugin_helpers import install, install_toy_plugin

from fastvae import cli, ops
from fastvae.models import likelihoods, objectives, registry
from fastvae.training.checkpoint import load_model
from fastvae.training.config import TrainConfig
from fastvae.io.data import ImageDataset
from fastvae.models.likelihoods import Likelihood, data_kind, register_likelihood, resolve_auto
from fastvae.models.vae import VAE
from fastvae.models.objectives import Objective, register_objective
from fastvae.models.plugins import DuplicateNameError, UnknownNameError
from fastvae.training.trainer import Trainer, resolve_likelihood

BUILTIN_LIKELIHOODS = {"bernoulli", "gaussian", "gaussian_learned"}


@pytest.fixture(autouse=True)
def scratch(scratch_registries):
    """Every test here runs on copies of the tables (see conftest.py)."""


def small_config(tmp_path, **overrides):
    values = {"out_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 50, "latent_dim": 2,
              "arch_config": {"hidden": [16]}, "val_fraction": 0.0}
    return TrainConfig(**{**values, **overrides})


def eight_bit_colour(n=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=generator).float() / 255


# ------------------------------------------------------------------ the tables
def test_builtins_are_declared_once_with_their_parameters():
    assert BUILTIN_LIKELIHOODS <= set(likelihoods.names())
    assert likelihoods.get("bernoulli").params == ("logits",) and likelihoods.get("bernoulli").binarize
    assert likelihoods.get("gaussian_learned").params_per_element == 2
    assert {"analytic", "monte_carlo", "iwae"} <= set(objectives.names())
    sources = {e.item.name: e.source for e in likelihoods.LIKELIHOODS.entries()}
    assert {sources[name] for name in BUILTIN_LIKELIHOODS} == {"builtin"}


def test_unknown_names_suggest_the_closest_and_are_value_errors_too():
    with pytest.raises(UnknownNameError, match="unknown likelihood 'bernouli'; did you mean 'bernoulli'"):
        likelihoods.get("bernouli")
    with pytest.raises(ValueError, match="unknown objective 'iwea'; did you mean 'iwae'"):
        objectives.get("iwea")
    with pytest.raises(ValueError, match="resolve it with resolve_auto"):
        likelihoods.get("auto")


def test_a_declaration_is_checked_when_made():
    fine = likelihoods.get("gaussian")
    with pytest.raises(ValueError, match="data must be one of"):
        Likelihood("x", "", ("mean",), "ints", fine.log_prob, fine.mean, fine.sample)
    with pytest.raises(ValueError, match="params must be a non-empty tuple"):
        Likelihood("x", "", (), "real", fine.log_prob, fine.mean, fine.sample)
    with pytest.raises(ValueError, match="other than 'auto'"):
        Likelihood("auto", "", ("mean",), "real", fine.log_prob, fine.mean, fine.sample)
    with pytest.raises(TypeError, match="needs a fastvae.models.likelihoods.Likelihood"):
        register_likelihood("gaussian")


def test_a_taken_name_needs_override():
    gaussian = likelihoods.get("gaussian")
    other = Likelihood("gaussian", "another", ("mean",), "real", lambda p, x, s: p[0].sum(-1),
                       gaussian.mean, gaussian.sample)
    with pytest.raises(DuplicateNameError, match="likelihood 'gaussian' is already registered by builtin"):
        register_likelihood(other)
    register_likelihood(other, override=True)
    assert likelihoods.get("gaussian").description == "another"


def test_the_listing_shows_likelihoods_and_objectives_with_their_source(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gaussian_learned +mean,logvar +real +builtin", out) and "[0, 1], binarized" in out
    assert re.search(r"discretized_logistic +mean,log_scale +8-bit levels k/255 +builtin", out)
    assert "OBJECTIVE" in out and "iwae" in out and "mlp" in out


# ------------------------------------------------------------------ what reads them
def test_a_registered_likelihood_shapes_every_decoder_and_scores_through_its_log_prob():
    def log_prob(params, x, settings):
        a, b, c = params
        return (a + b + c - x).sum(-1).sum(-1).sum(-1)

    register_likelihood(Likelihood("three", "three parameters", ("a", "b", "c"), "real", log_prob,
                                   mean=lambda p: p[1], sample=lambda p, s, g: p[2]))
    for name, config in (("mlp", {"hidden": [8]}), ("conv", {"channels": [4, 8]}), ("resnet", {"channels": [4]})):
        model = VAE((1, 8, 8), 2, name, likelihood="three", encoder_config=config, decoder_config=config)
        decoded = model.decode(torch.randn(5, 2))
        assert isinstance(decoded, tuple) and len(decoded) == 3 and decoded[0].shape == (5, 1, 8, 8)
        x = torch.rand(4, 1, 8, 8)
        out = model(x, num_samples=2)
        assert out.rec.shape == (2, 4)
        assert torch.equal(model.reconstruct(x), model.mean_image(model.decode(model.encode(x)[0])))


def test_gaussian_logvar_reaches_the_fused_op(tmp_path, capsys):
    model = VAE((1, 8, 8), 2, likelihood="gaussian", gaussian_logvar=-3.0, encoder_config={"hidden": [8]})
    x = torch.rand(3, 1, 8, 8)
    mean = torch.rand(2, 3, 1, 8, 8)
    assert torch.allclose(model.log_likelihood(mean, x), ops.gaussian_log_likelihood(mean, x, -3.0))
    out = tmp_path / "run"
    assert cli.main(["train", "--likelihood", "gaussian", "--gaussian-logvar", "-4", "--epochs", "1",
                     "--hidden", "8", "--out", str(out)]) == 0
    trained, state = load_model(out)
    assert trained.gaussian_logvar == -4.0 and state["train_config"]["gaussian_logvar"] == -4.0
    with pytest.raises(ValueError, match="gaussian_logvar must be finite"):
        TrainConfig(gaussian_logvar=float("nan")).validate()


def test_only_a_binarizing_likelihood_gets_binarized_data(tmp_path):
    assert TrainConfig(likelihood="bernoulli", binarize="threshold").binarize_mode == "threshold"
    assert TrainConfig(likelihood="gaussian", binarize="threshold").binarize_mode == "none"


def test_noisy_samples_come_from_the_likelihood():
    torch.manual_seed(0)
    model = VAE((1, 8, 8), 2, likelihood="bernoulli", encoder_config={"hidden": [8]})
    drawn = model.sample(6, generator=torch.Generator().manual_seed(1), mean=False)
    assert set(drawn.unique().tolist()) <= {0.0, 1.0}
    means = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert ((means > 0) & (means < 1)).all()


# ------------------------------------------------------------------ data kinds and "auto"
def test_data_kind_is_the_narrowest_kind():
    assert data_kind(torch.tensor([0.0, 1.0, 1.0])) == "binary"
    assert data_kind(torch.tensor([0.0, 17 / 255, 1.0])) == "8bit"
    assert data_kind(torch.tensor([0.0, 0.5, 1.0])) == "unit"
    assert data_kind(torch.tensor([-0.1, 0.5])) == "real"
    assert data_kind(torch.tensor([float("nan")])) == "real"


def test_a_likelihood_rejects_data_it_does_not_model():
    with pytest.raises(ValueError, match=r"bernoulli likelihood models \[0, 1\] data, but x is real"):
        likelihoods.get("bernoulli").check_data(torch.tensor([0.5, 2.0]), "x")
    likelihoods.get("bernoulli").check_data(torch.tensor([0.5, 0.25]))
    likelihoods.get("gaussian").check_data(torch.tensor([-3.0, 2.0]))
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        likelihoods.get("gaussian").check_data(torch.tensor([0.5, float("inf")]), "x")


def test_the_trainer_checks_the_data_against_the_likelihood(tmp_path):
    data = ImageDataset(torch.rand(20, 1, 8, 8) * 3 - 1, None, 0, "signed")
    with pytest.raises(ValueError, match="models \\[0, 1\\] data, but the training set 'signed' is real"):
        Trainer(small_config(tmp_path, likelihood="bernoulli"), data)


def test_auto_picks_bernoulli_for_binary_benchmarks_and_binary_data():
    assert resolve_auto(torch.rand(4, 1, 8, 8), binary_benchmark=True) == ("bernoulli", "a binary benchmark")
    assert resolve_auto(torch.randint(0, 2, (4, 1, 8, 8)).float())[0] == "bernoulli"
    assert resolve_auto(torch.randn(4, 1, 8, 8))[0] == "gaussian"


def test_auto_picks_the_discretized_logistic_for_8_bit_images_and_the_continuous_bernoulli_for_grey_levels():
    assert resolve_auto(eight_bit_colour()) == ("discretized_logistic", "8-bit levels k/255 data")
    assert resolve_auto(torch.rand(4, 1, 8, 8)) == ("continuous_bernoulli", "[0, 1] data")


def test_the_discretized_logistic_refuses_data_off_the_8_bit_levels(tmp_path):
    digits_like = ImageDataset(torch.randint(0, 17, (20, 1, 8, 8)).float() / 16, None, 0, "sixteenths")
    with pytest.raises(ValueError, match="models 8-bit levels k/255 data, but the training set 'sixteenths' is"):
        Trainer(small_config(tmp_path, likelihood="discretized_logistic"), digits_like)


def test_continuous_bernoulli_mean_and_draws_follow_the_distribution():
    spec = likelihoods.get("continuous_bernoulli")
    logits = torch.tensor([-30.0, -4.0, -0.5, -1e-4, 0.0, 1e-5, 0.2, 3.0, 25.0], dtype=torch.float64)
    # torch.distributions is a float64 reference at |logit| < 36 (it clamps beyond).
    expected = torch.distributions.ContinuousBernoulli(logits=logits).mean
    assert torch.allclose(spec.mean((logits,)), expected, atol=1e-9)
    draws = spec.sample((logits.expand(100_000, -1),), {}, torch.Generator().manual_seed(0))
    assert ((draws >= 0) & (draws <= 1)).all()
    assert torch.allclose(draws.mean(0), expected, atol=0.005)  # 5 standard errors of 100k draws


def test_discretized_logistic_draws_are_8_bit_levels_around_the_mean():
    spec = likelihoods.get("discretized_logistic")
    mean, log_scale = torch.full((50_000,), 0.3), torch.full((50_000,), -4.0)
    draws = spec.sample((mean, log_scale), {}, torch.Generator().manual_seed(0))
    assert data_kind(draws) == "8bit" and abs(draws.mean().item() - 0.3) < 0.002
    assert torch.equal(spec.mean((torch.tensor([-0.2, 0.5, 1.3]), torch.zeros(3))), torch.tensor([0.0, 0.5, 1.0]))


def test_auto_resolves_in_the_config_the_checkpoint_stores(tmp_path):
    data = ImageDataset(torch.randint(0, 2, (20, 1, 8, 8)).float(), None, 0, "coins")
    config, line = resolve_likelihood(small_config(tmp_path), data)
    assert config.likelihood == "bernoulli" and line == "likelihood: bernoulli (auto: coins is binary {0, 1} data)"
    assert resolve_likelihood(config, data) == (config, None)
    trainer = Trainer(small_config(tmp_path), data)
    trainer.fit()
    assert trainer.state()["train_config"]["likelihood"] == "bernoulli"


def test_fastvae_train_prints_the_likelihood_it_chose(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "1", "--hidden", "8", "--out", str(tmp_path / "run")]) == 0
    assert "likelihood: bernoulli (auto: digits is a binary benchmark)" in capsys.readouterr().out


# ------------------------------------------------------------------ objectives
def test_a_registered_objective_trains(tmp_path):
    def half_kl(rec, kl, log_q, log_p, beta):
        return rec.mean(0) - 0.5 * beta * kl

    register_objective(Objective("half_kl", "ELBO with half the KL", half_kl))
    model = VAE((1, 8, 8), 2, encoder_config={"hidden": [8]})
    x = torch.rand(5, 1, 8, 8).round()
    out = model(x, objective="half_kl", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.elbo, out.rec.mean(0) - 0.5 * out.kl)
    assert "half_kl" in TrainConfig.__dataclass_fields__["objective"].metadata["choices"]()


# ------------------------------------------------------------------ plugins
def test_a_plugin_likelihood_and_objective_train_end_to_end_from_the_cli(site, tmp_path, capsys):
    install_toy_plugin(site)
    registry.reload_plugins()
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert [line.split()[3] for line in listing.splitlines() if line.startswith("toy_laplace")] == \
        ["fastvae-toy-plugin"]
    assert [line.split()[1] for line in listing.splitlines() if line.startswith("toy_renyi_half")] == \
        ["fastvae-toy-plugin"]
    out = tmp_path / "run"
    assert cli.main(["train", "--likelihood", "toy_laplace", "--objective", "toy_renyi_half", "--samples", "3",
                     "--encoder", "conv", "--epochs", "2", "--out", str(out)]) == 0
    model, state = load_model(out)
    assert state["train_config"]["likelihood"] == "toy_laplace" and model.decoder.params_per_element == 2
    x = torch.rand(4, 1, 8, 8)
    mean, log_scale = model.decode(model.encode(x)[0])
    expected = torch.distributions.Laplace(mean, log_scale.exp()).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(model.log_likelihood((mean, log_scale), x), expected, atol=1e-4)
    with torch.no_grad():
        renyi = model(x, num_samples=4, objective="toy_renyi_half", generator=torch.Generator().manual_seed(0)).elbo
        analytic = model(x, num_samples=4, objective="monte_carlo", generator=torch.Generator().manual_seed(0)).elbo
    assert (renyi >= analytic - 1e-4).all()  # Jensen: the alpha = 1/2 bound is above the Monte Carlo ELBO


def test_plugins_load_lazily_and_uninstalled_ones_are_forgotten(site, monkeypatch):
    install_toy_plugin(site)
    monkeypatch.setattr(likelihoods.LIKELIHOODS.group, "loaded", False)
    assert likelihoods.get("toy_laplace").params == ("mean", "log_scale")
    shutil.rmtree(site / "fastvae_toy_plugin-0.1.dist-info")
    registry.reload_plugins()
    with pytest.raises(LookupError):
        likelihoods.get("toy_laplace")
    assert "toy_renyi_half" not in objectives.names()


def test_a_broken_likelihood_plugin_warns_once_naming_it_and_the_rest_works(site):
    groups = {likelihoods.ENTRY_POINT_GROUP: {"broken": "broken_likelihood", "not_one": "broken_likelihood:VALUE"}}
    install(site, "fastvae-broken-likelihood", {}, {"broken_likelihood.py": "VALUE = 3\n"}, groups=groups)
    install(site, "fastvae-crashing-likelihood", {}, {"crashing.py": "raise ImportError('needs scipy')"},
            groups={likelihoods.ENTRY_POINT_GROUP: {"crash": "crashing"}})
    install_toy_plugin(site)
    with pytest.warns(RuntimeWarning) as caught:
        likelihoods.reload_plugins()
    crash, not_one = sorted(str(w.message) for w in caught)  # 'broken' registers nothing, which is no error
    assert "'crash' = 'crashing' from distribution 'fastvae-crashing-likelihood': ImportError: needs scipy" in crash
    assert "'not_one'" in not_one and "TypeError: entry point names int" in not_one
    assert {"bernoulli", "toy_laplace"} <= set(likelihoods.names())


def test_a_plugin_cannot_silently_replace_a_builtin_objective(site):
    source = ("from fastvae.models.objectives import Objective\n"
              "IMPOSTOR = Objective('iwae', 'not the IWAE bound', lambda rec, kl, log_q, log_p, beta: rec.mean(0))\n")
    install(site, "fastvae-impostor", {}, {"impostor_objective.py": source},
            groups={objectives.ENTRY_POINT_GROUP: {"impostor": "impostor_objective:IMPOSTOR"}})
    with pytest.warns(RuntimeWarning, match="fastvae-impostor.*DuplicateNameError"):
        objectives.reload_plugins()
    assert objectives.get("iwae").description.startswith("the importance-weighted bound")
