"""The ``sampling`` section every config carries (pure data, no imports of ours).

The reference's keys (``method``, ``predictor``, ``corrector``, ``snr``, ``n_steps_each``,
``probability_flow``, ``noise_removal``) with the reference's values, plus one key per option of
the fast samplers. Those are typed placeholders whose ``None`` means "the sampler's own default"
(``samplers.sample`` documents them), so that ``--config.sampling.<key>=value`` can set any of them
on any config and a swap of ``--config.sampling.method`` needs no other change. Last, the keys of
class-conditional sampling and classifier-free guidance (``CLASS_KEYS``), read only when
``model.num_classes > 0``.
"""

import ml_collections
from ml_collections.config_dict import placeholder

#: the reference's sampling keys (yang-song/score_sde_pytorch configs/default_*_configs.py)
REFERENCE_KEYS = ('method', 'predictor', 'corrector', 'snr', 'n_steps_each', 'probability_flow',
                  'noise_removal')

#: the fast samplers' options: key -> type (None = the sampler's default)
FAST_SAMPLER_OPTIONS = {
    'nfe': int,                  # score-evaluation budget of the fast samplers
    'adaptive_nfe': int,         # adaptive: an optional cap (None: no budget, error-controlled)
    'grid': str,                 # time grid name: uniform, karras, logsnr, quadratic
    'eps': float,                # last time (default: 1e-5 for VE, 1e-3 otherwise)
    'N': int,                    # PC steps (default: the SDE's N, model.num_scales)
    'lower_order_final': bool,   # DPM-Solver / UniPC: lower order on the last steps
    'eta': float,                # DDIM stochasticity
    'final_time_zero': bool,     # DDIM: an explicit grid may end at t = 0 (x0_hat last)
    'churn': float,              # EDM Heun: S_churn
    's_noise': float,
    's_tmin': float,
    's_tmax': float,
    'solver': str,               # ode: torchdiffeq method or euler / midpoint / rk4
    'steps': int,                # ode: fixed-step count
    'rtol': float,               # ode / adaptive tolerances
    'atol': float,
    'h_init': float,             # adaptive (Jolicoeur-Martineau et al. 2021)
    'theta': float,
    'r': float,
    'check_every': int,
    'memory_depth': int,
    'h_min': float,              # adaptive without a budget: smallest step before an error
    'step_rule': str,            # PC langevin corrector: 'batch' (the reference's) or 'sample'
    'spacing': str,              # ddpm: kept steps 'ddim50', '100', '10,15,20' (default str(nfe))
    'variance': str,             # ddpm: 'learned', 'large' or 'small' (default: learned if v)
    'clip_denoised': bool,       # ddpm: clip x0_hat to [-1, 1]
}


#: the network's precision ('fp32', 'tf32' or 'bf16'; the solver state stays fp32) and
#: torch.compile during sampling (training/sampling.py reads them; docs/precision.md)
ACCELERATION_KEYS = ('precision', 'compile')

#: class-conditional sampling and classifier-free guidance (training/classes.py reads them)
CLASS_KEYS = ('classes', 'cfg_scale', 'cfg_official')


def add_class_options(sampling: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the class and guidance keys ``sampling`` lacks (fresh placeholders per config):

    * ``classes``: None = every class in turn (sample i has class i mod K), or a list of class
      indices cycled the same way (``--classes=3,7``);
    * ``cfg_scale``: DiT's guidance scale s, eps_u + s (eps_c - eps_u) (1.5 for FID, 4.0 for
      pictures); None = no guidance, 1 = the conditional model alone. The
      ``samplers.ClassifierFreeGuidance`` weight is w = s - 1;
    * ``cfg_official``: guide channels 0-2 only, as the official DiT ``forward_with_cfg``.
    """
    if 'classes' not in sampling:
        sampling.classes = placeholder(tuple)
    if 'cfg_scale' not in sampling:
        sampling.cfg_scale = placeholder(float)
    if 'cfg_official' not in sampling:
        sampling.cfg_official = False
    return sampling


def add_fast_sampler_options(sampling: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add every fast-sampler option ``sampling`` lacks, as a typed ``None`` placeholder, the
    precision and compile keys (``ACCELERATION_KEYS``), and the class and guidance keys
    (:func:`add_class_options`)."""
    for key, kind in FAST_SAMPLER_OPTIONS.items():
        if key not in sampling:
            sampling[key] = placeholder(kind)
    if 'precision' not in sampling:
        sampling.precision = 'fp32'  # the network's; 'bf16' autocasts its forward
    if 'compile' not in sampling:
        sampling.compile = False  # torch.compile the network for sampling and bits/dim
    return add_class_options(sampling)


def get_sampling_config(method='pc', predictor='euler_maruyama', corrector='none', snr=0.16,
                        n_steps_each=1, probability_flow=False, noise_removal=True, **options):
    """A full sampling section: the reference's keys (its CIFAR-10 VP values by default), then
    ``options`` (e.g. ``nfe=30``) and a placeholder for every other fast-sampler option."""
    sampling = ml_collections.ConfigDict()
    sampling.method = method
    sampling.predictor = predictor
    sampling.corrector = corrector
    sampling.snr = snr
    sampling.n_steps_each = n_steps_each
    sampling.probability_flow = probability_flow
    sampling.noise_removal = noise_removal
    for key, value in options.items():
        sampling[key] = value
    return add_fast_sampler_options(sampling)
