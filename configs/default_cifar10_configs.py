"""Base config for CIFAR-10 (32x32x3): the reference's ``get_default_configs`` values."""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.sampling import add_fast_sampler_options


def get_default_configs():
    """Defaults shared by every CIFAR-10 config (Song et al. 2021, appendix H)."""
    config = ml_collections.ConfigDict()
    # training
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    # frequent checkpoints for preemption (checkpoints-meta/checkpoint.pth)
    training.snapshot_freq_for_preemption = 10000
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
    sampling.snr = 0.16
    # every fast sampler's option, None = that sampler's default (configs/sampling.py)
    add_fast_sampler_options(sampling)

    # evaluation
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
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

    # data
    config.data = data = ml_collections.ConfigDict()
    # 'none': a pixel model; 'kl' / 'sd_vae': the score model works on latents (docs/latent.md)
    data.autoencoder = get_autoencoder_config()
    data.dataset = 'CIFAR10'
    # folder holding cifar-10-python.tar.gz (downloaded there when a network is available)
    data.root = 'data'
    data.image_size = 32
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False
    data.num_channels = 3
    # ours, for image folders (data.dataset = 'folder'): worker processes decoding batches
    # ahead of the step ('auto': min(4, cores) for folders, 0 for data in memory)
    data.num_workers = 'auto'
    # decode cache: 'none', 'auto' (workdir/data_cache) or a folder that runs may share
    data.cache = 'auto'
    data.alpha_background = (255, 255, 255)  # RGB under transparent pixels (0..255)

    # model
    config.model = model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.
    model.dropout = 0.1
    model.embedding_type = 'fourier'
    # ours: K > 0 trains class-conditionally on the 10 classes (K + 1 label rows, the last the
    # null label of classifier-free guidance); 0 = unconditional, the reference's networks
    model.num_classes = 0
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
