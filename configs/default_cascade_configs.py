"""The keys of cascaded generation (pure data): the low-resolution conditioning, the image
conditioning of the network, noise conditioning augmentation and its level at sampling.

``add_cascade_keys(config)`` adds them, switched off (an unconditional stage), to a config that a
cascade's ``cascade.<stage>`` sections then override. Configs without them read the same
defaults.
"""

from ml_collections.config_dict import placeholder


def add_cascade_keys(config):
    """Add the cascade keys to ``config`` with their "off" values; returns it."""
    # ours, cascades: the low-resolution conditioning's size (0 = none, a base or plain model)
    # and its downsampling operator, 'area' (block mean) or 'bicubic'
    config.data.low_res_size = 0
    config.data.downsample = 'area'
    # ours: channels of the conditioning image (0 = not image-conditional); its upsampling to
    # the network's size, 'bicubic' or 'nearest'; conditioning dropout (classifier-free guidance)
    config.model.cond_channels = 0
    config.model.cond_upsample = 'bicubic'
    config.model.cond_dropout_prob = 0.
    # ours: noise conditioning augmentation y_s = m(s) y + sigma(s) eps with the marginals of
    # cond_aug_sde; s ~ cond_aug_dist: 'uniform' on [0, cond_aug_max], or 'fixed' = cond_aug_max
    config.training.cond_aug_sde = 'vpsde'
    config.training.cond_aug_max = 0.
    config.training.cond_aug_dist = 'uniform'
    # ours: the conditioning's augmentation level at sampling (a time of cond_aug_sde) and
    # truncated conditioning augmentation (stop the previous stage there instead of noising)
    config.sampling.cond_level = 0.
    config.sampling.cond_truncate = False
    # ours: classifier-free guidance on the image, DiT's scale s (None or 1: none; needs
    # model.cond_dropout_prob > 0 in training)
    config.sampling.cond_cfg_scale = placeholder(float)
    return config
