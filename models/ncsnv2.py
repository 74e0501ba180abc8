"""NCSNv2: the noise-unconditional RefineNet score network of Song & Ermon 2020.

"Improved techniques for training score-based generative models" (Song & Ermon 2020) drops the
noise conditioning of NCSN from the network and instead divides its output by sigma (their
technique 3: s(x, sigma) = s(x) / sigma). The network is a RefineNet: a dilated pre-activation
ResNet encoder, then RefineBlocks that fuse each encoder level with the coarser result, deepest
first. Three sizes are registered under the reference's names (yang-song/score_sde_pytorch,
``models/ncsnv2.py``): ``ncsnv2_64`` (images below 96 px, e.g. CIFAR-10), ``ncsnv2_128`` and
``ncsnv2_256``; they differ only in the list of encoder stages below.

Built from ``config.model``: ``nf``, ``nonlinearity``, ``normalization``, ``sigma_min``,
``sigma_max``, ``num_scales``, ``scale_by_sigma`` (default True: the reference always divides),
``interpolation`` (of the fusion blocks, default bilinear), and ``config.data``: ``centered``,
``image_size``, ``channels`` (read by the reference, set by none of its configs; we fall back to
``num_channels``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.conditioning import ClassConditional, read_class_dropout_prob, read_num_classes
from models.layers import get_act, get_sigmas
from models.memory import read_memory_options, set_grad_checkpoint, to_memory_format
from models.ncsn_layers import RefineBlock, ResidualBlock
from models.normalization import get_normalization
from models.utils import check_image_inputs, read_learn_sigma, register_model


class _Stage(NamedTuple):
    """One encoder level: two residual blocks, and the RefineBlock that decodes it."""

    name: str  # attribute name of the ModuleList of the two ResidualBlocks
    mult: int  # channels = mult * nf
    dilation: int
    refine: str  # attribute name of its RefineBlock


# Encoder stages, shallowest first. Every stage but the first starts with a 'down' block, which
# halves H and W when its dilation is 1 and keeps them (dilating instead) otherwise.
_STAGES = {
    "ncsnv2_64": (
        _Stage("res1", 1, 1, "refine4"),
        _Stage("res2", 2, 1, "refine3"),
        _Stage("res3", 2, 2, "refine2"),
        _Stage("res4", 2, 4, "refine1"),
    ),
    "ncsnv2_128": (
        _Stage("res1", 1, 1, "refine5"),
        _Stage("res2", 2, 1, "refine4"),
        _Stage("res3", 2, 1, "refine3"),
        _Stage("res4", 4, 2, "refine2"),
        _Stage("res5", 4, 4, "refine1"),
    ),
    "ncsnv2_256": (
        _Stage("res1", 1, 1, "refine5"),
        _Stage("res2", 2, 1, "refine4"),
        _Stage("res3", 2, 1, "refine3"),
        _Stage("res31", 2, 1, "refine31"),
        _Stage("res4", 4, 2, "refine2"),
        _Stage("res5", 4, 4, "refine1"),
    ),
}


def _data_channels(config) -> int:
    data = config.data
    channels = data.get("channels", None)
    num_channels = data.get("num_channels", None)
    if channels is None and num_channels is None:
        raise ValueError("config.data needs `channels` or `num_channels` for NCSNv2")
    if channels is not None and num_channels is not None and channels != num_channels:
        raise ValueError(
            f"config.data.channels ({channels}) and config.data.num_channels ({num_channels}) "
            "disagree"
        )
    return int(channels if channels is not None else num_channels)


@register_model("ncsnv2_64")
class NCSNv2(ClassConditional, nn.Module):
    """NCSNv2 (Song & Ermon 2020) score network: ``s(x, sigma_y) = net(x) / sigma_y``.

    This class is the reference's ``ncsnv2_64`` (images below 96 px: 4 encoder levels, two
    downsamplings); the larger sizes are subclasses that only change ``stages``.

    Args:
        config: ml_collections config (keys in the module docstring).

    Forward:
        x: (B, C, H, W) images, in [0, 1] unless ``config.data.centered`` (then [-1, 1]).
        y: (B,) integer indices into ``sigmas`` (the discrete VE label
            round((1 - t)(N - 1)), 0 = sigma_max).
        class_labels: must be None (NCSNv2 has no class conditioning; ``null_label`` is None).
        Returns the score (B, C, H, W) in x's dtype.
    """

    stages: tuple[_Stage, ...] = _STAGES["ncsnv2_64"]

    def __init__(self, config) -> None:
        super().__init__()
        stages = self.stages
        if read_num_classes(config):
            raise ValueError(
                f"{type(self).__name__} has no class conditioning; got config.model.num_classes="
                f"{config.model.num_classes!r} (use ncsnpp, ddpm or mlp)"
            )
        read_class_dropout_prob(config, num_classes=0)  # refuses label dropout
        self.learn_sigma = read_learn_sigma(config, type(self).__name__, supported=False)
        self.centered = bool(config.data.centered)
        self.scale_by_sigma = bool(config.model.get("scale_by_sigma", True))
        interpolation = config.model.get("interpolation", "bilinear")
        norm = get_normalization(config)
        self.nf = nf = config.model.nf
        self.channels = channels = _data_channels(config)
        self.act = act = get_act(config)
        self.register_buffer("sigmas", get_sigmas(config))  # (num_scales,) float64

        self.begin_conv = nn.Conv2d(channels, nf, 3, stride=1, padding=1)
        self.normalizer = norm(nf)
        self.end_conv = nn.Conv2d(nf, channels, 3, stride=1, padding=1)

        widths = [s.mult * nf for s in stages]
        in_ch = nf
        for i, (stage, width) in enumerate(zip(stages, widths)):
            first = ResidualBlock(
                in_ch,
                width,
                resample=None if i == 0 else "down",
                act=act,
                normalization=norm,
                # 28 px (MNIST-sized) pads before its last pooling, as in the reference.
                adjust_padding=config.data.image_size == 28 and i == len(stages) - 1,
                dilation=stage.dilation,
            )
            second = ResidualBlock(
                width, width, act=act, normalization=norm, dilation=stage.dilation
            )
            setattr(self, stage.name, nn.ModuleList([first, second]))
            in_ch = width

        # Decoder, deepest first: each RefineBlock fuses its level with the coarser result and
        # outputs the width of the next shallower level (nf at the top).
        refines = {}
        prev = None
        for i in reversed(range(len(stages))):
            in_planes = [widths[i]] if prev is None else [widths[i], prev]
            prev = widths[i - 1] if i > 0 else nf
            refines[stages[i].refine] = RefineBlock(
                in_planes,
                prev,
                act,
                start=len(in_planes) == 1,
                end=i == 0,
                interpolation=interpolation,
            )
        for name in sorted(refines):  # the reference declares them in name order
            setattr(self, name, refines[name])
        # Memory options (models.memory): recomputed residual and refine blocks, NHWC layout.
        self.grad_checkpoint, self.channels_last = read_memory_options(
            config, type(self).__name__)
        set_grad_checkpoint(self, self.grad_checkpoint)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score ``net(x) / sigma_y`` (B, C, H, W); arguments in the class docstring."""
        check_image_inputs(self, x, y, self.channels)
        self.class_embedding(class_labels, x.shape[0], x.device)  # refuses class labels
        if y.dtype.is_floating_point:
            raise TypeError(f"NCSNv2 takes integer noise-level indices y, got dtype {y.dtype}")
        if self.channels_last:
            x = to_memory_format(x, channels_last=True)
        h = x if self.centered else 2 * x - 1.0
        h = self.begin_conv(h)  # (B, nf, H, W)
        levels = []
        for stage in self.stages:
            for block in getattr(self, stage.name):
                h = block(h)
            levels.append(h)
        h = None
        for stage, level in zip(reversed(self.stages), reversed(levels)):
            xs = [level] if h is None else [level, h]
            h = getattr(self, stage.refine)(xs, level.shape[2:])
        h = self.end_conv(self.act(self.normalizer(h)))  # (B, C, H, W)
        if self.channels_last:
            h = to_memory_format(h, channels_last=False)
        if self.scale_by_sigma:
            # The float64 sigmas buffer divides in h's dtype: the output keeps x's dtype.
            h = h / self.sigmas[y].to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        return h


@register_model("ncsnv2_128")
class NCSNv2_128(NCSNv2):
    """NCSNv2 for 96-128 px images (5 encoder levels, widths up to 4 nf)."""

    stages = _STAGES["ncsnv2_128"]


@register_model("ncsnv2_256")
class NCSNv2_256(NCSNv2):
    """NCSNv2 for 129-256 px images (6 encoder levels, widths up to 4 nf)."""

    stages = _STAGES["ncsnv2_256"]
