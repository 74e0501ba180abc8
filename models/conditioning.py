"""Class conditioning of the score networks: a label embedding with a reserved null label.

For classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance") one network
learns the conditional scores and, under a reserved "null" label, the unconditional one. With
``config.model.num_classes = K > 0`` a model holds ``label_embedding``, an ``nn.Embedding(K + 1,
dim)`` whose last row (index K) is the null label; its output is added to the time embedding. With
K absent or 0 nothing is added, so the state dict is the reference's (yang-song/score_sde_pytorch).

Label dropout (Ho & Salimans 2022, Alg. 1; DiT's ``LabelEmbedder``): with
``config.model.class_dropout_prob = p`` (default 0, none) the model itself replaces each label by
the null label with probability p in training mode, so the training loop needs no guidance logic.

One rule on every registered model: ``model.num_classes`` is K (0 when unconditional) and
``model.null_label`` is K, or None when the model has no classes (or, for an official DiT built
without label dropout, no null row).
"""

from __future__ import annotations

import torch
from torch import nn


def read_num_classes(config) -> int:
    """``config.model.num_classes`` (0 when absent or None), checked to be an integer >= 0."""
    value = config.model.get("num_classes", 0)
    value = 0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.model.num_classes must be an integer >= 0, got {value!r}")
    return value


def read_class_dropout_prob(config, num_classes: int, default: float = 0.0) -> float:
    """``config.model.class_dropout_prob`` (``default`` when absent or None), checked to be in
    [0, 1).

    Raises:
        ValueError: a value outside [0, 1), or a positive value for a model without classes.
    """
    value = config.model.get("class_dropout_prob", None)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"config.model.class_dropout_prob must be a number in [0, 1), got {value!r}"
        )
    if value and not num_classes:
        raise ValueError(
            f"config.model.class_dropout_prob = {value} needs classes to drop: set "
            "config.model.num_classes > 0 (or class_dropout_prob = 0)"
        )
    return float(value)


def drop_labels(labels: torch.Tensor, p: float, null_label: int) -> torch.Tensor:
    """``labels`` (B,) with each entry replaced by ``null_label`` with probability ``p``.

    Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): the network learns the
    unconditional score under the null label. Uses the global torch RNG, as ``nn.Dropout``.
    """
    drop = torch.rand(labels.shape, device=labels.device) < p  # (B,) bool
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class ClassConditional:
    """Mixin for the score networks: ``num_classes``, ``null_label`` and the class embedding.

    A model calls :meth:`_init_classes` in ``__init__`` (where its ``label_embedding`` belongs in
    the parameter order) and adds :meth:`class_embedding` to its time embedding in ``forward``.
    """

    num_classes: int = 0
    class_dropout_prob: float = 0.0

    def _init_classes(self, config, dim: int) -> None:
        """Read ``config.model.num_classes`` and, if > 0, build ``label_embedding`` (K + 1, dim);
        read ``config.model.class_dropout_prob`` (label dropout in training mode)."""
        self.num_classes = read_num_classes(config)
        self.class_dropout_prob = read_class_dropout_prob(config, self.num_classes)
        if self.num_classes:
            # Default N(0, 1) init; row num_classes is the null label.
            self.label_embedding = nn.Embedding(self.num_classes + 1, dim)

    @property
    def null_label(self) -> int | None:
        """The reserved "no class" index (``num_classes``); None for an unconditional model."""
        return self.num_classes if self.num_classes else None

    def class_embedding(
        self, class_labels: torch.Tensor | None, batch_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """Embedding (B, dim) of integer ``class_labels`` (B,), the null label where None.

        In training mode each label is replaced by the null label with probability
        ``class_dropout_prob`` (label dropout for classifier-free guidance).
        Returns None for an unconditional model, which refuses ``class_labels``.
        """
        if not self.num_classes:
            if class_labels is not None:
                raise ValueError(
                    f"class_labels given to an unconditional {type(self).__name__} "
                    "(config.model.num_classes = 0)"
                )
            return None
        if class_labels is None:
            class_labels = torch.full((batch_size,), self.num_classes, device=device)
            return self.label_embedding(class_labels)
        if (
            class_labels.shape != (batch_size,)
            or class_labels.is_floating_point()
            or class_labels.dtype == torch.bool
        ):
            raise ValueError(
                f"class_labels must be integers in [0, {self.num_classes}] of shape "
                f"({batch_size},), got {class_labels.dtype} {tuple(class_labels.shape)}"
            )
        if self.training and self.class_dropout_prob > 0:
            class_labels = drop_labels(class_labels, self.class_dropout_prob, self.num_classes)
        return self.label_embedding(class_labels)
