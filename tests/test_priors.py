"""Priors p(z): the densities against torch.distributions, every prior with every objective, the
standard prior's numbers unchanged, the CLI, checkpoints, export, sampling, evaluation and plugins."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

import fastvae
from fastvae import cli, ops
from fastvae.io.export import load_any
from fastvae.models import priors, registry
from fastvae.models.priors import GaussianMixturePrior, MonteCarloKLWarning, StandardNormalPrior, VampPrior
from fastvae.models.vae import VAE
from fastvae.training.checkpoint import load_model, save_checkpoint
from fastvae.training.config import TrainConfig
from fastvae.training.evaluate import importance_sampled_log_likelihood
from fastvae.training.trainer import train

from plugin_helpers import install_toy_plugin

DOCS = Path(__file__).resolve().parents[1] / "docs" / "priors.md"
SHAPE = (1, 8, 8)


def diagonal(mean, logvar):
    return Independent(Normal(mean, torch.exp(0.5 * logvar)), 1)


def mixture(means, logvars, logits=None):
    logits = torch.zeros(means.shape[0], dtype=means.dtype) if logits is None else logits
    return MixtureSameFamily(Categorical(logits=logits), diagonal(means, logvars))


def doubles(*shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


def binary_batch(n=12, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).round()


def tiny_vae(prior="standard", components=None, **kwargs):
    torch.manual_seed(0)
    return VAE(SHAPE, 3, encoder_config={"hidden": [16]}, prior=prior, prior_components=components, **kwargs)


# ------------------------------------------------------------------ each prior's density
def test_standard_prior_log_prob_and_kl_are_the_unit_normals():
    prior, model = StandardNormalPrior(4), tiny_vae()
    z = torch.randn(3, 5, 4, dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(prior.log_prob(z, None), diagonal(zeros, zeros).log_prob(z), rtol=1e-12, atol=1e-12)
    mu, logvar = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(prior.kl(mu, logvar, None), kl_divergence(diagonal(mu, logvar), diagonal(zeros, zeros)))
    assert not list(prior.parameters()) and not any(k.startswith("prior.") for k in model.state_dict())


def test_mog_prior_log_prob_is_its_mixture_same_family():
    prior = GaussianMixturePrior(3, 6).double()
    with torch.no_grad():
        prior.logvars.normal_()
        prior.logits.normal_()
    z = torch.randn(4, 2, 3, dtype=torch.float64)
    expected = mixture(prior.means.detach(), prior.logvars.detach(), prior.logits.detach()).log_prob(z)
    torch.testing.assert_close(prior.log_prob(z, None), expected, rtol=1e-12, atol=1e-12)


def test_vamp_prior_is_the_equal_mixture_of_the_posteriors_at_its_pseudo_inputs():
    model = tiny_vae("vamp", 5).double()
    assert model.prior.pseudo_inputs.shape == (5, *SHAPE)
    means, logvars = model.encode(model.prior.pseudo_inputs)
    z = torch.randn(3, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(model.log_prior(z), mixture(means.detach(), logvars.detach()).log_prob(z),
                               rtol=1e-12, atol=1e-12)


def test_a_mixture_samples_its_components_in_proportion():
    prior = GaussianMixturePrior(2, 2)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-20.0, 0.0], [20.0, 0.0]]))
        prior.logvars.fill_(-4.0)
        prior.logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # weights 1/4, 3/4
    z = prior.sample(20000, None, torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert z.shape == (20000, 2)
    assert abs((z[:, 0] > 0).float().mean().item() - 0.75) < 0.02
    assert abs(z[z[:, 0] > 0, 0].mean().item() - 20.0) < 0.01 and abs(z[:, 1].std().item() - 0.1353) < 0.01
    again = prior.sample(20000, None, torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert torch.equal(z, again)


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_model_samples_come_from_its_prior(prior):
    model = tiny_vae(prior, None if prior == "standard" else 4)
    images = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, *SHAPE) and ((images >= 0) & (images <= 1)).all()


# ------------------------------------------------------------------ the standard prior: today's numbers
def test_the_standard_prior_passes_the_fused_latent_terms_on_unchanged():
    model, x = tiny_vae(), binary_batch()
    out = model(x, num_samples=4, generator=torch.Generator().manual_seed(7))
    mu, logvar = model.encode(x)
    latent = ops.latent_terms(mu, logvar, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.kl, latent.kl) and torch.equal(out.log_p, latent.log_p)
    assert torch.equal(out.elbo, out.rec.mean(0) - latent.kl)


def test_a_default_run_is_bit_for_bit_a_run_that_names_the_standard_prior(tmp_path):
    common = {"epochs": 1, "latent_dim": 3, "arch_config": {"hidden": [16]}}
    default, history = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))
    named, named_history = train(TrainConfig(out_dir=str(tmp_path / "b"), prior="standard", **common))
    timing = {"seconds", "examples_per_second"}
    assert [{k: v for k, v in row.items() if k not in timing} for row in history] == \
        [{k: v for k, v in row.items() if k not in timing} for row in named_history]
    weights, named_weights = default.model.state_dict(), named.model.state_dict()
    assert list(weights) == list(named_weights) and not any(key.startswith("prior.") for key in weights)
    assert all(torch.equal(weights[key], named_weights[key]) for key in weights)


# ------------------------------------------------------------------ every prior with every objective
def train_steps(model, objective, num_samples, steps=40):
    x = binary_batch(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        out = model(x, num_samples=num_samples, objective=objective, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.filterwarnings("ignore::fastvae.models.priors.MonteCarloKLWarning")
@pytest.mark.parametrize("objective, num_samples", [("analytic", 1), ("monte_carlo", 1), ("monte_carlo", 3),
                                                    ("iwae", 5)])
@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_every_prior_trains_with_every_objective(prior, objective, num_samples):
    model = tiny_vae(prior, None if prior == "standard" else 4)
    before = {name: p.detach().clone() for name, p in model.prior.named_parameters()}
    losses = train_steps(model, objective, num_samples)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    for name, p in model.prior.named_parameters():  # the prior trains with the model
        assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_analytic_with_a_mixture_prior_is_the_monte_carlo_bound_and_says_so_once(prior):
    model, x = tiny_vae(prior, 4), binary_batch()
    with pytest.warns(MonteCarloKLWarning, match=f"prior '{prior}' has no analytic KL.*'monte_carlo' bound"):
        analytic = model(x, num_samples=3, generator=torch.Generator().manual_seed(0))
    monte_carlo = model(x, num_samples=3, objective="monte_carlo", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(analytic.elbo, monte_carlo.elbo, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(analytic.kl, (analytic.log_q - analytic.log_p).mean(0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, num_samples=3)  # said once per model


def test_iwae_with_a_mixture_prior_weights_samples_by_its_log_density():
    model, x = tiny_vae("mog", 3), binary_batch()
    out = model(x, num_samples=6, objective="iwae", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.log_p, model.log_prior(out.z))
    expected = torch.logsumexp(out.rec + out.log_p - out.log_q, 0) - torch.log(torch.tensor(6.0))
    torch.testing.assert_close(out.elbo, expected)


def test_a_mixture_prior_model_compiles_without_graph_breaks():
    model, x = tiny_vae("vamp", 4), binary_batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)  # the noise comes from torch's default generator, in both
    eager = model(x, num_samples=2, objective="iwae")
    torch.manual_seed(0)
    traced = compiled(x, num_samples=2, objective="iwae")
    torch.testing.assert_close(traced.elbo, eager.elbo)
    traced.loss.backward()
    assert model.prior.pseudo_inputs.grad is not None


# ------------------------------------------------------------------ evaluation
def test_importance_sampled_log_likelihood_uses_the_prior():
    model, x = tiny_vae("mog", 4), binary_batch(5)
    estimate = importance_sampled_log_likelihood(model, x, num_samples=64, generator=torch.Generator().manual_seed(0))
    # The same estimate written out: z ~ q(z|x), weights p(x|z) p(z) / q(z|x) with the mixture's density.
    mu, logvar = model.encode(x)
    latent = ops.latent_terms(mu, logvar, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_w = model.log_likelihood(model.decode(latent.z), x) + model.log_prior(latent.z) - latent.log_q
    expected = torch.logsumexp(log_w.double(), 0) - torch.log(torch.tensor(64.0, dtype=torch.float64))
    torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ the command line, checkpoints, export
@pytest.fixture(scope="module")
def mog_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("priors") / "mog"
    args = ["train", "--prior", "mog", "--prior-components", "5", "--objective", "monte_carlo", "--samples", "2",
            "--epochs", "2", "--hidden", "16", "--latent-dim", "3", "--out", str(out)]
    assert cli.main(args) == 0
    return out


def test_train_with_a_prior_records_it_in_the_checkpoint(mog_run):
    model, state = load_model(mog_run)
    assert state["train_config"]["prior"] == "mog" and state["train_config"]["prior_components"] == 5
    assert state["model_config"]["prior"] == "mog" and state["model_config"]["prior_components"] == 5
    assert isinstance(model.prior, GaussianMixturePrior) and model.prior.means.shape == (5, 3)
    assert not torch.equal(model.prior.logits, torch.zeros(5))  # trained
    assert (mog_run / "samples.png").is_file()  # pictures sample the prior


def test_resuming_a_mog_run_continues_it_bit_for_bit(tmp_path):
    common = ["--prior", "mog", "--prior-components", "3", "--objective", "monte_carlo", "--hidden", "16",
              "--latent-dim", "3"]
    assert cli.main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert cli.main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert cli.main(["train", "--resume", "--epochs", "2", "--out", str(tmp_path / "resumed")]) == 0
    straight, resumed = (load_model(tmp_path / name)[0].state_dict() for name in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_export_and_load_keep_the_prior(mog_run, tmp_path):
    assert cli.main(["export", str(mog_run), "--out", str(tmp_path / "shared")]) == 0
    exported, original = fastvae.load(tmp_path / "shared"), load_model(mog_run)[0]
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["model_config"]["prior"] == "mog"
    z = torch.randn(4, 3)
    assert torch.equal(exported.log_prior(z), original.log_prior(z))
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(exported.sample(5, generator=generator()), original.sample(5, generator=generator()))


def test_sample_and_eval_commands_use_the_prior(mog_run, tmp_path, capsys):
    assert cli.main(["sample", str(mog_run), "--num", "8", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    assert cli.main(["eval", str(mog_run), "--is-samples", "20", "--limit", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 50 and report["log_likelihood"] >= report["elbo"] - 1.0


def test_a_vamp_run_trains_exports_and_evaluates(tmp_path, capsys):
    out = tmp_path / "vamp"
    assert cli.main(["train", "--prior", "vamp", "--prior-components", "4", "--objective", "iwae", "--samples", "3",
                     "--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--out", str(out)]) == 0
    model, train_config = load_any(out)
    assert isinstance(model.prior, VampPrior) and model.prior.pseudo_inputs.shape == (4, *SHAPE)
    assert cli.main(["export", str(out), "--out", str(tmp_path / "shared")]) == 0
    assert torch.equal(fastvae.load(tmp_path / "shared").prior.pseudo_inputs, model.prior.pseudo_inputs)
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--is-samples", "10", "--limit", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["log_likelihood"] < 0


def test_old_checkpoints_and_exports_without_a_prior_load_as_standard(tmp_path):
    trainer, _ = train(TrainConfig(out_dir=str(tmp_path / "run"), epochs=1, latent_dim=3, arch_config={"hidden": [8]}))
    state = trainer.state()
    for config in (state["model_config"], state["train_config"]):
        del config["prior"], config["prior_components"]
    save_checkpoint(tmp_path / "old.pt", state)
    model, _ = load_model(tmp_path / "old.pt")
    assert isinstance(model.prior, StandardNormalPrior) and model.config["prior"] == "standard"
    model.save_pretrained(tmp_path / "shared")
    config_path = tmp_path / "shared" / "config.json"
    config = json.loads(config_path.read_text())
    del config["model_config"]["prior"], config["model_config"]["prior_components"]
    config_path.write_text(json.dumps(config))
    assert isinstance(fastvae.load(tmp_path / "shared").prior, StandardNormalPrior)
    assert TrainConfig.from_dict(state["train_config"]).prior == "standard"


def test_list_shows_the_priors(capsys):
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in listing.splitlines()[listing.splitlines().index(
        next(line for line in listing.splitlines() if line.startswith("PRIOR"))) + 1:]}
    assert rows["standard"] == ["-", "builtin"] and rows["mog"] == ["K=10", "builtin"]
    assert rows["vamp"] == ["K=50", "builtin"]


# ------------------------------------------------------------------ bad input
def test_an_unknown_prior_is_refused_with_a_suggestion(capsys):
    with pytest.raises(LookupError, match=r"unknown prior 'vampp'; did you mean 'vamp'\? Known priors: .*mog"):
        VAE(SHAPE, 3, prior="vampp")
    with pytest.raises(LookupError, match="did you mean 'mog'"):
        TrainConfig(prior="mogg").validate()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--prior", "vampp"])
    assert exit_info.value.code == 2 and "invalid choice: 'vampp'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prior", "mog", "--prior-components", "0"], "--prior-components must be >= 1, got 0"),
    (["--prior", "vamp", "--prior-components", "-3"], "--prior-components must be >= 1, got -3"),
    (["--prior-components", "5"], "prior_components (--prior-components) is for priors with components (mog, vamp); "
                                  "prior 'standard' has none"),
])
def test_bad_component_counts_are_refused_naming_the_option(args, message, tmp_path, capsys):
    assert cli.main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_vamp_with_a_conditional_model_is_refused():
    with pytest.raises(ValueError, match="prior 'vamp' passes pseudo-inputs through the encoder.*condition_dim=10"):
        VAE(SHAPE, 3, condition_dim=10, prior="vamp")
    assert isinstance(VAE(SHAPE, 3, encoder_config={"hidden": [8]}, condition_dim=10, prior="mog").prior,
                      GaussianMixturePrior)


def test_a_prior_that_builds_something_else_is_refused(scratch_registries):
    priors.register_prior(priors.Prior("broken", "builds a plain module", lambda **config: torch.nn.Identity()))
    with pytest.raises(TypeError, match="prior 'broken': build must return a fastvae.models.priors.LatentPrior"):
        VAE(SHAPE, 3, prior="broken")
    with pytest.raises(TypeError, match="prior must be a registered prior name or a fastvae.models.priors.LatentPrior"):
        VAE(SHAPE, 3, prior=3)


# ------------------------------------------------------------------ plugins
def test_a_plugin_prior_is_listed_and_trains_with_its_analytic_kl(site, scratch_registries, tmp_path, capsys):
    install_toy_plugin(site)
    registry.reload_plugins()
    assert cli.main(["list"]) == 0
    assert [line.split()[1:3] for line in capsys.readouterr().out.splitlines()
            if line.startswith("toy_learned_gaussian")] == [["-", "fastvae-toy-plugin"]]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MonteCarloKLWarning)  # analytic_kl: no Monte Carlo estimate
        assert cli.main(["train", "--prior", "toy_learned_gaussian", "--epochs", "1", "--hidden", "16",
                         "--latent-dim", "3", "--out", str(tmp_path / "run")]) == 0
    model, _ = load_model(tmp_path / "run")
    assert type(model.prior).__name__ == "LearnedGaussianPrior" and not torch.equal(model.prior.mean, torch.zeros(3))
    x = binary_batch()
    out = model(x, generator=torch.Generator().manual_seed(0))
    mu, logvar = model.encode(x)
    prior = diagonal(model.prior.mean.expand(12, 3), model.prior.logvar.expand(12, 3))
    torch.testing.assert_close(out.kl, kl_divergence(diagonal(mu, logvar), prior))
    shutil.rmtree(site / "fastvae_toy_plugin-0.1.dist-info")
    registry.reload_plugins()
    assert "toy_learned_gaussian" not in priors.names()


# ------------------------------------------------------------------ docs/priors.md
BLOCKS = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_the_priors_page_python_blocks_run(index, tmp_path, monkeypatch, scratch_registries):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/priors.md python block {index}", "exec"), {"__name__": "priors_doc"})


def test_the_priors_page_has_examples():
    assert BLOCKS
