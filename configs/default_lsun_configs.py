"""Base config for 256x256 image folders: the reference's LSUN defaults (also used by its
CelebA-HQ and FFHQ 256 configs).

The reference reads LSUN from TFDS and CelebA-HQ/FFHQ from TFRecords; here every one of them
is an image folder (``data.dataset = 'folder'``, ``data.root``): PNG/JPEG files, resized so the
shorter side is ``data.image_size`` and centre-cropped, as the reference's LSUN pipeline.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.sampling import add_fast_sampler_options


def get_default_configs():
    """Defaults shared by the 256x256 configs (Song et al. 2021, appendix H)."""
    config = ml_collections.ConfigDict()
    # training
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 64
    training.n_iters = 2400001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    # frequent checkpoints for preemption (checkpoints-meta/checkpoint.pth)
    training.snapshot_freq_for_preemption = 5000
    # sample a grid with the EMA weights at each snapshot
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.continuous = True
    training.reduce_mean = False
    # a NaN/inf loss or gradient stops the run naming the step; True skips such steps instead
    training.skip_nonfinite = False
    training.max_skip_fraction = 0.01  # skipping more of the last 1000 steps (>= 10) stops it
    # ours (docs/precision.md): the network's precision, 'auto' (tf32 on CUDA, else fp32),
    # 'fp32', 'tf32', 'bf16' or 'fp16' (autocast forward; weights, loss and EMA stay fp32)
    training.precision = 'auto'
    training.compile = False  # torch.compile the network for training
    training.grad_accum = 1  # micro-batches per step; their gradients sum to the batch's
    # ours: the discrete VP objective: 'simple' (Ho et al. 2020) or 'hybrid' (improved DDPM's
    # L_simple + L_vlb, for a model with learn_sigma); vlb_rescale multiplies L_vlb by N / 1000;
    # vlb_importance_sampling draws the steps by the L_vlb history (Nichol & Dhariwal 2021)
    training.loss = 'simple'
    training.vlb_rescale = False
    training.vlb_importance_sampling = False

    # sampling
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.075
    # every fast sampler's option, None = that sampler's default (configs/sampling.py)
    add_fast_sampler_options(sampling)

    # evaluation
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 50
    evaluate.end_ckpt = 96
    evaluate.batch_size = 512
    evaluate.enable_sampling = True
    evaluate.num_samples = 50000
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = 'test'
    # the network's precision in bits/dim (--mode likelihood, eval): 'fp32' unless forced
    evaluate.likelihood_precision = 'fp32'
    # ours: bits/dim of --mode likelihood by the probability-flow 'ode' or, for a discrete VP
    # model, the variational bound 'vlb' on the respacing vlb_spacing (None: every step)
    evaluate.bpd_method = 'ode'
    evaluate.vlb_spacing = placeholder(str)

    # data (the reference: dataset 'LSUN' from TFDS)
    config.data = data = ml_collections.ConfigDict()
    # 'none': a pixel model; 'kl' / 'sd_vae': the score model works on latents (docs/latent.md)
    data.autoencoder = get_autoencoder_config()
    data.dataset = 'folder'
    data.root = 'data/lsun'
    data.image_size = 256
    data.random_flip = True
    data.uniform_dequantization = False
    data.centered = False
    data.num_channels = 3
    # ours, for image folders (data.dataset = 'folder'): worker processes decoding batches
    # ahead of the step ('auto': min(4, cores) for folders, 0 for data in memory)
    data.num_workers = 'auto'
    # decode cache: 'none', 'auto' (workdir/data_cache) or a folder that runs may share
    data.cache = 'auto'
    data.alpha_background = (255, 255, 255)  # RGB under transparent pixels (0..255)

    # model
    config.model = model = ml_collections.ConfigDict()
    model.sigma_max = 378
    model.sigma_min = 0.01
    model.num_scales = 2000
    model.beta_min = 0.1
    model.beta_max = 20.
    model.dropout = 0.
    model.embedding_type = 'fourier'
    # ours: True doubles the output channels with improved DDPM's variance interpolation v
    # (models that support it; trained by training.loss = 'hybrid', discrete VP SDEs)
    model.learn_sigma = False
    model.grad_checkpoint = False  # ours: recompute the blocks in backward (less memory)
    model.channels_last = False  # ours: NHWC weights and inputs (faster convs on GPU tensor cores)

    # optimization
    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = 'Adam'
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.

    config.seed = 42
    # 'auto' = CUDA when available, else CPU; resolved once by main.py
    config.device = 'auto'

    return config
