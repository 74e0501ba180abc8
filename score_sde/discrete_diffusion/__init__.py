"""Discrete Gaussian diffusion on a DDPM table: respacing, the forward posterior, the reverse step
of a learned-variance network, the variational bound in bits/dim and the hybrid objective
(Ho et al. 2020; Nichol & Dhariwal 2021). Pure math on tensors: it imports only ``sde_lib`` and
``score_sde.utils``, so samplers, likelihood and losses share it.
"""

from score_sde.discrete_diffusion.network import (
    VARIANCES,
    check_variance,
    network_eps_and_v,
    reverse_v,
)
from score_sde.discrete_diffusion.process import (
    TABLES,
    RespacedProcess,
    check_ddpm_sde,
    space_timesteps,
    spacing_steps,
)
from score_sde.discrete_diffusion.schedule import VLBImportanceSampler
from score_sde.discrete_diffusion.vlb import (
    CDFS,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    hybrid_loss_terms,
    normal_kl,
    prior_bpd,
    vb_terms_bpd,
)

__all__ = [
    "CDFS",
    "TABLES",
    "VARIANCES",
    "RespacedProcess",
    "VLBImportanceSampler",
    "approx_standard_normal_cdf",
    "check_ddpm_sde",
    "check_variance",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "hybrid_loss_terms",
    "network_eps_and_v",
    "normal_kl",
    "prior_bpd",
    "reverse_v",
    "space_timesteps",
    "spacing_steps",
    "vb_terms_bpd",
]
