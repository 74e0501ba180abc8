"""A latent score SDE on scikit-learn's 8x8 digits (``digits_latent``): DDPM++ (VP SDE,
continuous) on the 2x4x4 latents of the toolkit's own KL autoencoder (``digits_ae``), the
latent-diffusion recipe of Rombach et al. 2022 (LSGM's score-SDE form, Vahdat et al. 2021) at toy
scale. Two commands, the autoencoder first:

    python main.py --config digits_ae --mode train_autoencoder --workdir runs/ae
    python main.py --config digits_latent --mode train --workdir runs/latent

(``--config.data.autoencoder.checkpoint`` names another autoencoder workdir). The posteriors of
the digits are cached once under the workdir (``data.cache = 'auto'``) and z ~ q(z | x) is drawn
per step; samples are decoded by the autoencoder. The latents are scaled to unit variance by the
factor the autoencoder's training stored (``data.autoencoder.scale_factor = None``). On 2 busy
cores the two stages took 3.6 + 6.1 minutes to recognisable digits.
"""

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.digits import get_config as get_digits_config


def get_config():
    """Config of ``python main.py --config digits_latent``."""
    config = get_digits_config()
    # the digits_ae run: its architecture keys repeated (checked against its checkpoint)
    config.data.autoencoder = get_autoencoder_config(
        'kl', checkpoint='runs/ae', latent_channels=2, channels=32, channel_mult=(1, 2),
        num_res_blocks=1, reconstruction='l1', beta=1e-3, lr=1e-3)
    training = config.training
    training.n_iters = 3000
    training.snapshot_freq = 1500
    training.snapshot_freq_for_preemption = 500
    training.eval_freq = 500
    # the score network on 2x4x4 latents: one resolution (4x4), width 64, two blocks: 0.87 M
    # parameters, about 0.1 s per step on one busy CPU thread
    config.model.nf = 64
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 2
    config.eval.end_ckpt = 2  # the two snapshots of the default run (steps 1500 and 3000)
    return config
