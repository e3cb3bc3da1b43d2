"""The fused Gaussian log-likelihood (fastvae.gaussian_log_likelihood), a fixed or learned log-variance.

Every check the likelihood ops share runs from likelihood_op_tester, on each form of logvar
(one float, a tensor like the mean, one value per pixel); here is the case and its
torch.distributions.Normal comparison.
"""

from torch.distributions import Normal

from likelihood_op_tester import LikelihoodOpTester, normal, uniform


class TestGaussianOp(LikelihoodOpTester):
    name, param, second = "gaussian", "mean", "logvar"

    def draw(self, gen, params_shape, x_shape):
        return 3 * normal(gen, params_shape), uniform(gen, x_shape), 0.5 * normal(gen, params_shape)

    def distributions_log_prob(self, inputs):
        std = self.second_expanded(inputs).mul(0.5).exp()
        return inputs, Normal(inputs.params, std).log_prob(inputs.x.expand_as(inputs.params)).sum(-1)
