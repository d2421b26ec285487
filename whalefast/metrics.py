"""MAP@5, the new_whale threshold and their fastai metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from fastai.metrics import AccumMetric

NEW_WHALE_TARGET = -100  # the code of new_whale in targets and rankings (cross-entropy ignores it)


def map5(ranked, targets) -> float:
    """MAP@5: mean over rows of 1/k for the first position k (1..5) holding the row's target, 0 if absent."""
    ranked, targets = torch.as_tensor(ranked)[:, :5], torch.as_tensor(targets)
    if len(targets) == 0:
        return 0.0
    hits = (ranked == targets[:, None]).float()
    weights = 1.0 / torch.arange(1, ranked.shape[1] + 1, device=hits.device, dtype=torch.float32)
    return float((hits * weights).amax(dim=1).mean()) if ranked.shape[1] else 0.0


def map5_labels(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> float:
    """MAP@5 over label strings; a prediction may list fewer than five labels."""
    if not truths:
        return 0.0
    total = 0.0
    for predicted, truth in zip(predictions, truths):
        for k, label in enumerate(list(predicted)[:5], start=1):
            if label == truth:
                total += 1.0 / k
                break
    return total / len(truths)


def rank_with_new_whale(scores: torch.Tensor, threshold: float | None, k: int = 5) -> torch.Tensor:
    """The top-k class indices per row with new_whale inserted before the first score below `threshold`."""
    k_classes = min(k, scores.shape[1])
    values, idx = scores.topk(k_classes, dim=1)
    if threshold is None:
        return idx
    pad = torch.full((len(scores), 1), NEW_WHALE_TARGET, dtype=idx.dtype, device=idx.device)
    idx, values = torch.cat([idx, pad], 1), torch.cat([values, torch.full_like(values[:, :1], -float("inf"))], 1)
    position = (values >= threshold).sum(dim=1, keepdim=True)  # where new_whale goes
    j = torch.arange(k_classes + 1, device=idx.device)[None, :]
    shifted = torch.cat([idx[:, :1], idx[:, :-1]], 1)
    out = torch.where(j < position, idx, torch.where(j == position, torch.full_like(idx, NEW_WHALE_TARGET), shifted))
    return out[:, :k]


def calibrate_threshold(scores: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor | None = None) -> tuple[float, float]:
    """The new_whale threshold that maximises MAP@5 on (scores, targets), and that MAP@5."""
    if candidates is None:
        top = scores.max(dim=1).values
        quantiles = torch.quantile(top.float(), torch.linspace(0, 1, 41, device=top.device)) if len(top) else top
        candidates = torch.cat([quantiles, torch.linspace(float(scores.min()), float(scores.max()) + 1e-6, 41, device=scores.device)])
    best = (float(candidates[0]), -1.0)
    for t in torch.unique(candidates).tolist():
        score = map5(rank_with_new_whale(scores, t), targets)
        if score > best[1] + 1e-12:
            best = (t, score)
    return best


def _scores(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=1)


def map5_calibrated(logits: torch.Tensor, targets: torch.Tensor, new_whale_class: int | None = None) -> float:
    """Validation MAP@5 ranked as submit ranks: new_whale by the threshold calibrated on these rows (or as a class)."""
    scores = _scores(logits)
    if new_whale_class is not None:
        return map5(scores.topk(min(5, scores.shape[1]), 1).indices, targets)
    return calibrate_threshold(scores, targets)[1]


def top1_calibrated(logits: torch.Tensor, targets: torch.Tensor, new_whale_class: int | None = None) -> float:
    """Share of rows whose first ranked id (new_whale included) is right."""
    scores = _scores(logits)
    if new_whale_class is not None:
        return float((scores.argmax(1) == targets).float().mean())
    threshold, _ = calibrate_threshold(scores, targets)
    return float((rank_with_new_whale(scores, threshold)[:, 0] == targets).float().mean())


class DeviceAccumMetric(AccumMetric):
    """AccumMetric that keeps predictions on their device (gathered across processes) until the epoch's end."""

    def accum_values(self, preds, targs, learn=None):
        if learn is not None:
            preds, targs = learn.to_detach(preds, cpu=False), learn.to_detach(targs, cpu=False)
        self.preds.append(preds.detach())
        self.targs.append(targs.detach())


def whale_metrics(new_whale_class: int | None = None) -> list[AccumMetric]:
    """MAP@5 and top-1, both computed the way submit ranks."""
    return [
        DeviceAccumMetric(map5_calibrated, flatten=False, name="map5", new_whale_class=new_whale_class),
        DeviceAccumMetric(top1_calibrated, flatten=False, name="top1", new_whale_class=new_whale_class),
    ]
