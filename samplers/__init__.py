"""Samplers: predictor-corrector, probability-flow ODE, fast solvers and controllable generation.

Every sampler is reached through :func:`samplers.sample` by its registered name; see
``samplers.base`` for the calling convention.
"""

from samplers.base import (
    SAMPLERS,
    CountingScore,
    NoiseSource,
    Sampler,
    option_defaults,
    register_sampler,
    resolved_options,
    sample,
)

__all__ = ["SAMPLERS", "CountingScore", "NoiseSource", "Sampler", "option_defaults",
           "register_sampler", "resolved_options", "sample"]

# Fast samplers (issue 5, part 2): importing them registers them.
from samplers.adaptive import AdaptiveSDE  # noqa: E402
from samplers.ddim import DDIM  # noqa: E402
from samplers.ddpm import DDPMAncestral  # noqa: E402
from samplers.dpm_solver import DPMSolver  # noqa: E402
from samplers.edm import EDMHeun  # noqa: E402
from samplers.grids import TIME_GRIDS, get_time_grid  # noqa: E402
from samplers.sde_dpm_solver import SDEDPMSolverPP  # noqa: E402

__all__ += ["AdaptiveSDE", "DDIM", "DDPMAncestral", "DPMSolver", "EDMHeun", "SDEDPMSolverPP",
            "TIME_GRIDS",
            "get_time_grid"]

from samplers.unipc import UniPC  # noqa: E402

__all__ += ["UniPC"]

from samplers.tuning import tune_time_grid  # noqa: E402

__all__ += ["tune_time_grid"]

# Predictor-corrector, probability-flow ODE, controllable generation, the reference's entry points
# (issue 5, part 1): importing them registers 'pc' and 'ode'.
from samplers.controllable import (  # noqa: E402
    ClassifierFreeGuidance,
    ClassifierGuidance,
    colorize,
    inpaint,
)
from samplers.ode import decode, encode, ode_flow  # noqa: E402
from samplers.pc import CORRECTORS, PREDICTORS, Corrector, Predictor, pc_time_grid  # noqa: E402
from samplers.reference import (  # noqa: E402
    get_ode_sampler,
    get_pc_colorizer,
    get_pc_inpainter,
    get_pc_sampler,
    get_sampling_fn,
)

__all__ += [
    "CORRECTORS",
    "PREDICTORS",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "Corrector",
    "Predictor",
    "colorize",
    "decode",
    "encode",
    "get_ode_sampler",
    "get_pc_colorizer",
    "get_pc_inpainter",
    "get_pc_sampler",
    "get_sampling_fn",
    "inpaint",
    "ode_flow",
    "pc_time_grid",
]

# Super-resolution and cascades (issue 23): model-agnostic stages around samplers.sample.
from samplers.cascade import Cascade, ScoreFactory, Stage, super_resolve  # noqa: E402

__all__ += ["Cascade", "ScoreFactory", "Stage", "super_resolve"]
