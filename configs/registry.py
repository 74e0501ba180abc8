"""Short config names for the CLI: name -> module under ``configs/`` (pure data, no imports).

``main.py --config vp_cifar`` and ``main.py --config configs/vp/cifar10_ddpmpp_continuous.py``
load the same module. Each module defines ``get_config()``.
"""

CONFIGS = {
    # Song et al. 2021, table 3 (CIFAR-10)
    'vp_cifar': 'configs.vp.cifar10_ddpmpp_continuous',
    'vp_cifar_deep': 'configs.vp.cifar10_ddpmpp_deep_continuous',
    'subvp_cifar': 'configs.subvp.cifar10_ddpmpp_continuous',
    'subvp_cifar_deep': 'configs.subvp.cifar10_ddpmpp_deep_continuous',
    've_cifar': 'configs.ve.cifar10_ncsnpp_continuous',
    've_cifar_deep': 'configs.ve.cifar10_ncsnpp_deep_continuous',
    'ddpm_cifar': 'configs.vp.ddpm.cifar10',
    'ncsn_cifar': 'configs.ve.ncsnv2.cifar10',
    # embedded defaults: no download needed
    'digits': 'configs.digits',
    'toy_2d': 'configs.toy_2d',
    # DiT (Peebles & Xie 2023): a small class-conditional one on the digits, and the official
    # DiT-XL/2 at 256x256 in SD-VAE latent space (sampling an official checkpoint)
    'dit_digits': 'configs.dit_digits',
    'imagenet256_dit_xl2': 'configs.imagenet256_dit_xl2',
    # cascaded generation (Ho, Saharia et al. 2022): 4x4 -> 8x8 digits; a 32 -> 64 -> 128
    # image-folder cascade (sizes documented, not trained here)
    'digits_cascade': 'configs.digits_cascade',
    'folder_cascade': 'configs.folder_cascade',
    # latent score SDEs (Rombach et al. 2022; LSGM): the own KL autoencoder on the digits, then a
    # DDPM++ in its latent space (train digits_ae first; docs/latent.md)
    'digits_ae': 'configs.digits_ae',
    'digits_latent': 'configs.digits_latent',
}


def module_path(name):
    """The file path of config ``name``, relative to the repository root (``configs/...py``)."""
    return CONFIGS[name].replace('.', '/') + '.py'
