"""Ensembles: a run of several networks trained alike from different seeds, used as one model.

Each member trains as an ordinary run in the ensemble's `members/I/` folder. The ensemble's own
checkpoint holds every member's best weights; it embeds a photo as the members' unit embeddings side by
side (scaled to unit length, so a cosine similarity is the mean of the members'), or, for softmax,
averages the members' probabilities. Catalogue, threshold, submit and the review app see one model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

MEMBERS_DIR = "members"


class Ensemble(nn.Module):
    """Members' outputs combined: concatenated unit embeddings over sqrt(members) (arcface), or the log of mean probabilities (softmax)."""

    def __init__(self, members: list[nn.Module], method: str):
        super().__init__()
        self.members, self.method = nn.ModuleList(members), method

    def forward(self, x):
        outputs = [m(x).float() for m in self.members]
        if self.method == "arcface":
            return torch.cat([F.normalize(o, dim=1) for o in outputs], dim=1) / math.sqrt(len(outputs))
        log_probs = torch.stack([F.log_softmax(o, dim=1) for o in outputs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


def member_config(cfg, index: int):
    """The FitConfig of member `index` of an ensemble run: the same settings, seed + index, in RUN/members/INDEX/."""
    return replace(cfg, members=1, seed=cfg.seed + index, name=str(index), models_dir=str(cfg.run_dir / MEMBERS_DIR))
