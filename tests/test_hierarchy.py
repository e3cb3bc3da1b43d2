"""Several stochastic layers (fastvae/models/hierarchy.py): the bound against torch.distributions,
training, evaluation, sampling, checkpoints and export, the CLI, the custom-architecture contract."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from cli_helpers import run_cli
from fastvae.io import data as data_lib
from fastvae.io.export import load_pretrained, save_pretrained
from fastvae.models import registry
from fastvae.models.hierarchy import HierarchicalVAE
from fastvae.models.vae import VAE
from fastvae.training.checkpoint import load_model
from fastvae.training.config import TrainConfig
from fastvae.training.evaluate import evaluate, importance_sampled_log_likelihood
from fastvae.training.trainer import Trainer, split_validation

DOC = Path(__file__).resolve().parents[1] / "docs" / "hierarchy.md"
SHAPE = (1, 8, 8)


def tiny_model(layers=2, dtype=torch.float32, condition_dim=0, seed=0, **kwargs) -> HierarchicalVAE:
    torch.manual_seed(seed)
    dims = {2: [3], 3: [4, 2]}[layers]
    model = HierarchicalVAE(SHAPE, 5, encoder_config={"hidden": [12], "sparse_input": False},
                            decoder_config={"hidden": [12]}, condition_dim=condition_dim, stochastic_layers=layers,
                            upper_latent_dims=dims, layer_config={"hidden": [7, 6], "sparse_input": False}, **kwargs)
    return model.to(dtype)


def binary_batch(batch=4, dtype=torch.float32, seed=1):
    return (torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.4).to(dtype)


def gaussian(mu_logvar) -> Normal:
    mu, logvar = mu_logvar
    return Normal(mu, torch.exp(0.5 * logvar))


def reference_terms(model: HierarchicalVAE, x, out):
    """rec, log_q, log_p (L, B) and the KL estimate (B,) from the model's modules and torch.distributions,
    at the noise of `out`: each layer's eps recovered from its sample, then the chain redrawn from it
    (z = mu + sigma * eps), so gradients flow as through the model's reparameterization."""
    num_samples, batch = out.rec.shape
    q1 = gaussian(model.encoder(x, None))
    eps = ((out.z - q1.loc) / q1.scale).detach()
    z = q1.loc + q1.scale * eps                                   # (L, B, D1)
    logits = model.decoder(z.reshape(-1, model.latent_dim)).reshape(num_samples, batch, -1)
    rec = Bernoulli(logits=logits).log_prob(x.reshape(batch, -1)).sum(-1)
    log_q = q1.log_prob(z).sum(-1)
    log_p = torch.zeros_like(rec)
    lower = z.transpose(0, 1).reshape(batch * num_samples, -1)     # example-major rows, as the model runs them
    for encoder, decoder, drawn in zip(model.upper_encoders, model.upper_decoders, out.upper):
        q = gaussian(encoder(lower, None))
        upper = q.loc + q.scale * ((drawn.z - q.loc) / q.scale).detach()
        per_sample = lambda t: t.reshape(batch, num_samples).t()  # noqa: E731
        log_q = log_q + per_sample(q.log_prob(upper).sum(-1))
        log_p = log_p + per_sample(gaussian(decoder(upper, None)).log_prob(lower).sum(-1))
        lower = upper
    prior = Normal(torch.zeros_like(lower), torch.ones_like(lower))
    log_p_top = per_sample(prior.log_prob(lower).sum(-1))
    log_q_top = per_sample(q.log_prob(lower).sum(-1))
    kl_top = per_sample(kl_divergence(q, prior).sum(-1))
    kl = (log_q - log_q_top + kl_top - log_p).mean(0)
    return rec, log_q, log_p + log_p_top, kl


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("objective", ["analytic", "monte_carlo", "iwae"])
def test_bound_matches_torch_distributions_in_float64(layers, objective):
    model = tiny_model(layers, torch.float64)
    x = binary_batch(dtype=torch.float64)
    out = model(x, num_samples=3, objective=objective, generator=torch.Generator().manual_seed(5))
    rec, log_q, log_p, kl = reference_terms(model, x, out)
    for name, got, want in (("rec", out.rec, rec), ("log_q", out.log_q, log_q), ("log_p", out.log_p, log_p),
                            ("kl", out.kl, kl)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    log_w = rec + log_p - log_q
    want = {"analytic": rec.mean(0) - kl, "monte_carlo": log_w.mean(0),
            "iwae": torch.logsumexp(log_w, 0) - math.log(3)}[objective]
    torch.testing.assert_close(out.elbo, want, rtol=1e-10, atol=1e-10)
    # The gradients too: the model's reparameterized chain against the redrawn one.
    params = list(model.parameters())
    got = torch.autograd.grad(out.loss, params)
    expected = torch.autograd.grad(-want.mean(), params)
    for p, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_analytic_kl_is_an_unbiased_estimate_of_the_monte_carlo_one():
    """Same noise: the analytic-at-the-top KL and mean_l (log q - log p) differ only by the top layer's
    term, whose expectation given z1 is the same; over many samples they agree."""
    model = tiny_model(dtype=torch.float64)
    x = binary_batch(2, torch.float64)
    out = model(x, num_samples=20000, generator=torch.Generator().manual_seed(0))
    monte_carlo = (out.log_q - out.log_p).mean(0)
    torch.testing.assert_close(out.kl, monte_carlo, rtol=0, atol=0.05)


def test_iwae_with_one_sample_equals_the_elbo_for_the_same_noise():
    model = tiny_model()
    x = binary_batch()
    iwae = model(x, num_samples=1, objective="iwae", generator=torch.Generator().manual_seed(3))
    elbo = model(x, num_samples=1, objective="monte_carlo", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iwae.elbo, elbo.elbo)


def test_noise_of_an_example_does_not_depend_on_the_batch_split():
    """The layers above the first run example-major with row_offset * L: a data-parallel shard draws
    exactly its rows of the global batch's chain."""
    model = tiny_model()
    x = binary_batch(6)
    whole = model(x, num_samples=2, objective="iwae", generator=torch.Generator().manual_seed(4))
    part = model(x[2:], num_samples=2, objective="iwae", generator=torch.Generator().manual_seed(4), row_offset=2)
    torch.testing.assert_close(part.elbo, whole.elbo[2:])


@pytest.fixture(scope="module")
def digits():
    return split_validation(data_lib.load_dataset("digits", "train"), 0.1)


def small_config(tmp_path, **overrides):
    values = dict(data="digits", out_dir=str(tmp_path / "run"), latent_dim=6, arch_config={"hidden": [48]},
                  stochastic_layers=2, upper_latent_dims=[3], upper_hidden=[16], epochs=4, batch_size=100,
                  lr=3e-3, seed=0, val_fraction=0.1)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("objective,samples", [("analytic", 1), ("monte_carlo", 1), ("iwae", 3)])
def test_training_lowers_the_loss(tmp_path, digits, objective, samples):
    trainer = Trainer(small_config(tmp_path, objective=objective, num_samples=samples), *digits)
    assert isinstance(trainer.model, HierarchicalVAE) and trainer.model.latent_dims == (6, 3)
    history = trainer.fit()
    assert history[-1]["train_elbo"] > history[0]["train_elbo"] + 2
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]


