"""NCSN++ and DDPM++: the U-Net score networks of Song et al. 2021 (App. H).

One class covers both families; the config picks the variant:

* NCSN++ (VE SDE): Gaussian Fourier features of log sigma, FIR resampling, BigGAN blocks,
  progressive input/output pyramids, output divided by sigma (``scale_by_sigma``);
* DDPM++ (VP / sub-VP SDEs): sinusoidal embedding of the time label 999 t, no FIR, no pyramids.

The network is kept as one flat ``nn.ModuleList`` named ``all_modules`` in the reference's
order, plus the float64 ``sigmas`` buffer, so a reference (yang-song/score_sde_pytorch) state dict
loads with ``strict=True`` once the ``module.`` prefix of ``DataParallel`` is removed.
``forward`` walks the list with an iterator in the order ``__init__`` built it.

Optional class conditioning (``config.model.num_classes > 0``) adds ``label_embedding``, an
``nn.Embedding(num_classes + 1, 4 nf)`` added to the time embedding; its last index is the null
label used for classifier-free guidance (Ho & Salimans 2022); ``class_dropout_prob`` drops labels
to it in training mode. ``learn_sigma = True`` doubles the output channels (the next C are improved
DDPM's variance interpolation v, Nichol & Dhariwal 2021, eq. 15). With ``num_classes`` and
``learn_sigma`` absent the model and its state dict are exactly the reference's.

Optional image conditioning (``config.model.cond_channels > 0``, super-resolution stages of a
cascade; :mod:`models.image_conditioning`): the upsampled low-resolution image and a flag channel
enter through ``cond_conv`` beside the input convolution, the augmentation level through
``cond_level_embed`` added to the time embedding; both zero-initialised.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn

from models import layerspp
from models.conditioning import ClassConditional
from models.image_conditioning import ImageConditional, read_image_cond_options
from models.layers import ddpm_conv3x3, dense, get_act, get_sigmas, get_timestep_embedding
from models.layerspp import group_norm
from models.memory import read_memory_options, set_grad_checkpoint, to_memory_format
from models.utils import check_image_inputs, read_learn_sigma, register_model

_CHOICES = {
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
    "resblock_type": ("ddpm", "biggan"),
}


def _choice(config, key: str) -> str:
    value = str(config.model[key]).lower()
    if value not in _CHOICES[key]:
        raise ValueError(
            f"Unknown model.{key} {config.model[key]!r}; valid: {', '.join(_CHOICES[key])}"
        )
    return value


def _level_positional(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (B, dim) of the augmentation level s (B,) in [0, 1], as of a time
    label 999 s (the positional time embedding of DDPM++)."""
    return get_timestep_embedding(999 * level, dim)


