"""DiT, the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers"), compatible with the official checkpoints (facebookresearch/DiT).

The input (B, C, H, W) (the SD-VAE latent in the paper: C = 4, H = image_size / 8) is cut into
p x p patches, embedded as T = (H / p)^2 tokens of width D plus a fixed 2-D sin-cos position
embedding, and run through ``depth`` transformer blocks conditioned by adaLN-Zero on
c = t_emb + y_emb (timestep and class). The final layer maps each token back to a p x p patch
of ``out_channels`` = C (epsilon), or 2 C with ``learn_sigma`` (epsilon, then improved DDPM's
variance interpolation v, Nichol & Dhariwal 2021, eq. 15).

* Official constructor, state-dict keys, parameter order and initialisation: ``DiT(**kwargs)``
  with the official keyword arguments; :func:`build_dit` for the named sizes ('DiT-XL/2', ...).
* The toolkit's registry: ``config.model.name = 'dit'`` with ``config.model.patch_size,
  hidden_size, depth, num_heads`` (required), ``mlp_ratio`` (4.0), ``num_classes`` (0:
  unconditional), ``class_dropout_prob`` (0.1, the official default, when there are classes),
  ``learn_sigma`` (False), ``grad_checkpoint`` (False: recompute each block in the backward
  pass, ``models.memory``; ``channels_last`` is refused); input_size =
  ``config.data.image_size``, in_channels = ``config.data.num_channels``;
  ``config.data.centered`` must be True (DiT takes its input as given). The time label is the
  discrete timestep t in [0, N - 1] (fractional allowed).
* Class labels: K = ``num_classes``; with label dropout (``class_dropout_prob > 0``) the
  embedding has K + 1 rows and ``null_label`` = K; without, ``null_label`` is None and ``y`` is
  required. ``num_classes = 0`` builds an unconditional DiT (no ``y_embedder``).
* Image conditioning (ours, :mod:`models.image_conditioning`): ``cond_channels > 0`` adds
  ``cond_conv``, a zero-initialised patch convolution over the upsampled low-resolution image and
  its flag, added to the patch embedding, and ``cond_level_embed`` (DiT's timestep features of
  999 s, then a zero-ended MLP) added to c; built after the official initialisation, so the
  official modules are initialised as without.
"""

from __future__ import annotations

import torch
from torch import nn

from models.conditioning import read_class_dropout_prob, read_num_classes
from models.dit_layers import (
    FREQUENCY_EMBEDDING_SIZE,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    timestep_embedding,
)
from models.image_conditioning import ImageConditional, read_image_cond_options
from models.memory import read_memory_options, set_grad_checkpoint
from models.utils import read_learn_sigma, register_model

#: Official named sizes (Peebles & Xie 2023, Table 1): depth, hidden size, heads; patch 2, 4, 8.
_WIDTHS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_SIZES: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": hidden, "num_heads": heads,
                            "patch_size": patch}
    for size, (depth, hidden, heads) in _WIDTHS.items()
    for patch in (2, 4, 8)
}
#: Keys of ``config.model`` a config-built DiT needs (no defaults: an absent key would otherwise
#: silently build DiT-XL/2).
_REQUIRED_KEYS = ("patch_size", "hidden_size", "depth", "num_heads")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DiT: {name} must be an integer >= 1, got {value!r}")
    return value