@pytest.mark.parametrize("objective,samples", [("monte_carlo", 1), ("iwae", 3)])
def test_a_learned_mixture_prior_sits_on_the_top_layer(tmp_path, digits, objective, samples):
    trainer = Trainer(small_config(tmp_path, objective=objective, num_samples=samples, prior="mog",
                                   prior_components=4), *digits)
    model = trainer.model
    assert model.prior.means.shape == (4, 3)  # zN's size, not z1's
    means = model.prior.means.detach().clone()
    history = trainer.fit()
    assert history[-1]["train_elbo"] > history[0]["train_elbo"] + 2
    assert not torch.equal(model.prior.means, means)  # the prior trains with the model
    assert model.sample(5).shape == (5, *SHAPE)
    rebuilt = VAE.from_config(model.config)
    assert isinstance(rebuilt, HierarchicalVAE) and rebuilt.prior.means.shape == (4, 3)


def test_the_vampprior_is_refused_on_a_hierarchy():
    with pytest.raises(ValueError, match="prior 'vamp' is not supported with stochastic_layers >= 2"):
        tiny_model(prior="vamp")


def test_beta_tcvae_is_refused_on_a_hierarchy(tmp_path):
    with pytest.raises(ValueError, match="not supported with stochastic_layers >= 2"):
        small_config(tmp_path, objective="beta_tcvae").validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    trainer = Trainer(small_config(tmp_path_factory.mktemp("hier"), epochs=3), *digits)
    trainer.fit()
    return trainer


