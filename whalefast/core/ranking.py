"""Ranking ids for a photo and scoring rankings: MAP@5, the new_whale threshold, cosine and softmax id scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

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


def rank_with_new_whale(scores: torch.Tensor, threshold: float | torch.Tensor | None, k: int = 5) -> torch.Tensor:
    """The top-k class indices per row with new_whale inserted before the first score below `threshold` (one for all rows, or an (n, 1) tensor: one per row)."""
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


# Below this many photos the share of a batch's first answers is too coarse to place new_whale by.
BATCH_SHARE_FROM = 100


def batch_threshold(calibrated: float, best: torch.Tensor, share: float) -> float:
    """The new_whale threshold for a batch of photos: halfway between `calibrated` and the score under which `share` of their best scores fall.

    A threshold calibrated on a hundred-odd validation photos moves by points between runs; the
    batch's own quantile is steady, but puts new_whale first for `share` of the photos whatever they
    hold. Halfway, each holds the other in check (bench/new_whale_rule.py).
    """
    return (calibrated + float(torch.quantile(best.float(), share))) / 2


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


def score_validation(scores: torch.Tensor, targets: torch.Tensor, new_whale_class: int | None = None) -> tuple[float | None, float, float]:
    """(new_whale threshold, MAP@5, top-1) of validation scores ranked as submit ranks them.

    new_whale comes in by the threshold that maximises MAP@5 on these rows, or, where it was trained
    as a class (`new_whale_class`), as that class.
    """
    if new_whale_class is not None:
        ranked = scores.topk(min(5, scores.shape[1]), 1).indices
        return None, map5(ranked, targets), float((ranked[:, 0] == targets).float().mean())
    threshold, score = calibrate_threshold(scores, targets)
    return threshold, score, float((rank_with_new_whale(scores, threshold)[:, 0] == targets).float().mean())


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of a classifier's logits."""
    return F.softmax(logits.float(), dim=1)


CHUNK = 65_536  # catalogue photos compared at a time: a float32 copy of that many rows at most, never of the whole catalogue
FEW_QUERIES = 16  # up to this many queries read float16 rows as they are (memory-bound); more convert each chunk once (compute-bound)


def _chunk_similarities(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(queries, rows) inner products of unit queries (float32) with unit rows (float16 or float32)."""
    rows = rows.to(queries.device)
    if rows.dtype == torch.float16 and len(queries) <= FEW_QUERIES:
        return (rows @ queries.half().T).T.float()
    return queries @ rows.float().T


def cosine_id_scores(queries: torch.Tensor, catalogue: torch.Tensor, labels: torch.Tensor, n_ids: int) -> torch.Tensor:
    """Per id, the cosine similarity of each query to that id's nearest catalogue photo (-2 where an id has none).

    Catalogue rows are unit vectors (float16 as the catalogue database stores them, or float32),
    compared CHUNK photos at a time, exactly.
    """
    queries = F.normalize(queries.float(), dim=1)
    scores = torch.full((len(queries), n_ids), -2.0, device=queries.device)
    for start in range(0, len(catalogue), CHUNK):
        sims = _chunk_similarities(queries, catalogue[start : start + CHUNK])
        index = labels[start : start + CHUNK].to(queries.device)[None].expand(len(queries), -1)
        scores = scores.scatter_reduce(1, index, sims, reduce="amax", include_self=True)
    return scores


def photo_similarities(queries: torch.Tensor, catalogue: torch.Tensor) -> torch.Tensor:
    """(queries, catalogue photos) cosine similarities to unit catalogue rows, CHUNK photos at a time."""
    queries = F.normalize(queries.float(), dim=1)
    return torch.cat(
        [_chunk_similarities(queries, catalogue[start : start + CHUNK]) for start in range(0, len(catalogue), CHUNK)] or [queries.new_zeros(len(queries), 0)],
        dim=1,
    )
