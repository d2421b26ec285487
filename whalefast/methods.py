"""Training methods: a softmax classifier over ids, or ArcFace embeddings ranked by nearest catalogue photos."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.metrics import Metric
from torch import nn

from whalefast import NEW_WHALE
from whalefast.metrics import NEW_WHALE_TARGET, calibrate_threshold, rank_with_new_whale, whale_metrics
from whalefast.models import build_model, get_arch


class GeM(nn.Module):
    """Generalised-mean pooling with a learnt exponent (3 to start: between average and max pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = nn.Parameter(torch.tensor(p)), eps

    def forward(self, x):
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(2, 3)).pow(1.0 / self.p)


def strips(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """`parts` vertical strips of a (B, C, H, W) feature map, left to right, then `parts` horizontal ones, top to bottom.

    Neighbouring strips share a column (row) where the width (height) does not divide: a 112x224 input
    gives a 4x7 map, whose halves are columns 0-3 and 3-6.
    """

    def cut(size: int, i: int) -> slice:
        return slice((i * size) // parts, -((-(i + 1) * size) // parts))

    height, width = x.shape[-2:]
    return [x[..., cut(width, i)] for i in range(parts)] + [x[..., cut(height, i), :] for i in range(parts)]


class EmbeddingHead(nn.Module):
    """GeM pooling and a linear map to `embed_dim` with batch-norm; the ArcFace class centres live here too, so the optimiser trains them.

    With `parts` N, the feature map cut into N vertical and N horizontal strips (for 2: a fluke's left
    and right lobes, its upper half and its trailing edge) gives each strip its own pooling, linear map
    and ArcFace centres too, so each learns to tell whales apart on its own. The output is then the whole
    map's and the strips' unit embeddings side by side, over sqrt(1 + 2N): a cosine similarity is the
    mean of theirs, as for ensemble members.
    """

    def __init__(self, features: int, embed_dim: int, n_classes: int, margin: float, scale: float, sub_centers: int = 1, parts: int = 0):
        super().__init__()
        self.parts = parts
        self.embed, self.arcface = self._branch(features, embed_dim, n_classes, margin, scale, sub_centers)
        branches = [self._branch(features, embed_dim, n_classes, margin, scale, sub_centers) for _ in range(2 * parts)]
        self.part_embeds = nn.ModuleList(b[0] for b in branches)
        self.part_arcfaces = nn.ModuleList(b[1] for b in branches)

    @staticmethod
    def _branch(features: int, embed_dim: int, n_classes: int, margin: float, scale: float, sub_centers: int) -> tuple[nn.Module, nn.Module]:
        from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss

        embed = nn.Sequential(GeM(), nn.Linear(features, embed_dim), nn.BatchNorm1d(embed_dim))
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


def photo_similarities(queries: torch.Tensor, catalogue: torch.Tensor) -> torch.Tensor:
    """(queries, catalogue photos) cosine similarities."""
    return F.normalize(queries.float(), dim=1) @ F.normalize(catalogue.float().to(queries.device), dim=1).T


def cosine_id_scores(queries: torch.Tensor, catalogue: torch.Tensor, labels: torch.Tensor, n_ids: int) -> torch.Tensor:
    """Per id, the cosine similarity of each query to that id's nearest catalogue photo (-2 where an id has none)."""
    sims = photo_similarities(queries, catalogue)
    scores = torch.full((len(queries), n_ids), -2.0, device=sims.device)
    return scores.scatter_reduce(1, labels.to(sims.device)[None].expand(len(queries), -1), sims, reduce="amax", include_self=True)


class CatalogueEmbedder(Callback):
    """Before validation every `every` epochs and at the last, embed the training photos (the catalogue) with the current weights.

    Between those epochs there is no catalogue and no MAP@5: embedding every training photo takes
    6-12 s of a 50-80 s epoch on 2 CPU cores (the flukes recipe).
    """

    order = -10

    def __init__(self, bs: int = 128, every: int = 1):
        self.bs, self.every, self.embeddings, self.labels = bs, every, None, None

    def before_validate(self):
        from whalefast.inference import run_model

        self.embeddings = None
        if (self.epoch + 1) % self.every and self.epoch + 1 < self.n_epoch:
            return
        items = self.dls.items
        train = items[~items.is_valid]
        encoder = {v: i for i, v in enumerate(self.dls.vocab)}
        images = catalogue_images(self.dls)
        was_training = self.model.training
        self.model.eval()
        self.embeddings = run_model(self.model, [images[n] for n in train.Image], bs=self.bs, tta=False, device=self.dls.device)
        self.labels = torch.tensor([encoder[i] for i in train.Id], device=self.embeddings.device)
        self.model.train(was_training)


def catalogue_images(dls):
    """The decoded-image cache behind a whalefast DataLoaders."""
    from whalefast.data import CacheReader

    for tfm in dls.train_ds.tls[0].tfms.fs:
        if isinstance(tfm, CacheReader):
            return tfm.images
    raise RuntimeError("DataLoaders carry no image cache")


class CatalogueMAP5(Metric):
    """Validation MAP@5 (or top-1) ranking ids by nearest catalogue photo, new_whale by a calibrated similarity threshold."""

    def __init__(self, embedder: CatalogueEmbedder, n_ids: int, top1: bool = False):
        self.embedder, self.n_ids, self.top1 = embedder, n_ids, top1

    def reset(self):
        self.preds, self.targs = [], []

    def accumulate(self, learn):
        self.preds.append(learn.to_detach(learn.pred, cpu=False))
        self.targs.append(learn.to_detach(learn.y, cpu=False))

    @property
    def value(self):
        if not self.preds or self.embedder.embeddings is None:
            return None
        scores = cosine_id_scores(torch.cat(self.preds), self.embedder.embeddings, self.embedder.labels, self.n_ids)
        targets = torch.cat(self.targs).to(scores.device)
        threshold, score = calibrate_threshold(scores, targets)
        if self.top1:
            return float((rank_with_new_whale(scores, threshold)[:, 0] == targets).float().mean())
        return score

    @property
    def name(self):
        return "top1" if self.top1 else "map5"


def method_parts(cfg, dls):
    """(custom head or None, loss, metrics, extra callbacks) for cfg.method."""
    if cfg.method == "softmax":
        from whalefast.train import MaskedCrossEntropy

        new_whale_class = dls.vocab.index(NEW_WHALE) if NEW_WHALE in dls.vocab else None
        return None, MaskedCrossEntropy(), whale_metrics(new_whale_class), []
    head = embedding_head(cfg, len(dls.vocab))
    embedder = CatalogueEmbedder(bs=cfg.bs, every=cfg.map_every)
    metrics = [CatalogueMAP5(embedder, len(dls.vocab)), CatalogueMAP5(embedder, len(dls.vocab), top1=True)]
    return head, ArcFaceCriterion(head), metrics, [embedder]


def embedding_head(cfg, n_classes: int) -> EmbeddingHead:
    return EmbeddingHead(get_arch(cfg.arch).features, cfg.embed_dim, n_classes, cfg.margin, cfg.scale, cfg.sub_centers, cfg.parts)


def inference_model(cfg) -> nn.Module:
    """The run's network (or ensemble of networks), uninitialised, in the layout its checkpoint was saved from."""
    if cfg.members > 1:
        from whalefast.ensemble import Ensemble, member_config

        return Ensemble([inference_model(member_config(cfg, i)) for i in range(cfg.members)], cfg.method)
    head = embedding_head(cfg, len(cfg.vocab)) if cfg.method == "arcface" else None
    return build_model(cfg.arch, len(cfg.vocab), head=head)


def embed_known_photos(cfg, model: nn.Module, dls) -> tuple:
    """(rows, embeddings) of every labelled clean photo (new_whale left out) with `model`.

    Validation ranks against the training ones among them and the saved catalogue holds them all, so
    they are embedded once for both.
    """
    from whalefast.inference import run_model

    items = dls.items
    known = items[items.Id != NEW_WHALE]
    images = catalogue_images(dls)
    embeddings = run_model(model.eval(), [images[n] for n in known.Image], bs=cfg.bs, tta=cfg.flip_tta, device=dls.device)
    return known, F.normalize(embeddings.float(), dim=1)


def validation_scores(cfg, model: nn.Module, dls, known=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(id scores, targets) on the validation set with `model`, ranked as submit ranks.

    An arcface model ranks against a catalogue of the training photos alone, so no validation photo
    finds itself; `known` is embed_known_photos' result, when the caller already has it.
    """
    from whalefast.inference import run_model

    items = dls.items
    valid = items[items.is_valid]
    encoder = {v: i for i, v in enumerate(cfg.vocab)}
    new_whale_code = encoder.get(NEW_WHALE, NEW_WHALE_TARGET)
    targets = torch.tensor([encoder.get(t, new_whale_code) for t in valid.target])
    images = catalogue_images(dls)
    outputs = run_model(model.eval(), [images[n] for n in valid.Image], bs=cfg.bs, tta=cfg.flip_tta, device=dls.device)
    if cfg.method == "softmax":
        return F.softmax(outputs, dim=1).cpu(), targets
    rows, embeddings = known if known is not None else embed_known_photos(cfg, model, dls)
    train = (~rows.is_valid & rows.Id.isin(encoder)).to_numpy()
    labels = torch.tensor([encoder[i] for i in rows.Id[train]], device=embeddings.device)
    return cosine_id_scores(outputs, embeddings[torch.tensor(train, device=embeddings.device)], labels, len(cfg.vocab)).cpu(), targets


def final_catalogue(cfg, known: tuple) -> dict:
    """The catalogue saved with an arcface run: every labelled clean photo (embed_known_photos' result), the validation ones included.

    Validation has done its job (threshold, best epoch) by now; a whale whose only photos were held out
    for validation must still be findable by submit and predict.
    """
    from whalefast.catalogue import make_catalogue

    rows, embeddings = known
    photos = [Path(cfg.data) / "train" / n for n in rows.Image]
    return make_catalogue(embeddings, cfg.vocab, rows.Id.tolist(), photos)
