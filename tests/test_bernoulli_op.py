"""The fused Bernoulli log-likelihood from logits (fastvae.bernoulli_log_likelihood).

Every check the likelihood ops share runs from likelihood_op_tester; here is the Bernoulli's
own: its torch.distributions comparison (on binary data) and exactness at extreme logits.
"""

import pytest
import torch
from torch.distributions import Bernoulli

import fastvae
from devices import DEVICES
from likelihood_op_tester import LikelihoodOpTester, normal, uniform


class TestBernoulliOp(LikelihoodOpTester):
    name, param, range_name = "bernoulli", "logits", "Bernoulli"

    def draw(self, gen, params_shape, x_shape):
        return 3 * normal(gen, params_shape), uniform(gen, x_shape), None  # x: intensities in [0, 1]

    def distributions_log_prob(self, inputs):
        binary = inputs._replace(x=inputs.x.round())
        return binary, Bernoulli(logits=inputs.params).log_prob(binary.x.expand_as(inputs.params)).sum(-1)

    @pytest.mark.parametrize("device", DEVICES)
    def test_extreme_logits_stay_finite_and_exact(self, device):
        logits = torch.tensor([[200.0, -200.0, 30.0, -30.0]], device=device)
        x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], device=device)
        got = fastvae.bernoulli_log_likelihood(logits, x)
        want = Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)
