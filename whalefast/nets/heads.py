"""Heads on a backbone's feature map: generalised-mean pooling, the embedding head (whole photo and strips), the box head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from whalefast.core.spec import IMAGENET_MEAN, IMAGENET_STD
from whalefast.nets.forward import forward_photos


class GeM(nn.Module):
    """Generalised-mean pooling with a learnt exponent (3 to start: between average and max pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = nn.Parameter(torch.tensor(p)), eps

    def forward(self, x):
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(2, 3)).pow(1.0 / self.p)


def pooling_exponents(model: nn.Module) -> list[nn.Parameter]:
    """The learnt exponent of every GeM pooling in `model`."""
    return [m.p for m in model.modules() if isinstance(m, GeM)]


def strips(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """`parts` vertical strips of a (B, C, H, W) feature map, left to right, then `parts` horizontal ones, top to bottom.

    Neighbouring strips share a column (row) where the width (height) does not divide: a 112x224 input
    gives a 4x7 map, whose halves are columns 0-3 and 3-6.
    """

    def cut(size: int, i: int) -> slice:
        return slice((i * size) // parts, ((i + 1) * size + parts - 1) // parts)  # ceiling division of positive sizes, as an exported graph computes it too

    height, width = x.shape[-2:]
    return [x[..., cut(width, i)] for i in range(parts)] + [x[..., cut(height, i), :] for i in range(parts)]


class ClassCentres(nn.Module):
    """An ArcFace loss's class centres (`W`, as pytorch-metric-learning keeps them) without the loss: what a finished run's checkpoint holds and inference never uses."""

    def __init__(self, embed_dim: int, centres: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(embed_dim, centres))


class EmbeddingHead(nn.Module):
    """GeM pooling and a linear map to `embed_dim` with batch-norm; the ArcFace class centres live here too, so the optimiser trains them.

    With `parts` N, the feature map cut into N vertical and N horizontal strips (for 2: a fluke's left
    and right lobes, its upper half and its trailing edge) gives each strip its own pooling, linear map
    and ArcFace centres too, so each learns to tell whales apart on its own. The output is then the whole
    map's and the strips' unit embeddings side by side, over sqrt(1 + 2N): a cosine similarity is the
    mean of theirs, as for ensemble members.
    """

    def __init__(
        self,
        features: int,
        embed_dim: int,
        n_classes: int,
        margin: float,
        scale: float,
        sub_centers: int = 1,
        parts: int = 0,
        training: bool = True,
        margins: torch.Tensor | None = None,
    ):
        super().__init__()
        self.parts = parts
        branch = (features, embed_dim, n_classes, margin, scale, sub_centers, training, margins)
        self.embed, self.arcface = self._branch(*branch)
        branches = [self._branch(*branch) for _ in range(2 * parts)]
        self.part_embeds = nn.ModuleList(b[0] for b in branches)
        self.part_arcfaces = nn.ModuleList(b[1] for b in branches)

    @staticmethod
    def _branch(
        features: int, embed_dim: int, n_classes: int, margin: float, scale: float, sub_centers: int, training: bool, margins: torch.Tensor | None
    ) -> tuple[nn.Module, nn.Module]:
        """One embedding and its ArcFace loss (`margins`: one per class, in radians, instead of `margin`)."""
        embed = nn.Sequential(GeM(), nn.Linear(features, embed_dim), nn.BatchNorm1d(embed_dim))
        if not training:
            return embed, ClassCentres(embed_dim, n_classes * max(1, sub_centers))
        from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss

        if margins is not None:
            from whalefast.nets.margins import DynamicArcFaceLoss, DynamicSubCenterArcFaceLoss

            if sub_centers > 1:
                return embed, DynamicSubCenterArcFaceLoss(margins, embedding_size=embed_dim, scale=scale, sub_centers=sub_centers)
            return embed, DynamicArcFaceLoss(margins, embedding_size=embed_dim, scale=scale)

        # pytorch-metric-learning takes the margin in degrees.
        degrees = float(torch.rad2deg(torch.tensor(margin)))
        if sub_centers > 1:
            return embed, SubCenterArcFaceLoss(num_classes=n_classes, embedding_size=embed_dim, margin=degrees, scale=scale, sub_centers=sub_centers)
        return embed, ArcFaceLoss(num_classes=n_classes, embedding_size=embed_dim, margin=degrees, scale=scale)

    @property
    def losses(self) -> list[nn.Module]:
        """The ArcFace loss of each branch, in the order of the output's blocks."""
        return [self.arcface, *self.part_arcfaces]

    def forward(self, x):
        whole = F.normalize(self.embed(x).float(), dim=1)
        if not self.parts:
            return whole
        blocks = [whole, *(F.normalize(embed(part).float(), dim=1) for embed, part in zip(self.part_embeds, strips(x, self.parts)))]
        return torch.cat(blocks, dim=1) / math.sqrt(len(blocks))


@torch.no_grad()
def carry_over_centres(head: EmbeddingHead, trained: EmbeddingHead, index: torch.Tensor, imprints: torch.Tensor | None = None) -> None:
    """Give `head`'s class i the centres of `trained`'s class index[i]; a class with index -1 gets its row of `imprints` (the sum of its photos' outputs), scaled as the trained centres are.

    Sub-centres are a class's adjacent columns, as pytorch-metric-learning lays them out.
    """
    kept = index >= 0
    for b, (new, old) in enumerate(zip(head.losses, trained.losses)):
        dim, sub = new.W.shape[0], new.W.shape[1] // len(index)
        old_w, new_w = old.W.view(dim, -1, sub), new.W.view(dim, len(index), sub)
        new_w[:, kept] = old_w[:, index[kept]].to(new_w.dtype)
        if imprints is not None and (~kept).any():
            direction = F.normalize(imprints[~kept, b * dim : (b + 1) * dim].float(), dim=1)  # each branch's block of the output
            norm = old.W.norm(dim=0).mean()
            new_w[:, ~kept] = (direction.T * norm).unsqueeze(-1).to(new_w.dtype)


@torch.no_grad()
def carry_over_classifier(network: nn.Module, trained: nn.Module, index: torch.Tensor) -> None:
    """Give class i of `network`'s last linear layer the weights and bias of `trained`'s class index[i]; a class with index -1 keeps its fresh ones."""
    new, old = (next(m for m in reversed(list(n.modules())) if isinstance(m, nn.Linear)) for n in (network, trained))
    kept = index >= 0
    new.weight[kept] = old.weight[index[kept]].to(new.weight.dtype)
    if new.bias is not None and old.bias is not None:
        new.bias[kept] = old.bias[index[kept]].to(new.bias.dtype)


class BoxHead(nn.Module):
    """Average pooling and a linear map to the box's centre and size, each in (0, 1) of the photo.

    With `prior` (mean centre x, centre y, width, height of the training boxes), it starts out
    predicting that mean box, so training improves on the best constant guess from the first step.
    """

    def __init__(self, features: int, prior: tuple[float, float, float, float] | None = None):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(features, 4))
        if prior is not None:
            linear = self.layers[-1]
            nn.init.normal_(linear.weight, std=1e-3)
            with torch.no_grad():
                linear.bias.copy_(torch.logit(torch.tensor(prior, dtype=torch.float32).clamp(0.02, 0.98)))

    def forward(self, x):
        cx, cy, w, h = torch.sigmoid(self.layers(x).float()).unbind(1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def predict_fractions(model: nn.Module, arrays, device, bs: int = 64) -> torch.Tensor:
    """Boxes as fractions (x0, y0, x1, y1) of each photo, from (s, s, 3) uint8 arrays of whole photos."""
    out = forward_photos(model, arrays, IMAGENET_MEAN, IMAGENET_STD, bs=bs, device=device)
    return out.cpu() if len(out) else torch.zeros(0, 4)
