"""The catalogue a model matches against: unit embeddings of identified photos, each with its individual, file and digest.

It is read from the catalogue database (whalefast.db) for one model, optionally narrowed by a photo
filter, and kept as float16; scoring converts it in chunks, so a million photos stay within memory.
A run may store its embeddings projected to fewer dimensions (`Projection`, fitted on its training
photos): the run applies the same projection to every photo it embeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from whalefast.core.errors import WhalefastError
from whalefast.core.files import load_saved, save_torch
from whalefast.core.ranking import cosine_id_scores, photo_similarities
from whalefast.core.search import INDEX_FROM, PhotoIndex, faiss_available, shortlist_id_scores
from whalefast.db.store import Rows, room_for


class Catalogue:
    """Unit embeddings of known photos (rows, float16), each labelled with an index into `ids`, with where the photo lives and its database id.

    Photos added later are appended (`append`) into spare room, so adding one rarely copies the
    catalogue. Once `build_index` found INDEX_FROM photos or more, with faiss installed, a query is
    scored against the photos an approximate index shortlists instead of all (bench/catalogue_scale.py).
    """

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, ids: list[str], photos: list[str], photo_ids: np.ndarray | None = None):
        self._rows, self._size = embeddings, len(labels)  # rows past _size are room for photos added later
        self._labels = torch.cat([labels.long(), torch.zeros(len(embeddings) - len(labels), dtype=torch.long)])
        self.ids, self.photos = list(ids), list(photos)
        self.photo_ids = np.zeros(0, np.int64) if photo_ids is None else np.asarray(photo_ids, dtype=np.int64)
        self._codes = {v: i for i, v in enumerate(self.ids)}
        self.index: PhotoIndex | None = None

    @classmethod
    def from_rows(cls, rows: Rows, first_ids: list[str] = ()) -> Catalogue:
        """The catalogue of the database's `rows`; its ids come in the order of `first_ids` (the run's vocabulary), then as the photos bring them."""
        present = set(rows.individuals)
        order = [i for i in first_ids if i in present]
        order += [i for i in dict.fromkeys(rows.individuals) if i not in set(order)]
        code = {v: i for i, v in enumerate(order)}
        labels = torch.tensor([code[i] for i in rows.individuals], dtype=torch.long)
        return cls(torch.from_numpy(rows.buffer), labels, order, rows.paths, rows.photo_ids)

    @property
    def embeddings(self) -> torch.Tensor:
        return self._rows[: self._size]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels[: self._size]

    def __len__(self) -> int:
        return self._size

    def append(self, rows: Rows) -> None:
        """Add the database's newer `rows` at the end (new ids after the known ones), and to the index."""
        n = len(rows.photo_ids)
        if not n:
            return
        for individual in rows.individuals:
            if individual not in self._codes:
                self._codes[individual] = len(self.ids)
                self.ids.append(individual)
        if self._size == 0:
            self._rows = torch.zeros(0, rows.vectors.shape[1], dtype=torch.float16)
        if self._size + n > len(self._rows):
            capacity = room_for(self._size + n)
            self._rows = torch.cat([self.embeddings, torch.zeros(capacity - self._size, self._rows.shape[1], dtype=torch.float16)])
            self._labels = torch.cat([self.labels, torch.zeros(capacity - self._size, dtype=torch.long)])
        self._rows[self._size : self._size + n] = torch.from_numpy(rows.vectors)
        self._labels[self._size : self._size + n] = torch.tensor([self._codes[i] for i in rows.individuals])
        self._size += n
        self.photos += rows.paths
        self.photo_ids = np.concatenate([self.photo_ids, rows.photo_ids])
        if self.index is not None:
            self.index.add(rows.vectors)

    def build_index(self, size: int | None = None) -> bool:
        """Index the catalogue if it has `size` (INDEX_FROM) photos or more and faiss is installed; whether it is indexed.

        A catalogue that grows past INDEX_FROM by appending is indexed when it is next loaded.
        """
        if self.index is None and self._size >= (INDEX_FROM if size is None else size) and faiss_available():
            self.index = PhotoIndex(self.embeddings.numpy())
        return self.index is not None

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(photos, ids): each photo's cosine similarity to each id's nearest catalogue photo (of those the index shortlists, when indexed)."""
        if self.index is not None:
            return shortlist_id_scores(outputs.cpu(), self.embeddings, self.labels, len(self.ids), self.index.shortlist(outputs)).to(outputs.device)
        return cosine_id_scores(outputs, self.embeddings.to(outputs.device), self.labels.to(outputs.device), len(self.ids))

    def similarities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(photos, catalogue photos) cosine similarities."""
        return photo_similarities(outputs, self.embeddings)

    def known_photos(self, start: int = 0) -> list[tuple[Path, str]]:
        """(photo, id) of every catalogue photo from position `start` on, in catalogue order."""
        return [(Path(p), self.ids[label]) for p, label in zip(self.photos[start:], self.labels[start:].tolist())]

    def summary(self) -> dict:
        """Ids, photos and embedding size."""
        return {"ids": len(set(self.labels.tolist())), "photos": len(self), "embedding_dim": int(self.embeddings.shape[1]) if len(self) else 0}


def load_legacy(path: str | os.PathLike) -> dict:
    """A catalogue.pt saved before the catalogue database (embeddings, labels, ids, photos, digests), or a one-line error naming it."""
    path = Path(path)
    raw = load_saved(path, "catalogue")
    if not isinstance(raw, dict) or "digests" not in raw:
        raise WhalefastError(f"{path}: an older catalogue format; run `whalefast fit` again to rebuild it")
    return raw


@dataclass
class Projection:
    """Embeddings to fewer dimensions by principal components, re-normalised: what a run stores in the catalogue (fit --catalogue-dims)."""

    mean: torch.Tensor
    components: torch.Tensor  # (dims in, dims out)

    @classmethod
    def fit(cls, embeddings: torch.Tensor, dims: int) -> Projection | None:
        """The projection of `embeddings` (unit rows) onto their first `dims` principal components; None where that would not make them smaller."""
        x = embeddings.float().cpu()
        if not dims or dims >= x.shape[1] or dims >= len(x):
            return None
        mean = x.mean(0, keepdim=True)
        centred = (x - mean).double()
        if len(x) < x.shape[1]:  # fewer photos than dimensions: the photos' Gram matrix is the smaller eigenproblem (4x faster than an SVD)
            values, vectors = torch.linalg.eigh(centred @ centred.T)
            values, vectors = values.flip(0)[:dims].clamp(min=1e-12), vectors.flip(1)[:, :dims]
            components = centred.T @ vectors / values.sqrt()
        else:
            components = torch.linalg.eigh(centred.T @ centred)[1].flip(1)[:, :dims]
        return cls(mean, components.float().contiguous())

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings.float()
        return F.normalize((x - self.mean.to(x.device)) @ self.components.to(x.device), dim=1)

    def save(self, path: str | os.PathLike) -> None:
        save_torch({"mean": self.mean, "components": self.components}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Projection:
        raw = load_saved(path, "projection")
        return cls(raw["mean"], raw["components"])
