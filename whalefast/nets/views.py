"""The views a network's outputs are combined over: ensemble members, test-time scales, the mirror image.

Each member of an ensemble is another network, each scale another view of the photo: their outputs
combine as one, by the method's rule (`concatenate_unit` for embeddings, `average_probabilities` for a
classifier). Catalogue, threshold, submit and the review app see one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from whalefast.core.images import scaled_size

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


def concatenate_unit(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Embeddings of several views as one: their unit vectors side by side over sqrt(views), so a cosine similarity is the mean of the views'."""
    return torch.cat([F.normalize(o, dim=1) for o in outputs], dim=1) / math.sqrt(len(outputs))


def average_probabilities(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A classifier's logits over several views as one: the log of the views' mean probabilities."""
    log_probs = torch.stack([F.log_softmax(o, dim=1) for o in outputs])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


class Ensemble(nn.Module):
    """Networks trained alike from different seeds, their outputs combined by `combine`."""

    def __init__(self, members: list[nn.Module], combine: Combine):
        super().__init__()
        self.members, self.combine = nn.ModuleList(members), combine

    def forward(self, x):
        return self.combine([m(x).float() for m in self.members])


class Views(nn.Module):
    """A trained network shown each photo resized by each of `scales` (outputs combined by `combine`); with `mirror` its mirror image too (averaged in), with `mirror_view` its mirror image as a view of its own (combined).

    It holds no weights of its own, so checkpoints do not change. On the real flukes one network's
    retrieval rose from 0.433 to 0.473 with scales 6/7, 1 and 8/7 (bench/RESULTS.md).
    """

    def __init__(self, model: nn.Module, scales: tuple[float, ...] = (1.0,), mirror: bool = False, combine: Combine | None = None, mirror_view: bool = False):
        super().__init__()
        self.model, self.scales, self.mirror, self.combine, self.mirror_view = model, tuple(scales), mirror, combine, mirror_view
        if (self.scales != (1.0,) or mirror_view) and combine is None:
            raise ValueError("several views need a rule to combine their outputs")

    def forward(self, x):
        out = self._at_scales(x)
        if self.mirror:
            out = (out + self._at_scales(x.flip(3))) / 2
        if self.mirror_view:
            out = self.combine([out, self._at_scales(x.flip(3))])
        return out

    def _at_scales(self, x):
        if self.scales == (1.0,):
            return self.model(x).float()
        size = tuple(x.shape[-2:])
        views = [x if s == 1 else F.interpolate(x, size=scaled_size(size, s), mode="bilinear", antialias=s < 1, align_corners=False) for s in self.scales]
        return self.combine([self.model(v).float() for v in views])
