"""The DDPM U-Net of Ho et al. 2020 ("Denoising diffusion probabilistic models"), as ported by the
reference implementation (yang-song/score_sde_pytorch, ``models/ddpm.py``).

A U-Net of ``ResnetBlockDDPM`` blocks (GroupNorm with 32 groups), self-attention at the
resolutions in ``attn_resolutions`` and a sinusoidal embedding of the time label fed to every
block through a two-layer MLP. For VP models the label is the discrete step t (N - 1) and the
network predicts the noise epsilon; ``models.utils.get_score_fn`` turns that into a score.

All layers live in one ``nn.ModuleList`` named ``all_modules``, in the order the forward pass uses
them, exactly as in the reference, so its state dicts (``all_modules.<i>.<...>``) and the
parameter order of its EMA lists carry over. As in the reference (and unlike the original DDPM),
the upsampling path has one attention block per resolution, after all of that level's blocks.

Built from ``config.model``: ``nf``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
``dropout``, ``resamp_with_conv``, ``conditional`` (must be True: the reference builds the time
embedding whatever it says), ``nonlinearity``, ``normalization`` (GroupNorm), ``scale_by_sigma``
with ``sigma_min``, ``sigma_max``, ``num_scales`` (the ``sigmas`` buffer), the optional
``num_classes``, ``grad_checkpoint`` and ``channels_last`` (``models.memory``); and
``config.data``: ``centered``, ``image_size``, ``num_channels``.

Class conditioning (ours, not the reference's): with ``config.model.num_classes = K > 0`` a label
embedding ``label_embedding`` with K + 1 rows is added to the time embedding; row K is the null
label used for unconditional passes (classifier-free guidance, Ho & Salimans 2022). With K absent
or 0 nothing is added, so unconditional state dicts are the reference's.
``config.model.class_dropout_prob`` drops labels to the null label in training mode.

Image conditioning (ours): ``config.model.cond_channels > 0`` adds ``cond_conv`` and
``cond_level_embed`` (:mod:`models.image_conditioning`), zero-initialised.

Learned variances (ours): ``config.model.learn_sigma = True`` doubles the output channels, the
next C after the noise prediction being improved DDPM's variance interpolation v (Nichol &
Dhariwal 2021, eq. 15). Absent or False, the model is exactly the reference's.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from models.conditioning import ClassConditional
from models.image_conditioning import ImageConditional, read_image_cond_options
from models.layers import (
    AttnBlock,
    Downsample,
    ResnetBlockDDPM,
    Upsample,
    ddpm_conv3x3,
    dense,
    get_act,
    get_sigmas,
    get_timestep_embedding,
)
from models.memory import read_memory_options, set_grad_checkpoint, to_memory_format
from models.utils import check_image_inputs, read_learn_sigma, register_model


def _level_positional(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (B, dim) of the augmentation level s (B,) in [0, 1], as of a time
    label 999 s."""
    return get_timestep_embedding(999 * level, dim)


