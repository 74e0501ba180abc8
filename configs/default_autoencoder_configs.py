"""The ``config.data.autoencoder`` section (pure data): which autoencoder, if any, maps the
images to the latent space the score model works in (latent score SDEs, docs/latent.md).

``name = 'none'`` (the default of every config) is a pixel model; ``'kl'`` the toolkit's own
KL autoencoder trained by ``--mode train_autoencoder``; ``'sd_vae'`` a Stable-Diffusion VAE
from local files (diffusers).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_autoencoder_config(name='none', **overrides):
    """The ``data.autoencoder`` section with every key (so that ``--config.data.autoencoder.*``
    overrides work on any config); ``overrides`` replace defaults."""
    ae = ml_collections.ConfigDict()
    ae.name = name  # 'none' (pixel model) | 'kl' (own, trained here) | 'sd_vae' (diffusers files)
    # kl: the --workdir of `--mode train_autoencoder` (its newest checkpoint) or one checkpoint file
    ae.checkpoint = ''
    ae.path = ''  # sd_vae: a local diffusers folder (e.g. sd-vae-ft-ema) or one weight file
    ae.config = ''  # sd_vae: the config.json of a single weight file ('' for a folder)
    # z_model = (z - shift) * scale_factor; None: the autoencoder's own (SD VAE: its config's
    # scaling_factor 0.18215; kl: 1 / std of the training latents, stored by its training run)
    ae.scale_factor = placeholder(float)
    ae.shift = placeholder(float)
    # kl architecture (in_channels = data.num_channels): latent channels c, first-level width,
    # width multiplier per level (each level after the first halves H and W), blocks per level
    ae.latent_channels = 4
    ae.channels = 32
    ae.channel_mult = (1, 2)
    ae.num_res_blocks = 1
    # kl training (--mode train_autoencoder): reconstruction 'l1' | 'l2', KL weight beta, Adam lr
    ae.reconstruction = 'l2'
    ae.beta = 1e-3
    ae.lr = 1e-3
    # --mode likelihood of a latent model: the LSGM data bits/dim bound (training/latent_bound.py)
    # decoder likelihood: 'auto' (learned if the autoencoder has one, else fitted), 'learned', 'fitted'
    ae.decoder_variance = 'auto'
    ae.decoder_fit_split = 'train'  # 'fitted': held-out images its per-channel variance is fit on
    ae.decoder_fit_images = 1000  # 'fitted': how many of them (0: the whole split)
    ae.bound_draws = 4  # K draws z ~ q(z | x) per image (Monte-Carlo expectations of the bound)
    ae.update(overrides)
    return ae
