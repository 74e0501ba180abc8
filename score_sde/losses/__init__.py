"""Training objectives (:mod:`.objectives`) and optimisation (:mod:`.optimization`): the
reference's ``losses`` names (``get_sde_loss_fn``, ``get_step_fn``, ``get_optimizer``,
``optimization_manager`` ...) all importable from here, as ``from score_sde import losses``.

Semantics and draw order are those of the reference implementation
(yang-song/score_sde_pytorch ``losses.py``); gradient accumulation and mixed precision are
described in :mod:`.optimization`.
"""

from score_sde.losses.objectives import (
    DISCRETE_LOSSES,
    OBJECTIVES,
    LossFn,
    ddpm_loss,
    dsm_loss,
    get_ddpm_loss_fn,
    get_hybrid_loss_fn,
    get_sde_loss_fn,
    get_smld_loss_fn,
    get_ssm_loss_fn,
    learns_sigma,
    likelihood_normalizer,
    sample_importance_time,
    sample_time,
    smld_loss,
    ssm_loss,
)
from score_sde.losses.optimization import (
    OPTIMIZERS,
    OptimizeFn,
    accumulate_gradients,
    get_optimizer,
    get_step_fn,
    load_optimizer_state,
    micro_batches,
    optimization_manager,
)

__all__ = [
    "DISCRETE_LOSSES",
    "OPTIMIZERS",
    "OBJECTIVES",
    "LossFn",
    "OptimizeFn",
    "dsm_loss",
    "ssm_loss",
    "smld_loss",
    "ddpm_loss",
    "sample_time",
    "sample_importance_time",
    "likelihood_normalizer",
    "get_sde_loss_fn",
    "get_ssm_loss_fn",
    "get_smld_loss_fn",
    "get_ddpm_loss_fn",
    "get_hybrid_loss_fn",
    "learns_sigma",
    "get_optimizer",
    "load_optimizer_state",
    "optimization_manager",
    "micro_batches",
    "accumulate_gradients",
    "get_step_fn",
]
