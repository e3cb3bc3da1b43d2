"""The VAE model: shapes, the three objectives, and the estimators' statistical relations."""

import math

import pytest
import torch

from fastvae.training.evaluate import importance_sampled_log_likelihood
from fastvae.models.vae import VAE, bound


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VAE((1, 8, 8), latent_dim=4, encoder="mlp", encoder_config={"hidden": [32]},
               decoder_config={"hidden": [32]}).double()


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((6, 1, 8, 8), 0.3, dtype=torch.float64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("objective", ["analytic", "monte_carlo", "iwae"])
def test_forward_shapes_and_finite_loss(model, x, objective):
    out = model(x, num_samples=3, objective=objective)
    assert out.z.shape == (3, 6, 4) and out.decoded.shape == (3, 6, 1, 8, 8)
    assert out.rec.shape == (3, 6) and out.kl.shape == (6,) and out.elbo.shape == (6,)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sgvb_a_and_b_agree_in_expectation(model, x):
    torch.manual_seed(3)
    with torch.no_grad():
        analytic = model(x, num_samples=4000, objective="analytic").elbo
        monte_carlo = model(x, num_samples=4000, objective="monte_carlo").elbo
    # Same expectation: E_q[log p(z) - log q(z|x)] = -KL. The standard error of the
    # Monte Carlo KL term over 4000 draws is well under 0.1 nats here.
    torch.testing.assert_close(monte_carlo, analytic, atol=0.15, rtol=0)


def test_iwae_bound_is_above_elbo_and_rises_with_k(model, x):
    torch.manual_seed(4)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        elbo = model(x, num_samples=2000, objective="analytic").elbo.mean().item()

        def iwae(k, repeats=400):
            out = model(x.repeat(repeats, 1, 1, 1), num_samples=k, objective="iwae")
            return out.elbo.mean().item()

        bounds = [iwae(k) for k in (1, 5, 50)]
    assert bounds[0] == pytest.approx(elbo, abs=0.1)  # k=1 IWAE is the ELBO
    assert bounds[0] < bounds[1] < bounds[2]


def test_importance_sampled_log_likelihood_is_above_elbo(model, x):
    torch.manual_seed(5)
    with torch.no_grad():
        elbo = model(x, num_samples=1000).elbo
        log_px = importance_sampled_log_likelihood(model, x, num_samples=2000, max_elements=64 * 6 * 64)
    assert log_px.shape == (6,)
    assert (log_px >= elbo - 0.05).all()


def test_importance_sampling_chunks_do_not_change_the_estimate(model, x):
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    whole = importance_sampled_log_likelihood(model, x, num_samples=300, generator=gen())
    chunked = importance_sampled_log_likelihood(model, x, num_samples=300, max_elements=7 * 6 * 64, generator=gen())
    # Different chunking draws different noise; both estimate the same value closely.
    torch.testing.assert_close(whole, chunked, atol=0.5, rtol=0)


def test_bound_formulas():
    rec = torch.tensor([[-10.0], [-12.0]])
    kl = torch.tensor([3.0])
    log_q, log_p = torch.tensor([[-1.0], [-2.0]]), torch.tensor([[-3.0], [-3.5]])
    assert bound("analytic", rec, kl, log_q, log_p).item() == pytest.approx(-11 - 3)
    assert bound("monte_carlo", rec, kl, log_q, log_p).item() == pytest.approx(((-12) + (-13.5)) / 2)
    want = math.log((math.exp(-12) + math.exp(-13.5)) / 2)
    assert bound("iwae", rec, kl, log_q, log_p).item() == pytest.approx(want)
    assert bound("analytic", rec, kl, log_q, log_p, beta=0.5).item() == pytest.approx(-11 - 1.5)


def test_sample_reconstruct_interpolate(model, x):
    assert model.sample(5).shape == (5, 1, 8, 8)
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and ((rec >= 0) & (rec <= 1)).all()
    path = model.interpolate(x[0], x[1], steps=7)
    assert path.shape == (7, 1, 8, 8)


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned"])
def test_gaussian_likelihoods(likelihood):
    model = VAE((1, 8, 8), 3, "mlp", likelihood=likelihood, encoder_config={"hidden": [16]},
                decoder_config={"hidden": [16]})
    out = model(torch.rand(4, 1, 8, 8), num_samples=2)
    assert out.rec.shape == (2, 4) and torch.isfinite(out.loss)
    out.loss.backward()


def test_conditional_model_requires_its_condition():
    model = VAE((1, 8, 8), 3, "mlp", condition_dim=10, encoder_config={"hidden": [16]},
                decoder_config={"hidden": [16]})
    x = torch.rand(4, 1, 8, 8).round()
    condition = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    assert torch.isfinite(model(x, condition).loss)
    assert model.sample(4, condition).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="conditional"):
        model(x)
    with pytest.raises(ValueError, match="conditional"):
        model.sample(4)
    assert model.sample_per_class(3).shape == (30, 1, 8, 8)


def test_sample_per_class_needs_a_conditional_model(model):
    with pytest.raises(ValueError, match="needs a conditional model"):
        model.sample_per_class(2)


def test_bad_arguments(model, x):
    known = "analytic, beta_tcvae, iwae, monte_carlo"
    with pytest.raises(LookupError, match=f"unknown objective 'elbo'. Known objectives: {known}"):
        model(x, objective="elbo")
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.zeros(2, 64))
    with pytest.raises(LookupError, match="unknown likelihood 'poisson'. Known likelihoods: bernoulli, continuous_bernoulli"):
        VAE((1, 8, 8), 3, likelihood="poisson")
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        VAE((1, 8, 8), 0)


def test_rebuild_from_config(model):
    rebuilt = VAE.from_config(model.config).double()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(rebuilt.reconstruct(x), model.reconstruct(x))


ARCHITECTURE_SHAPES = [
    ("mlp", (1, 8, 8)), ("mlp", (784,)), ("conv", (1, 8, 8)), ("conv", (1, 28, 28)), ("conv", (3, 32, 32)),
    ("conv", (3, 64, 64)), ("resnet", (1, 28, 28)), ("resnet", (3, 32, 32)), ("resnet", (3, 64, 64)),
]
SMALL_CONFIG = {"mlp": {"hidden": [16]}, "conv": {"channels": [4, 8]}, "resnet": {"channels": [4, 8]}}


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
@pytest.mark.parametrize("name,shape", ARCHITECTURE_SHAPES, ids=lambda v: str(v))
def test_every_builtin_architecture_trains_through_the_fused_ops(name, shape, likelihood):
    torch.manual_seed(0)
    model = VAE(shape, 3, name, likelihood=likelihood, condition_dim=2, encoder_config=SMALL_CONFIG[name],
                decoder_config=SMALL_CONFIG[name])
    x = torch.rand(2, *shape).round()
    condition = torch.eye(2)
    out = model(x, condition, num_samples=2, objective="iwae")
    assert out.decoded.shape == (2, 2, *shape) and out.rec.shape == (2, 2)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
