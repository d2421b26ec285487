"""Training losses: cross-entropy over catalogued ids, ArcFace over each embedding block, box L1 plus generalised IoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from whalefast.core.ranking import NEW_WHALE_TARGET
from whalefast.nets.heads import EmbeddingHead


class MaskedCrossEntropy(nn.Module):
    """Cross-entropy over the rows whose target is a training class (unseen whales carry no class to learn)."""

    def forward(self, logits, target):
        logits, target = logits.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)
        # A sum over the known rows divided by their count: no data-dependent branch, so no host sync per batch.
        total = F.cross_entropy(logits.float(), target, ignore_index=NEW_WHALE_TARGET, reduction="sum")
        return total / (target != NEW_WHALE_TARGET).sum().clamp(min=1)

    def activation(self, x):
        return F.softmax(x.float(), dim=-1)

    def decodes(self, x):
        return x.argmax(dim=-1)


class ArcFaceCriterion(nn.Module):
    """Additive angular margin loss over the catalogued ids; rows of unseen whales are left out."""

    def __init__(self, head: EmbeddingHead):
        super().__init__()
        self.head = [head]  # a list, so the head's parameters are not registered twice

    def forward(self, embeddings, target):
        embeddings, target = embeddings.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)
        mask = target != NEW_WHALE_TARGET
        if not bool(mask.any()):
            return embeddings.sum() * 0.0
        losses = self.head[0].losses
        blocks = embeddings[mask].float().chunk(len(losses), dim=1)  # ArcFace normalises each block itself
        return sum(loss(block, target[mask]) for loss, block in zip(losses, blocks)) / len(losses)


class BoxLoss(nn.Module):
    """L1 distance of the corners plus the generalised IoU loss."""

    def forward(self, pred, target):
        pred, target = pred.as_subclass(torch.Tensor).float(), target.as_subclass(torch.Tensor).float()
        return F.l1_loss(pred, target) + generalized_box_iou_loss(pred, target, reduction="mean")
