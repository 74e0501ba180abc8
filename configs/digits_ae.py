"""The toolkit's own KL autoencoder on scikit-learn's 8x8 digits (``digits_ae``): the first stage
of ``digits_latent`` (latent score SDEs, docs/latent.md).

    python main.py --config digits_ae --mode train_autoencoder --workdir runs/ae

8x8x1 digits -> 2x4x4 latents (one downsampling level), width 32, one residual block per level;
L1 reconstruction plus beta = 1e-3 times the KL per data dimension, Adam lr 1e-3, batch 64,
EMA 0.999. The sections other than ``data.autoencoder``, ``training`` and ``optim`` are the
``digits`` config's (unused by this mode).
"""

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.digits import get_config as get_digits_config


def get_config():
    """Config of ``python main.py --config digits_ae --mode train_autoencoder``."""
    config = get_digits_config()
    # the own autoencoder: its architecture is what digits_latent's data.autoencoder repeats
    config.data.autoencoder = get_autoencoder_config(
        'kl', latent_channels=2, channels=32, channel_mult=(1, 2), num_res_blocks=1,
        reconstruction='l1', beta=1e-3, lr=1e-3)
    training = config.training
    training.batch_size = 64
    training.n_iters = 3000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 500
    training.log_freq = 100
    training.eval_freq = 500
    config.optim.warmup = 100
    config.optim.grad_clip = 1.
    return config
