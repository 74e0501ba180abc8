"""A time-conditioned MLP on a 2-D toy distribution (VP SDE, continuous): seconds on a CPU.

``--config.data.toy`` picks checkerboard, moons, swissroll or ring (the analytic 8-mode
Gaussian mixture); ``--config.data.dataset=gmm`` draws instead from a seeded random mixture of
``data.n_modes`` components in ``data.dim`` dimensions, whose exact score and density are known
(``datasets.toy.gaussian_mixture``). Samples are plotted as a scatter PNG.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.sampling import get_sampling_config


def get_config():
    """Config of ``python main.py --config toy_2d``."""
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = 'vpsde'
    training.continuous = True
    training.reduce_mean = True
    training.likelihood_weighting = False
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
    training.batch_size = 512
    training.n_iters = 5000
    training.snapshot_freq = 2500
    training.snapshot_freq_for_preemption = 500
    training.snapshot_sampling = True
    training.log_freq = 100
    training.eval_freq = 500

    # the reference's full sampling section (predictor, corrector, snr, ...: used when
    # --config.sampling.method=pc) and every fast sampler's option; this one runs by default
    config.sampling = get_sampling_config(method='dpm_solver++_2m', nfe=50)

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 1000
    evaluate.bpd_dataset = 'test'
    # the network's precision in bits/dim (--mode likelihood, eval): 'fp32' unless forced
    evaluate.likelihood_precision = 'fp32'
    # ours: bits/dim of --mode likelihood by the probability-flow 'ode' or, for a discrete VP
    # model, the variational bound 'vlb' on the respacing vlb_spacing (None: every step)
    evaluate.bpd_method = 'ode'
    evaluate.vlb_spacing = placeholder(str)
    # probability-flow ODE tolerances of --mode likelihood (the reference's 1e-5 by default)
    evaluate.rtol = 1e-4
    evaluate.atol = 1e-4

    config.data = data = ml_collections.ConfigDict()
    # 'none': a pixel model; 'kl' / 'sd_vae': the score model works on latents (docs/latent.md)
    data.autoencoder = get_autoencoder_config()
    data.dataset = 'toy_2d'
    data.toy = 'checkerboard'
    data.n_modes = 4  # components of data.dataset = 'gmm'
    data.dim = 2
    data.num_samples = 50000
    data.centered = True  # points are used as they are (no [0, 1] -> [-1, 1] scaling)
    data.random_flip = False
    data.uniform_dequantization = False

    config.model = model = ml_collections.ConfigDict()
    model.name = 'mlp'
    model.beta_min = 0.1
    model.beta_max = 20.
    model.num_scales = 1000
    model.ema_rate = 0.999
    model.nf = 128
    model.num_layers = 3
    model.embedding_type = 'positional'
    model.nonlinearity = 'swish'
    # K > 0 trains class-conditionally on the classes of data.dataset='gmm' (its modes) (K + 1 label rows,
    # the last the null label of classifier-free guidance); 0 = unconditional
    model.num_classes = 0
    # ours: True doubles the output channels with improved DDPM's variance interpolation v
    # (models that support it; trained by training.loss = 'hybrid', discrete VP SDEs)
    model.learn_sigma = False
    model.grad_checkpoint = False  # activation checkpointing: refused by the MLP (models.memory)
    model.channels_last = False  # NHWC layout for convolutions: refused by the MLP

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = 'Adam'
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0
    optim.warmup = 100
    optim.grad_clip = 1.

    config.seed = 42
    config.device = 'auto'
    # CPU threads: the layers are so small that one thread beats two, and stays fast on a
    # machine whose cores are busy with other work (main.py applies it)
    config.num_threads = 1
    return config
