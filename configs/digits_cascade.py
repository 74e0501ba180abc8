"""A two-stage cascade on scikit-learn's digits (``digits_cascade``): a 4x4 base model, then an
8x8 super-resolution model conditioned on the 4x4 image (Ho, Saharia et al. 2022).

A cascade config is the shared settings (here those of ``digits``: DDPM++, VP SDE, continuous,
DPM-Solver++(2M)) plus a ``cascade`` section: ``cascade.stages`` names the stages in sampling
order and ``cascade.<name>`` holds each stage's overrides of the shared settings. Stage ``name``
trains into ``<workdir>/<name>/`` (a normal training workdir: checkpoints, samples, resume);
``--mode train`` trains every stage in turn, ``--mode sample`` samples the base, then each
super-resolution stage from the previous stage's output, and writes every stage's grid.

The super-resolution stage downsamples each 8x8 batch by 2x2 area averages to 4x4 (exactly what
the base stage models), noises it with the VP SDE's marginals at a level s ~ U[0, 0.25]
(``training.cond_aug_*``), and drops the conditioning for classifier-free guidance with
probability 0.1. At sampling it conditions on the base's output noised at level 0.1
(``sampling.cond_level``). Both stages train on one thread each in minutes: base 1 min, SR 14.5
min measured on a 2-core machine shared with other jobs (load about 8).
"""

import ml_collections

from configs.default_cascade_configs import add_cascade_keys
from configs.digits import get_config as get_digits_config


def get_config():
    """Config of ``python main.py --config digits_cascade``."""
    config = get_digits_config()
    add_cascade_keys(config)  # data.low_res_size, model.cond_*, training.cond_aug_*, ...

    config.cascade = cascade = ml_collections.ConfigDict()
    cascade.stages = ('base', 'sr')  # sampling order; each trains into <workdir>/<name>/
    cascade.base = base = ml_collections.ConfigDict()
    base.data = ml_collections.ConfigDict({'image_size': 4})
    base.model = ml_collections.ConfigDict({'ch_mult': (1,)})
    base.training = ml_collections.ConfigDict({'n_iters': 1000, 'snapshot_freq': 500,
                                               'eval_freq': 250})
    cascade.sr = sr = ml_collections.ConfigDict()
    sr.data = ml_collections.ConfigDict({'low_res_size': 4})
    sr.model = ml_collections.ConfigDict({'cond_channels': 1, 'cond_dropout_prob': 0.1})
    sr.training = ml_collections.ConfigDict({'n_iters': 2000, 'cond_aug_max': 0.25})
    sr.sampling = ml_collections.ConfigDict({'cond_level': 0.1})
    return config