@register_model("ncsnpp")
class NCSNpp(ClassConditional, ImageConditional, nn.Module):
    """NCSN++ / DDPM++ score network (Song et al. 2021, App. H) from an ml_collections config.

    Reads ``config.model``: nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
    resamp_with_conv, conditional, fir, fir_kernel, skip_rescale, resblock_type, progressive,
    progressive_input, progressive_combine, embedding_type, fourier_scale, init_scale, conv_size,
    scale_by_sigma, nonlinearity, sigma_min, sigma_max, num_scales and optionally num_classes,
    class_dropout_prob, learn_sigma, cond_channels, cond_upsample, cond_dropout_prob,
    grad_checkpoint, channels_last (``models.memory``);
    ``config.data``: centered, image_size, num_channels.

    Call: ``model(x, time_cond, class_labels=None, cond_image=None, cond_level=None)`` with
    x (B, C, H, W) and time_cond (B,) the noise level sigma (Fourier embedding) or the time
    label 999 t (positional embedding); returns (B, C, H, W), or (B, 2 C, H, W) with
    ``learn_sigma``.
    """

    def __init__(self, config) -> None:
        super().__init__()
        m = config.model
        self.config = config
        self.act = act = get_act(config)
        # The reference's configs set attention_type = 'ddpm', the one kind NCSN++ has.
        attention_type = m.get("attention_type", "ddpm")
        if attention_type != "ddpm":
            raise ValueError(
                f"model.attention_type={attention_type!r} is not supported; valid: 'ddpm'"
            )
        self.register_buffer("sigmas", get_sigmas(config))

        self.nf = nf = m.nf
        ch_mult = tuple(m.ch_mult)
        self.num_res_blocks = num_res_blocks = m.num_res_blocks
        self.attn_resolutions = attn_resolutions = tuple(m.attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        self.all_resolutions = [config.data.image_size // 2**i for i in range(num_resolutions)]
        self.conditional = conditional = m.conditional  # noise-conditional
        fir, fir_kernel = m.fir, tuple(m.fir_kernel)
        self.skip_rescale = skip_rescale = m.skip_rescale
        self.resblock_type = resblock_type = _choice(config, "resblock_type")
        self.progressive = progressive = _choice(config, "progressive")
        self.progressive_input = progressive_input = _choice(config, "progressive_input")
        self.embedding_type = embedding_type = _choice(config, "embedding_type")
        combine_method = _choice(config, "progressive_combine")
        init_scale = m.init_scale
        self.centered = config.data.centered
        self.scale_by_sigma = m.scale_by_sigma
        if m.get("conv_size", 3) != 3:
            raise ValueError(f"NCSN++ supports model.conv_size 3 only, got {m.conv_size!r}")
        if config.data.image_size % 2 ** (num_resolutions - 1):
            raise ValueError(
                f"data.image_size {config.data.image_size} must be divisible by "
                f"2**{num_resolutions - 1} (len(ch_mult) - 1 halvings)"
            )

        modules: list[nn.Module] = []
        # Noise-level / time embedding, (B,) -> (B, embed_dim) -> MLP -> (B, 4 nf).
        if embedding_type == "fourier":
            training = config.get("training", None)
            if training is not None and not training.get("continuous", True):
                raise ValueError("embedding_type 'fourier' is for continuous training only")
            modules.append(layerspp.GaussianFourierProjection(nf, scale=m.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if conditional:
            modules.append(dense(embed_dim, nf * 4))
            modules.append(dense(nf * 4, nf * 4))

        AttnBlock = functools.partial(
            layerspp.AttnBlockpp, init_scale=init_scale, skip_rescale=skip_rescale
        )
        Upsample = functools.partial(
            layerspp.Upsample, with_conv=m.resamp_with_conv, fir=fir, fir_kernel=fir_kernel
        )
        Downsample = functools.partial(
            layerspp.Downsample, with_conv=m.resamp_with_conv, fir=fir, fir_kernel=fir_kernel
        )
        # Pyramids. output_skip / input_skip resample the image itself with one parameter-free
        # module kept outside all_modules; residual pyramids carry features and resample with a
        # conv, one module per level inside all_modules.
        if progressive == "output_skip":
            self.pyramid_upsample = layerspp.Upsample(fir=fir, fir_kernel=fir_kernel)
        if progressive_input == "input_skip":
            self.pyramid_downsample = layerspp.Downsample(fir=fir, fir_kernel=fir_kernel)
        residual_upsample = functools.partial(
            layerspp.Upsample, fir=fir, fir_kernel=fir_kernel, with_conv=True
        )
        residual_downsample = functools.partial(
            layerspp.Downsample, fir=fir, fir_kernel=fir_kernel, with_conv=True
        )
        ResnetBlock = layerspp.ResnetBlockDDPMpp
        if resblock_type == "biggan":
            ResnetBlock = functools.partial(
                layerspp.ResnetBlockBigGANpp, fir=fir, fir_kernel=fir_kernel
            )
        ResnetBlock = functools.partial(
            ResnetBlock,
            act=act,
            dropout=m.dropout,
            init_scale=init_scale,
            skip_rescale=skip_rescale,
            temb_dim=nf * 4,
        )

        # Downsampling path; hs_c tracks the channels of each skip connection.
        channels = config.data.num_channels
        self.learn_sigma = read_learn_sigma(config, "ncsnpp")
        out_channels = 2 * channels if self.learn_sigma else channels
        input_pyramid_ch = channels
        input_conv = ddpm_conv3x3(channels, nf)
        modules.append(input_conv)
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.all_resolutions[i_level] in attn_resolutions:
                    modules.append(AttnBlock(channels=in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    modules.append(Downsample(in_ch=in_ch))
                else:
                    modules.append(ResnetBlock(down=True, in_ch=in_ch))
                if progressive_input == "input_skip":
                    modules.append(layerspp.Combine(input_pyramid_ch, in_ch, method=combine_method))
                    if combine_method == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    modules.append(residual_downsample(in_ch=input_pyramid_ch, out_ch=in_ch))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        # Bottleneck.
        in_ch = hs_c[-1]
        modules.append(ResnetBlock(in_ch=in_ch))
        modules.append(AttnBlock(channels=in_ch))
        modules.append(ResnetBlock(in_ch=in_ch))

        # Upsampling path.
        pyramid_ch = 0
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.all_resolutions[i_level] in attn_resolutions:
                modules.append(AttnBlock(channels=in_ch))
            if progressive != "none":
                if progressive == "residual" and i_level != num_resolutions - 1:
                    modules.append(residual_upsample(in_ch=pyramid_ch, out_ch=in_ch))
                if progressive == "output_skip":
                    # Norm, act, conv to an image at this resolution, added to the pyramid.
                    modules.append(group_norm(in_ch))
                    modules.append(ddpm_conv3x3(in_ch, out_channels, init_scale=init_scale))
                    pyramid_ch = out_channels
                elif i_level == num_resolutions - 1:
                    modules.append(group_norm(in_ch))
                    modules.append(ddpm_conv3x3(in_ch, in_ch))
                    pyramid_ch = in_ch
                else:
                    pyramid_ch = in_ch
            if i_level != 0:
                if resblock_type == "ddpm":
                    modules.append(Upsample(in_ch=in_ch))
                else:
                    modules.append(ResnetBlock(in_ch=in_ch, up=True))
        if hs_c:
            raise RuntimeError(f"NCSNpp: {len(hs_c)} skip connections left unused")

        if progressive != "output_skip":
            modules.append(group_norm(in_ch))
            modules.append(ddpm_conv3x3(in_ch, out_channels, init_scale=init_scale))

        self.all_modules = nn.ModuleList(modules)

        # Class conditioning (ours): label_embedding (num_classes + 1, 4 nf), null label last.
        self._init_classes(config, nf * 4)
        if self.num_classes and not conditional:
            raise ValueError(
                f"model.num_classes = {self.num_classes} needs model.conditional = True "
                "(the class embedding is added to the time embedding)"
            )
        # Image conditioning (ours, models.image_conditioning), built last.
        cond = read_image_cond_options(config)
        if cond["cond_channels"] and not conditional:
            raise ValueError(
                f"model.cond_channels = {cond['cond_channels']} needs model.conditional = True "
                "(the augmentation level's embedding is added to the time embedding)"
            )
        if cond["cond_channels"]:
            if embedding_type == "fourier":
                level_features = layerspp.GaussianFourierProjection(nf, scale=m.fourier_scale)
            else:
                level_features = functools.partial(_level_positional, dim=nf)
            self._init_image_cond(**cond, input_conv=input_conv, level_features=level_features,
                                  features_dim=embed_dim, temb_dim=nf * 4, act=get_act(config))
        # Memory options (models.memory): recomputed blocks, NHWC layout (create_model converts
        # the parameters; forward converts the input).
        self.grad_checkpoint, self.channels_last = read_memory_options(config, "ncsnpp")
        set_grad_checkpoint(self, self.grad_checkpoint)

    def _embed(
        self, modules: Iterator[nn.Module], time_cond: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Time embedding (B, 4 nf) (None if not noise-conditional) and sigma (B,) for scaling."""
        used_sigmas = None
        if self.embedding_type == "fourier":
            used_sigmas = time_cond
            temb = next(modules)(torch.log(used_sigmas))  # (B, 2 nf)
        else:
            if self.scale_by_sigma:
                used_sigmas = self.sigmas[time_cond.long()]
            # Computed in float32 as the reference, then in the network's dtype.
            temb = get_timestep_embedding(time_cond, self.nf).to(dtype)  # (B, nf)
        if not self.conditional:
            return None, used_sigmas
        temb = next(modules)(temb)
        temb = next(modules)(self.act(temb))  # (B, 4 nf)
        return temb, used_sigmas

    def forward(
        self, x: torch.Tensor, time_cond: torch.Tensor, class_labels: torch.Tensor | None = None,
        cond_image: torch.Tensor | None = None, cond_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score (NCSN++, sigma-scaled) or noise prediction (DDPM++) at x.

        Args:
            x: (B, C, H, W) noisy images, in [-1, 1] if ``data.centered`` else [0, 1] (shifted
                and scaled inside).
            time_cond: (B,) sigma for the Fourier embedding, the time label for positional.
            class_labels: (B,) int64 in [0, num_classes]; ``num_classes`` (or None) is the null
                label. Only for class-conditional models.
            cond_image: (B, cond_channels, h, w) low-resolution image in model space (already
                augmented), upsampled inside; None: the null conditioning. Only with
                ``cond_channels > 0`` (``models.image_conditioning``).
            cond_level: (B,) its augmentation level s in [0, 1] (None: 0).
        Returns:
            (B, C, H, W) in x's dtype; (B, 2 C, H, W) with ``learn_sigma``, the next C channels
            the variance interpolation v (never divided by sigma).
        """
        check_image_inputs(self, x, time_cond, self.config.data.num_channels)
        if self.channels_last:
            x = to_memory_format(x, channels_last=True)
        modules = iter(self.all_modules)
        temb, used_sigmas = self._embed(modules, time_cond, x.dtype)
        class_emb = self.class_embedding(class_labels, x.shape[0], x.device)  # (B, 4 nf) or None
        if class_emb is not None:
            temb = temb + class_emb
        cond_features, level_emb = self.image_cond_terms(x, cond_image, cond_level)
        if level_emb is not None:
            temb = temb + level_emb

        if not self.centered:
            x = 2 * x - 1.0  # [0, 1] -> [-1, 1]

        # Downsampling path; hs holds every skip connection.
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [next(modules)(x)]
        if cond_features is not None:  # the input conv's share of the concatenated [y_up, flag]
            hs[0] = hs[0] + cond_features
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if h.shape[-1] in self.attn_resolutions:
                    h = next(modules)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                if self.resblock_type == "ddpm":
                    h = next(modules)(hs[-1])
                else:
                    h = next(modules)(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(modules)(input_pyramid, h)  # Combine
                elif self.progressive_input == "residual":
                    input_pyramid = layerspp.rescaled_sum(
                        next(modules)(input_pyramid), h, self.skip_rescale
                    )
                    h = input_pyramid
                hs.append(h)

        h = next(modules)(hs[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        # Upsampling path.
        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in self.attn_resolutions:
                h = next(modules)(h)
            h, pyramid = self._progressive_output(modules, h, pyramid, i_level)
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = next(modules)(h)
                else:
                    h = next(modules)(h, temb)

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.act(next(modules)(h))
            h = next(modules)(h)
        if next(modules, None) is not None:
            raise RuntimeError("NCSNpp.forward left modules unused")
        if self.channels_last:
            h = to_memory_format(h, channels_last=False)  # (B, C, H, W) in the default layout

        if self.scale_by_sigma:
            # sigmas is float64 (the reference's buffer): divide in h's dtype, so the output
            # keeps the input's dtype instead of silently becoming float64.
            sigmas = used_sigmas.to(h.dtype).reshape(-1, *([1] * (h.dim() - 1)))
            if self.learn_sigma:  # v is a log-variance interpolation weight, not a score
                eps, v = h.chunk(2, dim=1)
                return torch.cat([eps / sigmas, v], dim=1)
            h = h / sigmas
        return h

    def _progressive_output(
        self, modules: Iterator[nn.Module], h: torch.Tensor, pyramid, i_level: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One level of the output pyramid: returns the (possibly replaced) h and the pyramid."""
        if self.progressive == "none":
            return h, pyramid
        top = i_level == self.num_resolutions - 1
        if self.progressive == "output_skip":
            # An image-space pyramid: upsample it and add this level's norm-act-conv output.
            if not top:
                pyramid = self.pyramid_upsample(pyramid)
            pyramid_h = self.act(next(modules)(h))
            pyramid_h = next(modules)(pyramid_h)
            return h, pyramid_h if top else pyramid + pyramid_h
        # residual: a feature pyramid that replaces h at every level.
        if top:
            pyramid = self.act(next(modules)(h))
            pyramid = next(modules)(pyramid)
            return h, pyramid
        pyramid = layerspp.rescaled_sum(next(modules)(pyramid), h, self.skip_rescale)
        return pyramid, pyramid
