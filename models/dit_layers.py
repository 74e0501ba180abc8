"""The layers of DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", Sec. 3).

Attribute names are those of the official implementation (facebookresearch/DiT ``models.py``), so
that its state dicts load with ``strict=True``: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table``, ``attn.qkv`` / ``attn.proj``, ``mlp.fc1`` / ``mlp.fc2``,
``adaLN_modulation.1``, ``final_layer.linear``. The patch embedding, attention and MLP, which the
official code takes from timm, are written here with the same parameters and arithmetic.

Shapes: B batch, T = (input_size / p)^2 tokens, D = hidden_size, p = patch_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.conditioning import drop_labels
from models.memory import CheckpointedBlock

#: Width of the sinusoidal timestep features fed to the timestep MLP (official value).
FREQUENCY_EMBEDDING_SIZE = 256


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       max_period: float = 10000.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal features [cos(t w_k), sin(t w_k)] of (possibly fractional) timesteps t (B,),
    with w_k = exp(-ln(max_period) k / (dim / 2)), k < dim / 2 (Vaswani et al. 2017, Sec. 3.5,
    in DiT's cos-first order).

    Computed in ``dtype`` (float32, as the official code). Returns (B, dim).
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=dtype)
    w = torch.exp(-math.log(max_period) * k / half)  # (dim / 2,)
    angles = t.to(dtype)[:, None] * w[None]  # (B, dim / 2)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of a grid_size x grid_size token grid (MAE's,
    He et al. 2022, which DiT uses), in float64.

    Token i sits at row r, column c = divmod(i, grid_size). Its first dim / 2 features encode c
    and the last dim / 2 encode r, each as [sin(pos w_k), cos(pos w_k)] with
    w_k = 10000^(-k / (dim / 4)), k < dim / 4.

    Returns:
        (grid_size^2, dim) float64.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    w = 1.0 / 10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, device=device, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")  # (G, G) each

    def encode(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate.reshape(-1, 1) * w  # (G^2, dim / 4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1)  # (G^2, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) * (1 + scale) + shift, with shift and scale (B, D) per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """Patchify: a p x p convolution with stride p, (B, C, H, W) -> (B, T, D), tokens row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, T, D)


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoidal features (B, 256) -> Linear-SiLU-Linear -> (B, D)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        # float32 features as the official code (float64 for a float64 network), then the MLP's.
        features = timestep_embedding(t, dtype=torch.promote_types(dtype, torch.float32))
        return self.mlp(features.to(dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D), with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``: the last is the null label.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``labels``; in training (and with a null row) each is dropped with probability
        ``dropout_prob``; where ``force_drop_ids == 1`` the null label is used instead."""
        if force_drop_ids is not None:
            if not self.dropout_prob > 0:
                raise ValueError("force_drop_ids needs a null label (class_dropout_prob > 0)")
            labels = torch.where(force_drop_ids == 1, torch.full_like(labels, self.num_classes),
                                 labels)
        elif train and self.dropout_prob > 0:
            labels = drop_labels(labels, self.dropout_prob, self.num_classes)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention softmax(q k^T / sqrt(d_head)) v with a fused qkv projection."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, d_head)
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(d_head)
        return self.proj(h.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(CheckpointedBlock, nn.Module):
    """A transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Sec. 3.2, Fig. 3):

        x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

    with the six (B, D) modulations regressed from the conditioning c by SiLU-Linear(D, 6 D).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) -> (B, T, D)."""
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) on a non-affine LayerNorm, then Linear(D, p^2 C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) -> (B, T, p^2 C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
