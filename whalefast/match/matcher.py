"""A finished run ready to match photos: its network shown photos as its input spec says, scored by its method against its ids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from whalefast import NEW_WHALE
from whalefast.core.console import progress_bar
from whalefast.core.errors import WhalefastError
from whalefast.core.ranking import BATCH_SHARE_FROM, NEW_WHALE_TARGET, batch_threshold, rank_with_new_whale
from whalefast.db.filters import PhotoFilter
from whalefast.db.store import CatalogueStore
from whalefast.match.photos import PhotoLoader
from whalefast.nets.forward import default_device
from whalefast.runs.catalogue import Catalogue
from whalefast.runs.folder import Run

EMBED_CHUNK = 256  # catalogue photos decoded and embedded at once
QUERY_BATCH = 256  # photos scored at once: (photos, ids) scores stay small with a hundred thousand ids


class Matcher:
    """A finished run, loaded once: network, input spec, method, catalogue (arcface) and the calibrated new_whale threshold.

    With `tta` False, photos are not averaged with their mirror image even where the run trained on
    mirrored photos. `runtime` is how the network runs (nets.runtime: "auto" is ONNX Runtime on a
    CPU). An arcface run matches against the catalogue database (`db`, or the models
    folder's), narrowed by `photo_filter`; photos catalogued since (imported, or embedded by another
    model) are embedded with this one when it loads.
    """

    def __init__(
        self,
        run: Run | str | os.PathLike,
        device: torch.device | None = None,
        tta: bool = True,
        db: str | os.PathLike | None = None,
        photo_filter: PhotoFilter | None = None,
        runtime: str = "auto",
    ):
        self.run = run if isinstance(run, Run) else Run.open(run)
        self.settings, self.method = self.run.settings, self.run.method
        self.spec = self.run.spec if tta else self.run.spec.without_mirror()
        self.device = device or default_device()
        self.network = self.run.inference_network(runtime, self.device)
        self.projection = self.run.projection
        self.threshold = self.run.threshold
        self.loader = PhotoLoader(self.spec, runtime, self.device)
        self.photo_filter = photo_filter or PhotoFilter()
        self.catalogue: Catalogue | None = None
        self.store: CatalogueStore | None = None
        self.ids = list(self.run.learnt.vocab)
        if self.method.has_catalogue:
            self.store = self.run.open_catalogue(db)
            self.embed_missing()
            self.reload()
        elif self.photo_filter.active:
            raise WhalefastError(f"{self.run.path}: a {self.method.name} model has no catalogue to filter; filters need an arcface model")

    @property
    def model(self) -> str:
        return self.run.model_key

    def embed_missing(self) -> int:
        """Embed, with this run, the catalogue's photos it has no embedding of yet; how many."""
        missing = self.store.unembedded(self.model)
        embedded = 0
        with progress_bar(f"embedding {len(missing)} catalogue photos new to {self.run.name}", len(missing)) as advance:
            for start in range(0, len(missing), EMBED_CHUNK):  # each chunk stored as it is done: a stopped import keeps what it embedded
                chunk = missing[start : start + EMBED_CHUNK]
                loaded = [(photo_id, array) for (photo_id, _), (array, problem) in zip(chunk, self.loader.load_many([p for _, p in chunk])) if not problem]
                if loaded:
                    self.store.put_embeddings(self.model, [p for p, _ in loaded], self.outputs([a for _, a in loaded]).numpy())
                    embedded += len(loaded)
                advance(len(chunk))
        return embedded

    def reload(self) -> None:
        """Read the catalogue again from the database (after another process or the review app changed it)."""
        self.seen = (self.store.revision, self.store.labels_revision)
        rows = self.store.rows(self.model, self.photo_filter)
        self.last_embedding = rows.last
        self.catalogue = Catalogue.from_rows(rows, self.run.learnt.vocab)
        self.catalogue.build_index()
        self.ids = list(self.catalogue.ids)

    def refresh(self) -> bool:
        """Catch up with the database if it changed since it was read: photos added since are appended, anything else reloads; whether it changed."""
        if self.store is None or self.store.revision == self.seen[0]:
            return False
        revision, labels = self.store.revision, self.store.labels_revision
        if labels != self.seen[1]:
            self.reload()
            return True
        newer = self.store.rows(self.model, self.photo_filter, after=self.last_embedding)
        self.catalogue.append(newer)
        self.ids = list(self.catalogue.ids)
        self.seen, self.last_embedding = (revision, labels), newer.last
        return True

    def outputs(self, arrays, progress=None) -> torch.Tensor:
        """The network's outputs (logits, or embeddings as the catalogue stores them) for (height, width, 3) uint8 arrays, on the CPU."""
        out = self.method.embed(self.network, arrays, self.spec, bs=self.settings.bs, device=self.device, progress=progress).cpu()
        return self.projection(out) if self.projection is not None and len(out) else out

    def id_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(photos, ids) scores for the network's outputs."""
        return self.method.id_scores(outputs, self.catalogue).cpu()

    def scores(self, arrays, progress=None) -> torch.Tensor:
        """(photos, ids) scores for (height, width, 3) uint8 arrays."""
        return self.id_scores(self.outputs(arrays, progress))

    def ranked(self, arrays, progress=None, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per photo, its k best (id, score) as `rank` gives them."""
        return self.ranked_outputs(self.outputs(arrays, progress), k)

    def ranked_outputs(self, outputs: torch.Tensor, k: int = 5, threshold: float | None = None) -> list[list[tuple[str, float]]]:
        """Per network output, its k best (id, score) as `rank` gives them (`threshold`: new_whale's, if not the calibrated one), QUERY_BATCH photos at a time (a large catalogue has many ids)."""
        return [
            ranking
            for start in range(0, len(outputs), QUERY_BATCH)
            for ranking in self.rank(self.id_scores(outputs[start : start + QUERY_BATCH]), k, threshold)
        ]

    def batch_share_refusal(self, photos: int, share: float) -> str | None:
        """Why new_whale cannot be placed by `share` of a batch of `photos` (None where it can, or where no share is asked)."""
        if not share:
            return None
        if self.threshold is None or NEW_WHALE in self.ids:
            return "this run trains new_whale as a class, so it has no threshold for a share to move"
        if photos < BATCH_SHARE_FROM:
            return f"{photos} readable photos, too few to place new_whale by a share of them (--new-whale-share needs {BATCH_SHARE_FROM})"
        return None

    def batch_threshold(self, outputs: torch.Tensor, share: float) -> float | None:
        """new_whale's threshold for a batch of network outputs: ranking.batch_threshold's where `share` applies (batch_share_refusal); else the calibrated one."""
        if not share or self.batch_share_refusal(len(outputs), share):
            return self.threshold
        # Scored here and again when ranked: a batch's (photos, ids) scores are not kept whole, a large catalogue has many ids.
        best = torch.cat([self.id_scores(outputs[start : start + QUERY_BATCH]).max(1).values for start in range(0, len(outputs), QUERY_BATCH)])
        return batch_threshold(self.threshold, best, share)

    def scores_and_similarities(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For one photo's output: (scores per id, cosine to each catalogue photo, or None without a catalogue)."""
        scores = self.id_scores(output[None])[0]
        return scores, None if self.catalogue is None else self.catalogue.similarities(output[None])[0].cpu()

    def rank(self, scores: torch.Tensor, k: int = 5, threshold: float | None = None) -> list[list[tuple[str, float]]]:
        """Per photo, the k best (id, score) with new_whale placed by `threshold` (by default the calibrated one)."""
        threshold = None if NEW_WHALE in self.ids else self.threshold if threshold is None else threshold
        ranked = rank_with_new_whale(scores, threshold, k)
        return [
            [(NEW_WHALE, float(threshold)) if i == NEW_WHALE_TARGET else (self.ids[i], float(row[i])) for i in idx] for row, idx in zip(scores, ranked.tolist())
        ]

    def known_photos(self) -> list[tuple[Path, str]]:
        """(photo, id) of the photos shown beside a candidate: the catalogue's (arcface) or the training photos (softmax)."""
        return self.method.known_photos(self.settings, self.catalogue)

    def catalogue_ids(self) -> np.ndarray | None:
        """The database id of each catalogue photo, in catalogue order (None without a catalogue)."""
        return None if self.catalogue is None else self.catalogue.photo_ids