def test_eval_log_likelihood_is_above_the_elbo(trained, digits):
    images = data_lib.binarize(digits[1].images[:100], "threshold")
    results = evaluate(trained.model, images, is_samples=200, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(results["log_likelihood"]) and results["log_likelihood"] >= results["elbo"]


def test_eval_draws_the_whole_chain(trained, digits):
    model = trained.model
    x = data_lib.binarize(digits[1].images[:20], "threshold")
    one = importance_sampled_log_likelihood(model, x, num_samples=1, generator=torch.Generator().manual_seed(1))
    bound = model(x, num_samples=1, objective="iwae", generator=torch.Generator().manual_seed(1)).elbo
    torch.testing.assert_close(one.float(), bound, rtol=1e-6, atol=1e-4)
    before = importance_sampled_log_likelihood(model, x, num_samples=8, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():  # p(z1|z2) only enters through the chain
            model.upper_decoders[0].net[-1].bias.add_(0.5)
        after = importance_sampled_log_likelihood(model, x, num_samples=8, generator=torch.Generator().manual_seed(1))
    finally:
        model.load_state_dict(state)
    assert not torch.allclose(before, after)


def test_samples_come_down_the_chain():
    model = tiny_model(3)
    assert model.sample(7).shape == (7, *SHAPE)
    drawn = model.sample(5, mean=False, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (5, *SHAPE) and set(drawn.unique().tolist()) <= {0.0, 1.0}
    # p(z1|z2) pinned to one point (mean c, variance e^-30): every sample decodes that z1.
    last = model.upper_decoders[0].net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.cat([torch.linspace(-1, 1, 5), torch.full((5,), -30.0)]))
    samples = model.sample(4, generator=torch.Generator().manual_seed(0))
    expected = model.mean_image(model.decode(torch.linspace(-1, 1, 5).expand(4, 5)))
    torch.testing.assert_close(samples, expected, rtol=1e-4, atol=1e-4)


def test_conditional_hierarchy_samples_per_class():
    model = tiny_model(condition_dim=3)
    x = binary_batch()
    condition = data_lib.one_hot(torch.tensor([0, 1, 2, 1]), 3)
    assert torch.isfinite(model(x, condition, num_samples=2).loss)
    assert model.sample_per_class(2).shape == (6, *SHAPE)


def test_export_round_trip(tmp_path):
    model = tiny_model(3).eval()
    save_pretrained(model, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, HierarchicalVAE) and loaded.config == model.config
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_config"]["stochastic_layers"] == 3
    x = binary_batch()
    a = model(x, num_samples=2, generator=torch.Generator().manual_seed(0))
    b = loaded(x, num_samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.elbo, b.elbo, rtol=0, atol=0)


def test_checkpoint_records_the_layers_and_old_configs_load_as_one_layer(trained):
    model, state = load_model(trained.checkpoint_path)
    assert isinstance(model, HierarchicalVAE) and state["model_config"]["stochastic_layers"] == 2
    assert state["train_config"]["stochastic_layers"] == 2
    one_layer = {k: v for k, v in state["model_config"].items()
                 if k not in ("stochastic_layers", "upper_latent_dims", "layer_architecture", "layer_config")}
    assert type(VAE.from_config(one_layer)) is VAE


def test_reconstruct_interpolate_traverse_work_in_z1(trained, digits):
    model = trained.model
    x = digits[1].images[:3]
    assert model.reconstruct(x).shape == x.shape
    assert model.interpolate(x[0], x[1], steps=4).shape == (4, *x.shape[1:])
    assert model.traverse(x[0], [0, 5], steps=3).shape == (2, 3, *x.shape[1:])
    written = trained.write_pictures(digits[1])
    assert {"samples", "reconstructions", "interpolations", "traversal"} <= set(written)
    for path in written.values():
        Image.open(path).verify()


# ----------------------------------------------------------------------------- the custom-architecture contract
def test_a_custom_architecture_provides_the_upper_layers(scratch_registries):
    @registry.register_encoder("affine_gaussian")
    class AffineGaussian(registry.Encoder):
        """One affine map to (mu, logvar): a Gaussian layer between flat vectors."""

        def __init__(self, input_shape, latent_dim, condition_dim=0, scale=1.0):
            super().__init__(input_shape, latent_dim, condition_dim)
            self.map = nn.Linear(input_shape[0] + condition_dim, 2 * latent_dim)
            self.scale = scale

        def forward(self, x, condition=None):
            self.check_input(x, condition)
            h = x if condition is None else torch.cat([x, condition], 1)
            return (self.scale * self.map(h)).chunk(2, dim=1)

    torch.manual_seed(0)
    model = HierarchicalVAE(SHAPE, 5, encoder_config={"hidden": [8]}, decoder_config={"hidden": [8]},
                            upper_latent_dims=[3], layer_architecture="affine_gaussian", layer_config={"scale": 0.5})
    assert all(isinstance(m, AffineGaussian) for m in (*model.upper_encoders, *model.upper_decoders))
    assert [m.map.in_features for m in model.upper_encoders] == [5]
    assert [m.map.in_features for m in model.upper_decoders] == [3]
    out = model(binary_batch(), num_samples=2)
    out.loss.backward()
    assert model.upper_decoders[0].map.weight.grad.abs().sum() > 0
    rebuilt = VAE.from_config(model.config)
    assert isinstance(rebuilt.upper_encoders[0], AffineGaussian) and rebuilt.upper_encoders[0].scale == 0.5


def test_ready_modules_instead_of_a_registered_architecture():
    layers = dict(upper_encoders=[registry.build_encoder("mlp", input_shape=(5,), latent_dim=3)],
                  upper_decoders=[registry.build_encoder("mlp", input_shape=(3,), latent_dim=5)])
    model = HierarchicalVAE(SHAPE, 5, encoder_config={"hidden": [8]}, decoder_config={"hidden": [8]},
                            upper_latent_dims=[3], **layers)
    assert torch.isfinite(model(binary_batch()).loss)
    with pytest.raises(ValueError, match="custom modules"):
        save_pretrained(model, "unused")


@pytest.mark.parametrize("kwargs,message", [
    ({"stochastic_layers": 0}, r"stochastic_layers must be an int in 1\.\.8, got 0"),
    ({"stochastic_layers": 1, "upper_latent_dims": []}, "HierarchicalVAE needs stochastic_layers >= 2"),
    ({"stochastic_layers": 3}, r"upper_latent_dims needs one latent size .* \(2 for stochastic_layers=3\), got \[50\]"),
    ({"upper_latent_dims": [0]}, r"upper_latent_dims must contain ints >= 1 only, got \[0\]"),
    ({"layer_architecture": "conv"}, r"layer_architecture 'conv' cannot build q\(z2\|z1\) \(8 -> 50\)"),
    ({"layer_config": {"hidden": [-1]}}, "hidden must contain positive ints only"),
    ({"upper_encoders": [nn.Identity()]}, "pass both upper_encoders and upper_decoders"),
])
def test_bad_arguments_name_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalVAE(SHAPE, 8, **kwargs)


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-hier") / "run"
    result = run_cli("train", "--stochastic-layers", "2", "--epochs", "2", "--out", str(out), "--hidden", "32",
                     "--latent-dim", "6", "--upper-hidden", "16", "--upper-latent-dims", "3", "--objective", "iwae",
                     "--samples", "2")
    assert result.returncode == 0, result.stderr
    return out


def test_cli_trains_evaluates_samples_and_exports_two_layers(cli_run, tmp_path):
    model, state = load_model(cli_run)
    assert isinstance(model, HierarchicalVAE) and model.latent_dims == (6, 3)
    assert [m.net[0].out_features for m in model.upper_encoders] == [16]
    result = run_cli("eval", str(cli_run), "--is-samples", "20", "--limit", "50")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["log_likelihood"] >= report["elbo"] - 0.5
    assert run_cli("sample", str(cli_run), "--num", "8", "--out", str(tmp_path / "s.png")).returncode == 0
    Image.open(tmp_path / "s.png").verify()
    assert run_cli("export", str(cli_run), "--out", str(tmp_path / "exported")).returncode == 0
    assert isinstance(load_pretrained(tmp_path / "exported")[0], HierarchicalVAE)


def test_cli_analytic_objective_says_what_it_computes(tmp_path):
    result = run_cli("train", "--stochastic-layers", "2", "--epochs", "1", "--out", str(tmp_path / "r"),
                     "--hidden", "16", "--latent-dim", "4", "--upper-hidden", "8", "--upper-latent-dims", "2")
    assert result.returncode == 0, result.stderr
    assert "analytic for the top layer only, Monte Carlo below it" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--stochastic-layers", "0"], "--stochastic-layers must be in [1, 8], got 0"),
    (["--stochastic-layers", "3"], "upper_latent_dims needs one latent size per stochastic layer above the first "
                                   "(2 for stochastic_layers=3), got [50]"),
    (["--stochastic-layers", "2", "--upper-latent-dims", "a"], "expected comma-separated integers"),
])
def test_cli_bad_layer_options_fail_in_one_line(tmp_path, args, message):
    result = run_cli("train", "--out", str(tmp_path / "r"), *args)
    assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1]
    if result.returncode == 1:  # the library's error, not argparse's usage: one line
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----------------------------------------------------------------------------- docs/hierarchy.md
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_python_blocks_run(index, tmp_path, monkeypatch, scratch_registries):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/hierarchy.md python block {index}", "exec"), {"__name__": "doc"})


def test_doc_has_a_python_example():
    assert BLOCKS


def test_torch_compile_fullgraph_matches_eager():
    model = tiny_model()
    x = binary_batch()
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(2)
    got = compiled(x, num_samples=2, objective="iwae")
    got.loss.backward()
    torch.manual_seed(2)
    want = model(x, num_samples=2, objective="iwae")
    torch.testing.assert_close(got.elbo, want.elbo)


def test_one_layer_configs_are_unchanged_and_ignore_the_upper_sizes(tmp_path):
    TrainConfig(stochastic_layers=1, upper_latent_dims=[9, 9]).validate()
    trainer = Trainer(small_config(tmp_path, stochastic_layers=1, epochs=1), *split_validation(
        data_lib.load_dataset("digits", "train"), 0.1))
    assert type(trainer.model) is VAE and "stochastic_layers" not in trainer.model.config