class DiT(ImageConditional, nn.Module):
    """Diffusion transformer (Peebles & Xie 2023) with the official constructor and state dict.

    Args:
        input_size: H = W of the input (32 for 256 px images in the SD-VAE latent).
        patch_size: p; input_size must be divisible by it.
        in_channels: C.
        hidden_size: D, divisible by num_heads and by 4 (for the 2-D sin-cos embedding).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        class_dropout_prob: label dropout probability in training mode, in [0, 1); > 0 adds the
            null label (row ``num_classes`` of the label table).
        num_classes: K (0: unconditional, no label embedder).
        learn_sigma: output 2 C channels (epsilon, then v) instead of C.
        cond_channels, cond_upsample, cond_dropout_prob: image conditioning (ours; 0: none).

    Call: ``model(x (B, C, H, W), t (B,), y (B,) or None, cond_image=None, cond_level=None)
    -> (B, out_channels, H, W)``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        cond_channels: int = 0,
        cond_upsample: str = "bicubic",
        cond_dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size),
                            ("in_channels", in_channels), ("hidden_size", hidden_size),
                            ("depth", depth), ("num_heads", num_heads)):
            _positive_int(name, value)
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size {input_size} must be divisible by patch_size "
                             f"{patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"DiT: hidden_size {hidden_size} must be divisible by num_heads "
                             f"{num_heads} and by 4")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"DiT: num_classes must be an integer >= 0, got {num_classes!r}")
        if not 0 <= class_dropout_prob < 1:
            raise ValueError(f"DiT: class_dropout_prob must be in [0, 1), got "
                             f"{class_dropout_prob!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"DiT: mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not isinstance(learn_sigma, bool):
            raise ValueError(f"DiT: learn_sigma must be True or False, got {learn_sigma!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = float(class_dropout_prob) if num_classes else 0.0

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, self.class_dropout_prob)
                           if num_classes else None)
        num_patches = (input_size // patch_size) ** 2
        # Fixed, not trained, but a Parameter (in the official state dict and parameter count).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self._init_image_cond(cond_channels=cond_channels, cond_upsample=cond_upsample,
                              cond_dropout_prob=cond_dropout_prob,
                              input_conv=self.x_embedder.proj, level_features=_level_features,
                              features_dim=FREQUENCY_EMBEDDING_SIZE, temb_dim=hidden_size,
                              act=nn.SiLU())

    @classmethod
    def from_config(cls, config) -> DiT:
        """A DiT from the toolkit's ml_collections config (keys in the module docstring).

        Raises:
            ValueError: a missing required key, a bad value, or ``data.centered = False``.
        """
        m = config.model
        missing = [k for k in _REQUIRED_KEYS if m.get(k, None) is None]
        if missing:
            raise ValueError(
                f"model.name = 'dit' needs config.model.{', '.join(missing)}; e.g. DiT-S/2: "
                f"{DIT_SIZES['DiT-S/2']}"
            )
        if not config.data.get("centered", True):
            raise ValueError("dit takes its input as given (no [0, 1] -> [-1, 1] shift): set "
                             "config.data.centered = True")
        num_classes = read_num_classes(config)
        # channels_last is refused: DiT works on tokens (B, T, D); its one convolution (the
        # patch embedding) has stride = kernel = p and gains nothing from NHWC.
        grad_checkpoint, _ = read_memory_options(
            config, "dit", channels_last=False,
            why="; DiT is a transformer on (B, T, D) tokens")
        model = cls(
            input_size=config.data.image_size,
            patch_size=m.patch_size,
            in_channels=config.data.num_channels,
            hidden_size=m.hidden_size,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_ratio=float(m.get("mlp_ratio", 4.0)),
            class_dropout_prob=read_class_dropout_prob(config, num_classes,
                                                       default=0.1 if num_classes else 0.0),
            num_classes=num_classes,
            learn_sigma=read_learn_sigma(config, "dit"),
            **read_image_cond_options(config),
        )
        set_grad_checkpoint(model, grad_checkpoint)  # the DiT blocks (models.memory)
        return model

    @property
    def null_label(self) -> int | None:
        """The null ("no class") label K, or None without classes or without label dropout."""
        return self.num_classes if self.num_classes and self.class_dropout_prob > 0 else None

    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform Linear weights (the patch conv's on its
        flattened view), zero biases, N(0, 0.02) label table and timestep-MLP weights, the fixed
        sin-cos ``pos_embed``, and zero adaLN modulations and final linear (adaLN-Zero, Peebles
        & Xie 2023, Sec. 3.2): a fresh model outputs zeros."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid_size = self.input_size // self.patch_size
        pos_embed = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_size,
                                        device=self.pos_embed.device)
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed[None].to(self.pos_embed.dtype))
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for zeroed in (*(b.adaLN_modulation[-1] for b in self.blocks),
                       self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, p^2 C_out) -> image (B, C_out, H, W)."""
        p, c = self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (B, row, col, p_row, p_col, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, g * p, g * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        shape = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"DiT: x must be (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if t.shape != (batch,) or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"DiT: t must be real timesteps of shape ({batch},) to match x, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if y is None:
            if self.num_classes and self.null_label is None:
                raise ValueError(
                    f"DiT: y (class_labels) is required: this model has {self.num_classes} "
                    "classes and no null label (class_dropout_prob = 0)"
                )
            return
        if not self.num_classes:
            raise ValueError("DiT: y (class_labels) given to an unconditional DiT "
                             "(num_classes = 0)")
        top = self.num_classes if self.null_label is not None else self.num_classes - 1
        if y.shape != (batch,) or y.is_floating_point() or y.is_complex() \
                or y.dtype == torch.bool:
            raise ValueError(f"DiT: y (class_labels) must be integers in [0, {top}] of shape "
                             f"({batch},), got {y.dtype} {tuple(y.shape)}")
        # The range check reads the values: on CPU only, where it costs no device sync (on an
        # accelerator the embedding lookup itself fails on a bad index).
        if y.device.type == "cpu" and batch and (int(y.min()) < 0 or int(y.max()) > top):
            raise ValueError(f"DiT: y (class_labels) must be in [0, {top}], got values in "
                             f"[{int(y.min())}, {int(y.max())}]")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                class_labels: torch.Tensor | None = None, cond_image: torch.Tensor | None = None,
                cond_level: torch.Tensor | None = None) -> torch.Tensor:
        """The DiT output at noisy inputs x and timesteps t (Peebles & Xie 2023, Fig. 3).

        Args:
            x: (B, C, H, W) noisy inputs (latents).
            t: (B,) timesteps in [0, N - 1], float (fractional allowed) or integer.
            y: (B,) integer class labels in [0, K]; K (``null_label``) or None means
                unconditional. In training mode each label is dropped to K with probability
                ``class_dropout_prob``.
            class_labels: the toolkit's keyword for y (``models.utils.get_model_fn`` binds
                labels by that name); give y or class_labels, not both.
            cond_image, cond_level: (B, cond_channels, h, w) low-resolution image and its
                augmentation level (B,) in [0, 1] (``models.image_conditioning``).
        Returns:
            (B, out_channels, H, W) in the network's dtype: epsilon, then v with ``learn_sigma``.
        """
        if class_labels is not None:
            if y is not None:
                raise ValueError("DiT: give the class labels as y or as class_labels, not both")
            y = class_labels
        self._check_inputs(x, t, y)
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t)  # (B, D)
        cond_features, level_emb = self.image_cond_terms(x, cond_image, cond_level)
        if cond_features is not None:  # (B, D, H / p, W / p) -> (B, T, D), as the patches
            h = h + cond_features.flatten(2).transpose(1, 2)
            c = c + level_emb
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device)
            c = c + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, T, p^2 C_out)
        return self.unpatchify(h)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance as the official DiT sampler computes it (Ho & Salimans 2022,
        eq. 6: eps = eps_uncond + s (eps_cond - eps_uncond)).

        The batch is [conditional half; unconditional half] (y holding the null label in the
        second half); the FIRST half of x is run for both halves. Guidance is applied to output
        channels 0-2 only and written to both halves; channels 3 onward (a 4th epsilon channel,
        v) are each half's own output, as in the released code.

        Args:
            x: (2 B, C, H, W); only x[:B] is used.
            t: (2 B,) timesteps; y: (2 B,) labels; cfg_scale: the guidance scale s.
        Returns:
            (2 B, out_channels, H, W).
        Raises:
            ValueError: fewer than 3 epsilon channels, or an odd batch.
        """
        if self.in_channels < 3:
            raise ValueError(f"DiT.forward_with_cfg guides output channels 0-2 (the official "
                             f"convention), but this model has {self.in_channels} epsilon "
                             "channel(s)")
        if x.dim() != 4 or x.shape[0] % 2:
            raise ValueError(f"DiT.forward_with_cfg needs an even batch [cond; uncond], got x "
                             f"{tuple(x.shape)}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        eps_cond, eps_uncond = eps.chunk(2)
        guided = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def dit_kwargs(name: str, **overrides) -> dict:
    """The official constructor arguments of the named size ``name`` (e.g. 'DiT-XL/2', Peebles
    & Xie 2023, Table 1), updated with ``overrides`` (e.g. input_size, num_classes).

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    if name not in DIT_SIZES:
        raise ValueError(f"Unknown DiT size {name!r}; valid: {', '.join(DIT_SIZES)}")
    return {**DIT_SIZES[name], **overrides}


def build_dit(name: str, **overrides) -> DiT:
    """The DiT of the named size ``name`` with the official defaults (input 32, 4 channels,
    1000 classes, learned sigma) updated by ``overrides``; see :func:`dit_kwargs`."""
    return DiT(**dit_kwargs(name, **overrides))


def dit_parameter_count(name: str, **overrides) -> int:
    """Number of parameters (all of them, ``pos_embed`` included) of :func:`build_dit`'s model,
    counted on the meta device (nothing allocated: DiT-XL/2 has 675,129,632)."""
    with torch.device("meta"):
        model = build_dit(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def _level_features(level: torch.Tensor) -> torch.Tensor:
    """DiT's timestep features (B, 256) of the augmentation level s (B,) in [0, 1], as of the
    timestep 999 s."""
    return timestep_embedding(999 * level)


@register_model("dit")
def dit_from_config(config) -> DiT:
    """The registry's builder for ``config.model.name = 'dit'``: :meth:`DiT.from_config`."""
    return DiT.from_config(config)
