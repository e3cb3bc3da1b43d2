"""`toy_renyi_half`: the Renyi bound with alpha = 1/2 (Li & Turner 2016), declared by a plugin.

    L_alpha = 1 / (1 - alpha) * (logsumexp_l ((1 - alpha) * log w_l) - log L),  log w = rec + log p - log q

It lies between the IWAE bound (alpha = 0) and the Monte Carlo ELBO (alpha -> 1).
"""

import math

import torch

from fastvae.objectives import Objective

ALPHA = 0.5


def renyi_bound(rec, kl, log_q, log_p, beta):
    log_w = rec + beta * (log_p - log_q)
    return (torch.logsumexp((1 - ALPHA) * log_w, dim=0) - math.log(log_w.shape[0])) / (1 - ALPHA)


TOY_RENYI_HALF = Objective("toy_renyi_half", "Renyi bound with alpha = 1/2 (toy plugin)", renyi_bound)
