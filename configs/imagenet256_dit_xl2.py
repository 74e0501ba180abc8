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

With the VAE on disk (``--config.data.autoencoder.path=/path/sd-vae-ft-ema``: a local copy of
stabilityai/sd-vae-ft-ema or -mse, config.json + diffusion_pytorch_model.safetensors) the
latents are decoded into 256x256 images (``sample.png``, ``sample.npz``) beside ``latents.npz``;
without it sampling stops at the latents and says how to decode. The latent scale is DiT's
z = 0.18215 E(x) (``data.autoencoder.scale_factor``).

Training reads an ImageNet folder (``data.root``: one sub-folder per class, the wnid names in
sorted order = the official class indices) resized and centre-cropped to 256 px and encoded by
the SD VAE, the posteriors cached once (``data.cache``); it needs the VAE on disk and a GPU. The
training section holds the official recipe (the hybrid loss, AdamW lr 1e-4, no weight decay,
batch 256, EMA 0.9999, no warm-up or clipping).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs.default_autoencoder_configs import get_autoencoder_config
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
    evaluate.enable_sampling = False  # FID of 50k decoded 256 px samples: enable on a GPU
    evaluate.num_samples = 50000
    evaluate.enable_loss = False
    evaluate.enable_bpd = False  # data bits/dim of a latent model: the LSGM bound
    evaluate.bpd_dataset = 'test'
    # the network's precision in bits/dim (--mode likelihood, eval): 'fp32' unless forced
    evaluate.likelihood_precision = 'fp32'
    # a latent model's data bits/dim: the LSGM bound with the latent ODE likelihood ('ode' only)
    evaluate.bpd_method = 'ode'
    evaluate.vlb_spacing = placeholder(str)

    config.data = data = ml_collections.ConfigDict()
    # ImageNet as an image folder encoded by the SD VAE (latent training, docs/latent.md)
    data.dataset = 'folder'
    data.root = 'data/imagenet/train'
    data.image_size = 256  # the images; the network sees their 4 x 32 x 32 SD-VAE latents
    data.num_channels = 3
    data.centered = True  # the VAE encodes [-1, 1] images; latents are used as they are
    data.random_flip = True  # DiT's augmentation (the cache holds both posteriors)
    data.uniform_dequantization = False
    data.num_workers = 'auto'  # decoding workers of the image folder
    data.cache = 'auto'  # decoded images and the VAE posteriors, cached once under the workdir
    data.alpha_background = (255, 255, 255)  # RGB under transparent pixels (0..255)
    # the SD VAE from local files (path empty: sampling stops at the latents), DiT's scale
    data.autoencoder = get_autoencoder_config('sd_vae', path='', scale_factor=0.18215)

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
