"""A 32 -> 64 -> 128 cascade on an image folder (``folder_cascade``; Ho, Saharia et al. 2022):
documented sizes, not trained here.

Shared settings: DDPM++ (VP SDE, continuous) of ``vp_cifar`` on ``data.root`` (an image folder,
``data.dataset = 'folder'``: resized so the shorter side is ``data.image_size``, centre-cropped),
sampled with DPM-Solver++(2M) in 30 NFE per stage. The stages (``cascade.stages``), each in
``<workdir>/<name>/``:

=======  ======  ==========  =====================  ======  ====  ====================
stage    size    low res     ch_mult (nf 128)       blocks  batch  augmentation s_max
=======  ======  ==========  =====================  ======  ====  ====================
base32   32x32   --          (1, 2, 2, 2)           4       128    --
sr64     64x64   32 (area)   (1, 2, 2, 2)           3       64     0.5 (VP), sample 0.2
sr128    128x128 64 (area)   (1, 1, 2, 2, 3)        2       32     0.5 (VP), sample 0.2
=======  ======  ==========  =====================  ======  ====  ====================

Attention at 16x16 in every stage; conditioning dropout 0.1 in the super-resolution stages.
Parameters: base32 61.8 M (vp_cifar), sr64 50.9 M, sr128 57.8 M.
"""

import ml_collections

from configs.default_cascade_configs import add_cascade_keys
from configs.sampling import get_sampling_config
from configs.vp.cifar10_ddpmpp_continuous import get_config as get_vp_cifar_config


def get_config():
    """Config of ``python main.py --config folder_cascade --config.data.root=...``."""
    config = get_vp_cifar_config()
    config.data.dataset = 'folder'
    config.data.root = 'data/images'  # a folder of PNG/JPEG files (or one sub-folder per class)
    config.data.image_size = 32
    config.sampling = get_sampling_config(method='dpm_solver++_2m', nfe=30)
    add_cascade_keys(config)

    config.cascade = cascade = ml_collections.ConfigDict()
    cascade.stages = ('base32', 'sr64', 'sr128')  # sampling order; <workdir>/<name>/ each
    cascade.base32 = ml_collections.ConfigDict()
    cascade.sr64 = sr64 = ml_collections.ConfigDict()
    sr64.data = ml_collections.ConfigDict({'image_size': 64, 'low_res_size': 32})
    sr64.model = ml_collections.ConfigDict({'num_res_blocks': 3, 'cond_channels': 3,
                                            'cond_dropout_prob': 0.1})
    sr64.training = ml_collections.ConfigDict({'batch_size': 64, 'cond_aug_max': 0.5})
    sr64.sampling = ml_collections.ConfigDict({'cond_level': 0.2})
    cascade.sr128 = sr128 = ml_collections.ConfigDict()
    sr128.data = ml_collections.ConfigDict({'image_size': 128, 'low_res_size': 64})
    sr128.model = ml_collections.ConfigDict({'ch_mult': (1, 1, 2, 2, 3), 'num_res_blocks': 2,
                                             'cond_channels': 3, 'cond_dropout_prob': 0.1})
    sr128.training = ml_collections.ConfigDict({'batch_size': 32, 'cond_aug_max': 0.5})
    sr128.sampling = ml_collections.ConfigDict({'cond_level': 0.2})
    return config
