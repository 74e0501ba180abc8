"""The official DiT-XL/2 at 256x256 (Peebles & Xie 2023) in SD-VAE latent space
(``imagenet256_dit_xl2``): for sampling the released ``DiT-XL-2-256x256.pt``.

The network sees 4x32x32 SD-VAE latents (256 px / 8) in 2x2 patches (256 tokens): width 1152,
28 blocks, 16 heads, 1000 ImageNet classes with label dropout 0.1 (the null label 1000), learned
variances (8 output channels: epsilon, then v): 675,129,632 parameters. Its diffusion is the DDPM
linear table 1e-4 .. 0.02 over 1000 steps (``discrete_vpsde``). Sampling: DPM-Solver++(2M) at
20 NFE with DiT's guidance scale s = 4.0 for pictures (``--config.sampling.cfg_scale=1.5`` for
FID, the paper's), guided as the official ``forward_with_cfg`` (channels 0-2 only).

    python main.py --config imagenet256_dit_xl2 --mode sample \\
        --checkpoint /path/DiT-XL-2-256x256.pt --workdir runs/dit --classes=207,360,387,974

Until the latent-space support lands, ``--mode sample`` stops at the latents (``latents.npz``,
the log says so) and ``data.vae_path`` (the local SD-VAE folder) is recorded, not used.
Training is refused: there are no ImageNet latents here (dataset ``imagenet_latents``). The
training section holds the official recipe (the hybrid loss, AdamW lr 1e-4, no weight decay,
batch 256, EMA 0.9999, no warm-up or clipping) for when they exist.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.sampling import get_sampling_config


def get_config():
    """Config of ``python main.py --config imagenet256_dit_xl2``."""
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = 'discrete_vpsde'
    training.continuous = False
    training.reduce_mean = True
    training.likelihood_weighting = False
    # the official objective: L_simple + L_vlb (Nichol & Dhariwal 2021), which trains the
    # learned variances; steps drawn uniformly, L_vlb not rescaled (N = 1000: the same)
    training.loss = 'hybrid'
    training.vlb_rescale = False
    training.vlb_importance_sampling = False
    training.skip_nonfinite = False
    training.max_skip_fraction = 0.01
    # ours (docs/precision.md): the network's precision, 'auto' (tf32 on CUDA, else fp32),
    # 'fp32', 'tf32', 'bf16' or 'fp16' (autocast forward; weights, loss and EMA stay fp32)
    training.precision = 'auto'
    training.compile = False  # torch.compile the network for training
    training.grad_accum = 1  # micro-batches per step; their gradients sum to the batch's
    training.batch_size = 256
    training.n_iters = 400000
    training.snapshot_freq = 50000
    training.snapshot_freq_for_preemption = 5000
    training.snapshot_sampling = False
    training.log_freq = 100
    training.eval_freq = 5000

    # s = 4.0 for pictures; 1.5 is the scale of the paper's FID (2.27 with 250 DDPM steps)
    config.sampling = get_sampling_config(method='dpm_solver++_2m', nfe=20, cfg_scale=4.0,
                                          cfg_official=True)

    config.eval = evaluate = ml_collections.ConfigDict()
    # --mode sample draws in batches of eval.batch_size (the guided batch is twice that)
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 8
    evaluate.batch_size = 8
    evaluate.enable_sampling = False  # FID needs decoded images (the latent-space support)
    evaluate.num_samples = 50000
    evaluate.enable_loss = False
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = 'test'
    # the network's precision in bits/dim (--mode likelihood, eval): 'fp32' unless forced
    evaluate.likelihood_precision = 'fp32'
    evaluate.bpd_method = 'vlb'  # the DDPM variational bound (needs the latents, as training)
    evaluate.vlb_spacing = placeholder(str)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'imagenet_latents'  # not available here: training is refused, naming it
    data.image_size = 32  # the latent of a 256 px image (SD-VAE downsamples by 8)
    data.num_channels = 4
    data.centered = True  # latents are used as they are
    data.random_flip = False
    data.uniform_dequantization = False
    # the local SD-VAE folder (e.g. a copy of stabilityai/sd-vae-ft-ema) that will decode the
    # latents, and the latent scale of DiT (z = 0.18215 E(x)); recorded, not yet used
    data.vae_path = ''
    data.latent_scale_factor = 0.18215

    config.model = model = ml_collections.ConfigDict()
    model.name = 'dit'
    model.patch_size = 2
    model.hidden_size = 1152
    model.depth = 28
    model.num_heads = 16
    model.mlp_ratio = 4.0
    model.num_classes = 1000
    model.class_dropout_prob = 0.1
    model.learn_sigma = True
    model.grad_checkpoint = False  # recompute each DiT block in the backward pass (less memory)
    model.channels_last = False  # refused for DiT (tokens, not images; models.memory)
    model.beta_schedule = 'linear'
    model.beta_start = 1e-4
    model.beta_end = 0.02
    model.num_scales = 1000
    model.ema_rate = 0.9999

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = 'Adam'  # AdamW with weight decay 0 is Adam
    optim.lr = 1e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0
    optim.warmup = 0
    optim.grad_clip = -1.  # none

    config.seed = 0
    config.device = 'auto'
    config.num_threads = 0  # torch's default: every core
    return config
