"""A small class-conditional DiT (Peebles & Xie 2023) on scikit-learn's 8x8 digits (``dit_digits``).

DiT's recipe at toy scale: a DDPM linear beta table (1e-4 .. 0.02 over 1000 steps) as the
discrete VP SDE, integer-step noise-prediction training (``training.continuous = False``), label
dropout 0.1 so that one network learns the 10 conditional scores and the unconditional one, and
classifier-free guidance at sampling with DiT's scale s (``sampling.cfg_scale``; the
``samplers.ClassifierFreeGuidance`` weight is w = s - 1). The network: 2x2 patches of the 8x8x1
digit (16 tokens), width 128, 4 blocks, 4 heads, learned variances trained with DiT's hybrid
loss: 1.27 M parameters. Sized to train on a 2-core CPU in about 13 minutes (5000 steps of batch
128 on one thread, 0.15 s each) to class-recognisable digits; samples with DPM-Solver++(2M) in 20
steps, guided with s = 2.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_autoencoder_configs import get_autoencoder_config
from configs.sampling import get_sampling_config


def get_config():
    """Config of ``python main.py --config dit_digits``."""
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = 'discrete_vpsde'
    training.continuous = False  # integer steps n ~ U{0..N-1}, the eps loss of DDPM and DiT
    training.reduce_mean = True
    training.likelihood_weighting = False
    # DiT's objective: L_simple + L_vlb (Nichol & Dhariwal 2021, eq. 16) for the learned variance
    # (model.learn_sigma); the VLB term unscaled, steps drawn uniformly (DiT's loss type MSE)
    training.loss = 'hybrid'
    training.vlb_rescale = False
    training.vlb_importance_sampling = False
    # a NaN/inf loss or gradient stops the run naming the step; True skips such steps instead
    training.skip_nonfinite = False
    training.max_skip_fraction = 0.01  # skipping more of the last 1000 steps (>= 10) stops it
    # ours (docs/precision.md): the network's precision, 'auto' (tf32 on CUDA, else fp32),
    # 'fp32', 'tf32', 'bf16' or 'fp16' (autocast forward; weights, loss and EMA stay fp32)
    training.precision = 'auto'
    training.compile = False  # torch.compile the network for training
    training.grad_accum = 1  # micro-batches per step; their gradients sum to the batch's
    training.batch_size = 128
    training.n_iters = 5000
    training.snapshot_freq = 2500
    training.snapshot_freq_for_preemption = 500
    training.snapshot_sampling = True
    training.log_freq = 100
    training.eval_freq = 500

    # DPM-Solver++(2M) at 20 NFE, every class in turn (one per grid row), guided with DiT's
    # s = 2 (w = 1): every sample its class; larger s trades diversity (FDD) for class fidelity,
    # --config.sampling.cfg_scale=1 samples the conditional model alone (docs/dit.md)
    config.sampling = get_sampling_config(method='dpm_solver++_2m', nfe=20, cfg_scale=2.0)

    config.eval = evaluate = ml_collections.ConfigDict()
    # --mode eval: the two snapshots of the default run (steps 2500 and 5000), the test loss,
    # bits/dim of the 297 test digits (conditional on their labels) and the digits metric of
    # 1000 guided samples (100 per class)
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
    evaluate.rtol = 1e-3
    # bits/dim of a learned-variance discrete model: its variational bound on the 17-level
    # digits (Ho et al. 2020, eq. 5), on every step of the table; 'ode' for the probability flow
    evaluate.bpd_method = 'vlb'
    evaluate.vlb_spacing = placeholder(str)
    evaluate.atol = 1e-3

    config.data = data = ml_collections.ConfigDict()
    # 'none': a pixel model; 'kl' / 'sd_vae': the score model works on latents (docs/latent.md)
    data.autoencoder = get_autoencoder_config()
    data.dataset = 'digits'
    data.image_size = 8
    data.num_channels = 1
    data.centered = True  # DiT takes its input as given: [-1, 1]
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
    model.name = 'dit'
    model.patch_size = 2
    model.hidden_size = 128
    model.depth = 4
    model.num_heads = 4
    model.mlp_ratio = 4.0
    model.num_classes = 10
    model.class_dropout_prob = 0.1  # the null label K = 10 of classifier-free guidance
    model.learn_sigma = True  # eps and the variance interpolation v (2 output channels)
    model.grad_checkpoint = False  # recompute each DiT block in the backward pass (less memory)
    model.channels_last = False  # refused for DiT (tokens, not images; models.memory)
    # the DDPM table of DiT (discrete_vpsde): linear betas, N steps
    model.beta_schedule = 'linear'
    model.beta_start = 1e-4
    model.beta_end = 0.02
    model.num_scales = 1000
    model.ema_rate = 0.999

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = 'Adam'  # DiT's AdamW with weight decay 0 is Adam
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0
    optim.warmup = 200
    optim.grad_clip = 1.

    config.seed = 42
    config.device = 'auto'
    # one CPU thread: steady on a machine whose cores are busy with other work (two threads
    # are 1.6x faster on an idle 2-core machine, --config.num_threads=2, and far slower on a
    # busy one)
    config.num_threads = 1
    return config
