"""Training methods, each whole in one class: a softmax classifier over ids, or ArcFace embeddings ranked by nearest catalogue photo.

A method owns its head and loss, how a network's views combine, how outputs become id scores, whether
it keeps a catalogue, and how validation is scored (the same way during training, at calibration and
at submit). Adding a method means adding a class here and a name to METHODS.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from whalefast import NEW_WHALE
from whalefast.core.errors import WhalefastError
from whalefast.core.files import file_digest
from whalefast.core.ranking import NEW_WHALE_TARGET, score_validation, softmax_scores
from whalefast.core.spec import InputSpec
from whalefast.data.prepared import training_photos
from whalefast.db.store import PhotoRecord
from whalefast.nets.forward import embed
from whalefast.nets.heads import EmbeddingHead, carry_over_centres, carry_over_classifier
from whalefast.nets.registry import get_arch
from whalefast.nets.runtime import embedding_network
from whalefast.nets.views import Combine, average_probabilities, concatenate_unit
from whalefast.runs.catalogue import Catalogue, Projection
from whalefast.runs.config import FitConfig

if TYPE_CHECKING:  # pandas and fastai load where they are used: matching photos needs neither
    import pandas as pd

    from whalefast.data.loaders import TrainingData


class Known:
    """Labelled photos (rows of prepare's split) and their unit embeddings: the training photos a validation photo is ranked against, or a final catalogue."""

    def __init__(self, rows: pd.DataFrame, embeddings: torch.Tensor):
        self.rows, self.embeddings = rows, embeddings


class Embedded:
    """One network's outputs for the photos of a fit's data, by name, each computed once (the training-time MAP@5 and calibration share them)."""

    def __init__(self, method: Method, network: nn.Module, spec: InputSpec, data: TrainingData, bs: int, epoch: int | None = None):
        self.method, self.network, self.spec, self.data, self.bs, self.epoch = method, network, spec, data, bs, epoch
        self.outputs: dict[str, torch.Tensor] = {}
        self.runner: nn.Module | None = None  # what runs `network` here, chosen at the first call (nets.runtime.embedding_network)

    def __call__(self, names) -> torch.Tensor:
        """(photos, outputs) for `names`, embedding those not seen yet."""
        names = list(names)
        todo = [n for n in dict.fromkeys(names) if n not in self.outputs]
        if todo:
            if self.runner is None:
                self.runner = embedding_network(self.network, self.spec.size, len(todo) * self.spec.views)
            outputs = self.method.embed(self.runner, [self.data.images[n] for n in todo], self.spec, self.bs)
            self.outputs.update(zip(todo, outputs))
        return torch.stack([self.outputs[n] for n in names]) if names else torch.zeros(0)


class Method:
    """What a training method decides; see Softmax and ArcFace."""

    name: str
    has_catalogue: bool
    combine: Combine

    def head(self, cfg: FitConfig, n_classes: int, training: bool = True, counts=None) -> nn.Module | None:
        """The head on the backbone (None: fastai's classifier head); without `training`, only what inference and its checkpoint need.

        `counts`: the training photos of each class, for margins that depend on them.
        """
        raise NotImplementedError

    def loss(self, head: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def id_scores(self, outputs: torch.Tensor, catalogue: Catalogue | None) -> torch.Tensor:
        """(photos, ids) scores for the network's outputs."""
        raise NotImplementedError

    def carry_over_classes(self, network: nn.Module, trained: nn.Module, index: torch.Tensor, new_outputs) -> None:
        """Give `network`'s class i what `trained` learnt for its class index[i] (fit --fold-in); `new_outputs()`: the sum of the photos' outputs of each class with index -1."""
        raise NotImplementedError

    def known(self, embedded: Embedded, validation_too: bool = True) -> Known | None:
        """The labelled photos validation ranks against (with `validation_too`, the held-out ones as well: the final catalogue); None without a catalogue."""
        return None

    def validation_id_scores(self, embedded: Embedded, known: Known | None = None, projection: Projection | None = None) -> torch.Tensor:
        raise NotImplementedError

    def projection(self, known: Known | None, dims: int) -> Projection | None:
        """How the catalogue stores embeddings smaller (fit --catalogue-dims), fitted on the training photos; None to store them as they are."""
        return None

    def catalogue_records(self, known: Known | None, data_dir: str | Path, projection: Projection | None) -> tuple[list[PhotoRecord], torch.Tensor] | None:
        """The photos a finished run puts in the catalogue database, with their embeddings (None without a catalogue)."""
        return None

    def known_photos(self, cfg: FitConfig, catalogue: Catalogue | None) -> list[tuple[Path, str]]:
        """(photo, id) of the photos shown beside a candidate: the catalogue's, or the training photos."""
        return catalogue.known_photos() if catalogue is not None else training_photos(cfg.data, cfg.prepared_dir)

    def embed(self, network: nn.Module, arrays, spec: InputSpec, bs: int = 64, device=None, progress=None) -> torch.Tensor:
        """The network's outputs for photos, over the spec's views (nets.forward.embed: the one path)."""
        return embed(network, arrays, spec, self.combine, bs=bs, device=device, progress=progress)

    def score_validation(self, embedded: Embedded, known: Known | None = None, projection: Projection | None = None) -> tuple[float | None, float, float]:
        """(new_whale threshold, MAP@5, top-1) on the validation photos, ranked as submit ranks (in the catalogue's `projection`)."""
        data = embedded.data
        scores = self.validation_id_scores(embedded, known, projection)
        return score_validation(scores, validation_targets(data), new_whale_class(data.vocab))


def validation_targets(data: TrainingData) -> torch.Tensor:
    """The class each validation photo should rank first (NEW_WHALE_TARGET for unseen whales)."""
    encoder = {v: i for i, v in enumerate(data.vocab)}
    new_whale_code = encoder.get(NEW_WHALE, NEW_WHALE_TARGET)
    return torch.tensor([encoder.get(t, new_whale_code) for t in data.items[data.items.is_valid].target])


def new_whale_class(vocab: list[str]) -> int | None:
    """The class of new_whale where it was trained as one (fit --train-new-whale), else None: a threshold places it."""
    return vocab.index(NEW_WHALE) if NEW_WHALE in vocab else None


def _training_rows(known: Known, ids) -> torch.Tensor:
    """Which known photos are training photos of the given ids (the catalogue validation is ranked against)."""
    return torch.tensor((~known.rows.is_valid & known.rows.Id.isin(ids)).to_numpy())


def _valid_names(data: TrainingData) -> list[str]:
    return data.items[data.items.is_valid].Image.tolist()


class Softmax(Method):
    """A classifier over the training ids (the reference); new_whale by a threshold on the top probability, or as a class."""

    name, has_catalogue = "softmax", False
    combine = staticmethod(average_probabilities)

    def head(self, cfg, n_classes, training=True, counts=None):
        return None

    def loss(self, head):
        from whalefast.nets.losses import MaskedCrossEntropy  # training only: keeps torchvision out of inference

        return MaskedCrossEntropy()

    def carry_over_classes(self, network, trained, index, new_outputs):
        carry_over_classifier(network, trained, index)  # a new id's fresh row: the classifier has no photo to start it from

    def id_scores(self, outputs, catalogue):
        return softmax_scores(outputs)

    def validation_id_scores(self, embedded, known=None, projection=None):
        return softmax_scores(embedded(_valid_names(embedded.data))).cpu()


class ArcFace(Method):
    """Embeddings trained with an additive angular margin; a photo scores each id by its nearest catalogue photo."""

    name, has_catalogue = "arcface", True
    combine = staticmethod(concatenate_unit)

    def head(self, cfg, n_classes, training=True, counts=None):
        margins = None
        if training and cfg.margin_power:
            from whalefast.nets.margins import class_margins  # training only

            if counts is None:
                raise WhalefastError("--margin-power needs the number of training photos of each id")
            margins = class_margins(counts, cfg.margin, cfg.margin_power, cfg.margin_floor)
        return EmbeddingHead(get_arch(cfg.arch).features, cfg.embed_dim, n_classes, cfg.margin, cfg.scale, cfg.sub_centers, cfg.parts, training, margins)

    def loss(self, head):
        from whalefast.nets.losses import ArcFaceCriterion  # training only

        return ArcFaceCriterion(head)

    def carry_over_classes(self, network, trained, index, new_outputs):
        carry_over_centres(network[1], trained[1], index, new_outputs() if bool((index < 0).any()) else None)

    def id_scores(self, outputs, catalogue):
        return catalogue.scores(outputs)

    def known(self, embedded, validation_too=True):
        items = embedded.data.items
        rows = items[(items.Id != NEW_WHALE) & (validation_too | ~items.is_valid)]
        return Known(rows, F.normalize(embedded(rows.Image).float(), dim=1))

    def validation_id_scores(self, embedded, known=None, projection=None):
        """Ranked against a catalogue of the training photos alone, so no validation photo finds itself."""
        data = embedded.data
        known = known or self.known(embedded, validation_too=False)
        encoder = {v: i for i, v in enumerate(data.vocab)}
        train = _training_rows(known, encoder)
        labels = torch.tensor([encoder[i] for i in known.rows.Id[train.numpy()]])
        catalogue, queries = known.embeddings[train.to(known.embeddings.device)], embedded(_valid_names(data))
        if projection is not None:
            catalogue, queries = projection(catalogue), projection(queries)
        return Catalogue(catalogue, labels, list(data.vocab), [], []).scores(queries).cpu()

    def projection(self, known, dims):
        train = _training_rows(known, set(known.rows.Id))
        return Projection.fit(known.embeddings[train.to(known.embeddings.device)], dims)

    def catalogue_records(self, known, data_dir, projection):
        """Every labelled clean photo, the validation ones included: validation has done its job by now, and a whale whose only photos were held out must still be findable."""
        photos = [Path(data_dir) / "train" / n for n in known.rows.Image]
        records = [PhotoRecord(p, file_digest(p), wid, "training") for p, wid in zip(photos, known.rows.Id)]
        return records, projection(known.embeddings) if projection is not None else known.embeddings


METHODS: dict[str, Method] = {m.name: m for m in (Softmax(), ArcFace())}


def get_method(name: str) -> Method:
    """The method `name`, or a one-line error listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise WhalefastError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
