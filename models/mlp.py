"""A small time-conditioned MLP score network for low-dimensional data (2-D toys, mixtures).

It takes the same ``(x, labels)`` as the reference's U-Nets, so ``models.utils.get_score_fn``
works unchanged:

* ``embedding_type = 'positional'`` (VP / sub-VP): labels are ``999 t`` (continuous) or
  ``(N - 1) t`` (discrete); sinusoidal embedding of the label; the output is a noise prediction.
* ``embedding_type = 'fourier'`` (VE, continuous): labels are ``sigma(t)``; Gaussian Fourier
  features of ``log sigma`` (non-trainable ``W``, as NCSN++); the output is the score, divided
  by ``sigma`` when ``scale_by_sigma`` (as NCSN++).

Config keys (defaults after the key):
    data.dim             data dimension D (required; the key ``datasets`` uses for point data)
    data.centered        True; if False, inputs in [0, 1] are mapped to [-1, 1] (as the U-Nets)
    model.nf             128, hidden width
    model.num_layers     3, residual blocks
    model.embedding_type 'positional' or 'fourier' (required, as in the reference configs)
    model.fourier_scale  16.0, std of the Fourier frequencies
    model.nonlinearity   required: elu, relu, lrelu or swish
    model.scale_by_sigma False; needs 'fourier' (the label is sigma)
    model.num_classes    0 (unconditional); K > 0 adds a class embedding with K + 1 rows, the
                         last one (index K, ``model.null_label``; None when K = 0) the reserved
                         "no class" label used when ``class_labels`` is None (classifier-free
                         guidance)
    model.class_dropout_prob  0; in training mode each label becomes the null label with this
                         probability (label dropout for classifier-free guidance)
    model.learn_sigma    False (True is refused: the MLP has no learned-variance output)
    model.grad_checkpoint, model.channels_last  False (True is refused, ``models.memory``)
"""

from __future__ import annotations

import torch
from torch import nn

from models.conditioning import ClassConditional
from models.layers import dense, get_act, get_timestep_embedding
from models.layerspp import GaussianFourierProjection
from models.memory import read_memory_options
from models.utils import read_learn_sigma, register_model

_EMBEDDINGS = ("fourier", "positional")


class ResidualBlock(nn.Module):
    """``h + Dense_1(act(Dense_0(act(h)) + Dense_emb(emb)))``: one conditioned MLP block."""

    def __init__(self, width: int, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.Dense_0 = dense(width, width)
        self.Dense_emb = dense(width, width)
        self.Dense_1 = dense(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h, emb (B, width) -> (B, width)."""
        return h + self.Dense_1(self.act(self.Dense_0(self.act(h)) + self.Dense_emb(emb)))


@register_model("mlp")
class MLP(ClassConditional, nn.Module):
    """Time-conditioned residual MLP on vectors (B, D); config keys in the module docstring.

    Args:
        config: an ml_collections config with ``data`` and ``model`` sections.
    """

    def __init__(self, config) -> None:
        super().__init__()
        data, model = config.data, config.model
        dim = data.get("dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(
                f"MLP needs data.dim (an integer >= 1, the point dimension), got {dim!r}"
            )
        self.dim = dim
        self.learn_sigma = read_learn_sigma(config, "mlp", supported=False)
        read_memory_options(config, "mlp", grad_checkpoint=False, channels_last=False,
                            why="; the MLP is too small to need either")
        self.centered = bool(data.get("centered", True))
        nf = int(model.get("nf", 128))
        num_layers = int(model.get("num_layers", 3))
        if nf < 4 or num_layers < 0:
            raise ValueError(
                f"MLP needs model.nf >= 4 and model.num_layers >= 0, got nf={nf}, "
                f"num_layers={num_layers}"
            )
        self.nf = nf
        self.embedding_type = str(model.embedding_type).lower()
        if self.embedding_type not in _EMBEDDINGS:
            raise ValueError(
                f"Unknown embedding_type {model.embedding_type!r}; valid: {', '.join(_EMBEDDINGS)}"
            )
        self.scale_by_sigma = bool(model.get("scale_by_sigma", False))
        if self.scale_by_sigma and self.embedding_type != "fourier":
            raise ValueError(
                "model.scale_by_sigma needs embedding_type='fourier' (labels are sigma); "
                f"got embedding_type={self.embedding_type!r}"
            )
        act = get_act(config)
        if self.embedding_type == "fourier":
            self.embed = GaussianFourierProjection(nf // 2, float(model.get("fourier_scale", 16.0)))
            emb_in = 2 * (nf // 2)
        else:
            self.embed = None
            emb_in = nf
        self.emb_mlp = nn.Sequential(dense(emb_in, nf), act, dense(nf, nf))
        # Row num_classes is the reserved null ("unconditional") label (models.conditioning).
        self._init_classes(config, nf)
        self.Dense_in = dense(dim, nf)
        self.blocks = nn.ModuleList(ResidualBlock(nf, act) for _ in range(num_layers))
        self.act = act
        self.Dense_out = dense(nf, dim)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Noise prediction (positional) or score (fourier) at ``x`` for the given labels.

        Args:
            x: (B, D), or (B, *S) with prod(S) = D (flattened, and the output reshaped back).
            labels: (B,) time labels in the reference's convention (999 t, (N - 1) t or sigma).
            class_labels: (B,) int64 in [0, num_classes]; None means the null label. Only for
                ``num_classes > 0``.
        Returns:
            Tensor shaped like ``x``.
        """
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        if labels.shape != x.shape[:1]:
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        h = x.reshape(x.shape[0], self.dim)  # (B, D)
        if not self.centered:
            h = 2 * h - 1
        if self.embed is not None:
            emb = self.embed(torch.log(labels.to(x.dtype)))
        else:
            emb = get_timestep_embedding(labels, self.nf).to(x.dtype)
        emb = self.emb_mlp(emb)  # (B, nf)
        class_emb = self.class_embedding(class_labels, x.shape[0], x.device)  # (B, nf) or None
        if class_emb is not None:
            emb = emb + class_emb
        h = self.Dense_in(h)
        for block in self.blocks:
            h = block(h, emb)
        out = self.Dense_out(self.act(h))  # (B, D)
        if self.scale_by_sigma:
            out = out / labels.to(out.dtype)[:, None]
        return out.reshape(x.shape)
