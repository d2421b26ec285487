"""ArcFace with a margin per class that falls with the class's number of photos (training only: it loads pytorch-metric-learning).

Happywhale 2022's first place: m(n) = a * n^-lambda + b, so a whale seen once is pushed furthest from
the others, one seen often less (its many photos already spread its centre).
"""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss


def class_margins(counts, margin: float, power: float, floor: float) -> torch.Tensor:
    """Margins in radians: `margin` for a class of one photo, falling as n^-power towards `floor` (power 0: `margin` for all)."""
    n = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1)
    return floor + (margin - floor) * n.pow(-power)


class _PerClassMargin:
    """Mixin for pytorch-metric-learning's ArcFace losses: the margin of each row's target class instead of one margin."""

    def set_margins(self, margins: torch.Tensor) -> None:
        self.register_buffer("margins", margins.float(), persistent=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._row_margins = self.margins.to(embeddings.device)[labels].to(embeddings.dtype)
        return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        m = self._row_margins
        angles = self.get_angles(cosine_of_target_classes)
        # Past pi - m, cos(theta + m) would rise again; this keeps the logit falling with the angle, as ArcFaceLoss does.
        return torch.where(angles <= math.pi - m, torch.cos(angles + m), torch.cos(angles) - m * torch.sin(m))


class DynamicArcFaceLoss(_PerClassMargin, ArcFaceLoss):
    """ArcFaceLoss with per-class margins (radians)."""

    def __init__(self, margins: torch.Tensor, **kwargs):
        super().__init__(num_classes=len(margins), margin=0.0, **kwargs)
        self.set_margins(margins)


class DynamicSubCenterArcFaceLoss(_PerClassMargin, SubCenterArcFaceLoss):
    """SubCenterArcFaceLoss with per-class margins (radians)."""

    def __init__(self, margins: torch.Tensor, **kwargs):
        super().__init__(num_classes=len(margins), margin=0.0, **kwargs)
        self.set_margins(margins)