@register_model("ddpm")
class DDPM(ClassConditional, ImageConditional, nn.Module):
    """DDPM noise-prediction U-Net (Ho et al. 2020), optionally class-conditional.

    Args:
        config: ml_collections config (keys in the module docstring).

    Forward:
        x: (B, C, H, W) input, in [-1, 1] if ``config.data.centered`` else [0, 1].
        labels: (B,) time labels (float t (N - 1) for discrete VP; integer indices into
            ``sigmas`` when ``scale_by_sigma``).
        class_labels: optional (B,) integer classes in [0, num_classes]; ``num_classes`` is the
            null label, used for every sample when None. Only for ``num_classes > 0``.
        cond_image, cond_level: optional (B, cond_channels, h, w) low-resolution image and its
            augmentation level (B,) in [0, 1] (``models.image_conditioning``); only for
            ``cond_channels > 0``, where None is the null conditioning.
        Returns (B, C, H, W) in x's dtype: the noise prediction (divided by sigma if
        ``scale_by_sigma``); (B, 2 C, H, W) with ``learn_sigma``, the next C channels the
        variance interpolation v (never divided by sigma).
    """

    def __init__(self, config) -> None:
        super().__init__()
        m = config.model
        if not m.conditional:
            raise ValueError(
                "DDPM is always conditioned on the time label (the reference builds the time "
                "embedding whatever config.model.conditional says); got conditional=False"
            )
        if m.get("normalization", "GroupNorm") != "GroupNorm":
            raise ValueError(
                f"DDPM uses GroupNorm; got config.model.normalization={m.normalization!r}"
            )
        self.act = act = get_act(config)
        self.register_buffer("sigmas", get_sigmas(config))  # (num_scales,) float64

        self.nf = nf = m.nf
        ch_mult = tuple(m.ch_mult)
        self.num_res_blocks = num_res_blocks = m.num_res_blocks
        attn_resolutions = tuple(m.attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        resolutions = [config.data.image_size // 2**i for i in range(num_resolutions)]
        # Whether each level has attention, fixed at build time (the reference tests h.shape[-1]
        # at run time, which agrees for the configured image size).
        self.level_attn = [res in attn_resolutions for res in resolutions]
        self.centered = bool(config.data.centered)
        self.scale_by_sigma = bool(m.scale_by_sigma)
        self.channels = channels = config.data.num_channels
        self.learn_sigma = read_learn_sigma(config, "ddpm")
        out_channels = 2 * channels if self.learn_sigma else channels
        temb_dim = 4 * nf

        resnet = functools.partial(ResnetBlockDDPM, act=act, temb_dim=temb_dim, dropout=m.dropout)
        modules: list[nn.Module] = [dense(nf, temb_dim), dense(temb_dim, temb_dim)]

        # Downsampling path; skip_channels records what each skip connection carries.
        input_conv = ddpm_conv3x3(channels, nf)
        modules.append(input_conv)
        skip_channels = [nf]
        in_ch = nf
        for level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[level]
                modules.append(resnet(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.level_attn[level]:
                    modules.append(AttnBlock(channels=in_ch))
                skip_channels.append(in_ch)
            if level != num_resolutions - 1:
                modules.append(Downsample(channels=in_ch, with_conv=m.resamp_with_conv))
                skip_channels.append(in_ch)

        # Middle: resnet, attention, resnet at the lowest resolution.
        modules += [resnet(in_ch=in_ch), AttnBlock(channels=in_ch), resnet(in_ch=in_ch)]

        # Upsampling path: one more block per level than on the way down, each eating a skip.
        for level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[level]
                modules.append(resnet(in_ch=in_ch + skip_channels.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.level_attn[level]:
                modules.append(AttnBlock(channels=in_ch))
            if level != 0:
                modules.append(Upsample(channels=in_ch, with_conv=m.resamp_with_conv))

        modules.append(nn.GroupNorm(num_groups=32, num_channels=in_ch, eps=1e-6))
        modules.append(ddpm_conv3x3(in_ch, out_channels, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)

        # Class conditioning (ours): label_embedding (num_classes + 1, 4 nf), null label last;
        # same name and initialisation as NCSN++'s.
        self._init_classes(config, temb_dim)
        # image conditioning (ours, models.image_conditioning), built last
        self._init_image_cond(**read_image_cond_options(config), input_conv=input_conv,
                              level_features=functools.partial(_level_positional, dim=nf),
                              features_dim=nf, temb_dim=temb_dim, act=get_act(config))
        # Memory options (models.memory): recomputed blocks, NHWC layout (create_model converts
        # the parameters; forward converts the input).
        self.grad_checkpoint, self.channels_last = read_memory_options(config, "ddpm")
        set_grad_checkpoint(self, self.grad_checkpoint)

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        cond_image: torch.Tensor | None = None,
        cond_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise prediction (B, C, H, W) at x for time labels (B,); see the class docstring."""
        check_image_inputs(self, x, labels, self.channels)
        if self.channels_last:
            x = to_memory_format(x, channels_last=True)
        modules = iter(self.all_modules)
        # Computed in float32 as the reference, then in the network's dtype.
        temb = get_timestep_embedding(labels, self.nf).to(x.dtype)  # (B, nf)
        temb = next(modules)(temb)
        temb = next(modules)(self.act(temb))  # (B, 4 nf)
        class_emb = self.class_embedding(class_labels, x.shape[0], x.device)
        if class_emb is not None:
            temb = temb + class_emb
        cond_features, level_emb = self.image_cond_terms(x, cond_image, cond_level)
        if level_emb is not None:
            temb = temb + level_emb

        h = x if self.centered else 2 * x - 1.0
        hs = [next(modules)(h)]  # (B, nf, H, W)
        if cond_features is not None:  # the input conv's share of the concatenated [y_up, flag]
            hs[0] = hs[0] + cond_features
        for level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self.level_attn[level]:
                    h = next(modules)(h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(next(modules)(hs[-1]))  # (B, C, H / 2, W / 2)

        h = next(modules)(hs[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        for level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.level_attn[level]:
                h = next(modules)(h)
            if level != 0:
                h = next(modules)(h)  # (B, C, 2 H, 2 W)

        h = self.act(next(modules)(h))
        h = next(modules)(h)  # (B, C, H, W), or (B, 2 C, H, W) with learn_sigma
        if self.channels_last:
            h = to_memory_format(h, channels_last=False)

        if self.scale_by_sigma:
            if labels.dtype.is_floating_point:
                raise TypeError(
                    f"scale_by_sigma needs integer labels indexing sigmas, got {labels.dtype}"
                )
            # The float64 sigmas buffer divides in h's dtype: the output keeps x's dtype.
            sigmas = self.sigmas[labels].to(h.dtype).view(-1, 1, 1, 1)
            if self.learn_sigma:  # v is a log-variance interpolation weight, not a score
                eps, v = h.chunk(2, dim=1)
                return torch.cat([eps / sigmas, v], dim=1)
            h = h / sigmas
        return h
