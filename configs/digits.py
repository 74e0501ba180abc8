"""The embedded default: a small DDPM++ (VP SDE, continuous) on scikit-learn's 8x8 digits.

Sized to train on a 2-core CPU in under 10 minutes to recognisable digits (``digits``):
8x8x1 images, two resolutions (8, 4), nf 32, batch 64, a short warm-up and a large learning
rate with EMA 0.999; samples with the second-order multistep DPM-Solver++ in 30 steps.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.sampling import get_sampling_config


def get_config():
    """Config of ``python main.py --config digits``."""
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
    training.batch_size = 64
    training.n_iters = 2000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.snapshot_sampling = True
    training.log_freq = 50
    training.eval_freq = 250

    # the reference's full sampling section (predictor, corrector, snr, ...: used when
    # --config.sampling.method=pc) and every fast sampler's option; this one runs by default
    config.sampling = get_sampling_config(method='dpm_solver++_2m', nfe=30)

    config.eval = evaluate = ml_collections.ConfigDict()
    # --mode eval: the two snapshots of the default run (steps 1000 and 2000), the test loss,
    # bits/dim of the 297 test digits, and the digits metric of 1000 samples
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 2
    evaluate.batch_size = 297
    evaluate.enable_sampling = True
    evaluate.num_samples = 1000
    evaluate.enable_loss = True
    evaluate.enable_bpd = True
    evaluate.bpd_dataset = 'test'
    # the network's precision in bits/dim (--mode likelihood, eval): 'fp32' unless forced
    evaluate.likelihood_precision = 'fp32'
    # ours: bits/dim of --mode likelihood by the probability-flow 'ode' or, for a discrete VP
    # model, the variational bound 'vlb' on the respacing vlb_spacing (None: every step)
    evaluate.bpd_method = 'ode'
    evaluate.vlb_spacing = placeholder(str)
    # probability-flow ODE tolerances of bits/dim in --mode likelihood and eval (reference: 1e-5)
    evaluate.rtol = 1e-3
    evaluate.atol = 1e-3

    config.data = data = ml_collections.ConfigDict()
    # 'none': a pixel model; 'kl' / 'sd_vae': the score model works on latents (docs/latent.md)
    data.autoencoder = get_autoencoder_config()
    data.dataset = 'digits'
    data.image_size = 8
    data.num_channels = 1
    data.centered = True
    data.random_flip = False  # a mirrored digit is not a digit
    data.uniform_dequantization = False
    # --config.data.dataset=folder reads the images under data.root instead, at the 8x8 grey
    # size above unless data.image_size / data.num_channels are set too
    data.root = 'data/images'
    # ours, for image folders (data.dataset = 'folder'): worker processes decoding batches
    # ahead of the step ('auto': min(4, cores) for folders, 0 for data in memory)
    data.num_workers = 'auto'
    # decode cache: 'none', 'auto' (workdir/data_cache) or a folder that runs may share
    data.cache = 'auto'
    data.alpha_background = (255, 255, 255)  # RGB under transparent pixels (0..255)

    config.model = model = ml_collections.ConfigDict()
    model.name = 'ncsnpp'
    model.beta_min = 0.1
    model.beta_max = 20.
    model.num_scales = 1000
    model.sigma_min = 0.01
    model.sigma_max = 50.
    model.ema_rate = 0.999
    model.dropout = 0.
    model.scale_by_sigma = False
    model.normalization = 'GroupNorm'
    model.nonlinearity = 'swish'
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = ()
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = 'biggan'
    model.progressive = 'none'
    model.progressive_input = 'none'
    model.progressive_combine = 'sum'
    model.attention_type = 'ddpm'
    model.init_scale = 0.
    model.embedding_type = 'positional'
    model.fourier_scale = 16
    model.conv_size = 3
    # K > 0 trains class-conditionally on the 10 digit classes (K + 1 label rows,
    # the last the null label of classifier-free guidance); 0 = unconditional
    model.num_classes = 0
    # ours: True doubles the output channels with improved DDPM's variance interpolation v
    # (models that support it; trained by training.loss = 'hybrid', discrete VP SDEs)
    model.learn_sigma = False
    model.grad_checkpoint = False  # ours: recompute the blocks in backward (less memory)
    model.channels_last = False  # ours: NHWC weights and inputs (faster convs on GPU tensor cores)

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = 'Adam'
    optim.lr = 2e-3
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
