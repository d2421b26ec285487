"""Ensembles: several networks trained alike from different seeds, or one network shown a photo at several scales, used as one model.

Each member trains as an ordinary run in the ensemble's `members/I/` folder. The ensemble's own
checkpoint holds every member's best weights; it embeds a photo as the members' unit embeddings side by
side (scaled to unit length, so a cosine similarity is the mean of the members'), or, for softmax,
averages the members' probabilities. Test-time scales combine the same way, one view per scale.
Catalogue, threshold, submit and the review app see one model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

MEMBERS_DIR = "members"


def combine(outputs: list[torch.Tensor], method: str) -> torch.Tensor:
    """Several views' outputs as one: concatenated unit embeddings over sqrt(views) (arcface), or the log of mean probabilities (softmax)."""
    if method == "arcface":
        return torch.cat([F.normalize(o, dim=1) for o in outputs], dim=1) / math.sqrt(len(outputs))
    log_probs = torch.stack([F.log_softmax(o, dim=1) for o in outputs])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


class Ensemble(nn.Module):
    """Members' outputs combined (see `combine`)."""

    def __init__(self, members: list[nn.Module], method: str):
        super().__init__()
        self.members, self.method = nn.ModuleList(members), method

    def forward(self, x):
        return combine([m(x).float() for m in self.members], self.method)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) times `scale`, each rounded to a multiple of 8 pixels (at least 8)."""
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)


class MultiScale(nn.Module):
    """A trained model shown each photo resized by every one of `scales`, the views' outputs combined (see `combine`).

    Each scale is another view of the photo, as each member of an ensemble is another network: on the
    real flukes one network's retrieval rose from 0.433 to 0.473 with scales 6/7, 1 and 8/7
    (bench/RESULTS.md). It wraps a loaded model and holds no weights of its own, so checkpoints do not change.
    """

    def __init__(self, model: nn.Module, scales: tuple[float, ...], method: str):
        super().__init__()
        self.model, self.scales, self.method = model, tuple(scales), method

    def forward(self, x):
        size = tuple(x.shape[-2:])
        views = [x if s == 1 else F.interpolate(x, size=scaled_size(size, s), mode="bilinear", antialias=s < 1, align_corners=False) for s in self.scales]
        return combine([self.model(v).float() for v in views], self.method)


def with_test_scales(model: nn.Module, cfg) -> nn.Module:
    """`model` as inference uses it: wrapped in MultiScale where the run has test-time scales other than 1."""
    return model if cfg.tta_scales == (1.0,) else MultiScale(model, cfg.tta_scales, cfg.method)


def member_config(cfg, index: int):
    """The FitConfig of member `index` of an ensemble run: the same settings, seed + index, in RUN/members/INDEX/."""
    return replace(cfg, members=1, seed=cfg.seed + index, name=str(index), models_dir=str(cfg.run_dir / MEMBERS_DIR))
