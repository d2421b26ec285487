"""A finished run ready to match photos: its network shown photos as its input spec says, scored by its method against its ids."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from whalefast import NEW_WHALE
from whalefast.core.ranking import NEW_WHALE_TARGET, rank_with_new_whale
from whalefast.match.photos import PhotoLoader
from whalefast.nets.forward import default_device
from whalefast.runs.catalogue import Catalogue
from whalefast.runs.folder import Run


class Matcher:
    """A finished run, loaded once: network, input spec, method, catalogue (arcface) and the calibrated new_whale threshold.

    With `tta` False, photos are not averaged with their mirror image even where the run trained on mirrored photos.
    """

    def __init__(self, run: Run | str | os.PathLike, device: torch.device | None = None, tta: bool = True):
        self.run = run if isinstance(run, Run) else Run.open(run)
        self.settings, self.method = self.run.settings, self.run.method
        self.spec = self.run.spec if tta else self.run.spec.without_mirror()
        self.device = device or default_device()
        self.network = self.run.network().to(self.device)
        self.threshold = self.run.threshold
        self.loader = PhotoLoader(self.spec)
        self.catalogue: Catalogue | None = None
        self.ids = list(self.run.learnt.vocab)
        if self.method.has_catalogue:
            self.use_catalogue(self.run.catalogue())

    def use_catalogue(self, catalogue: Catalogue) -> None:
        """Score against `catalogue` from now on (the one saved, or the review app's grown one)."""
        self.catalogue, self.ids = catalogue, list(catalogue.ids)

    def outputs(self, arrays, progress=None) -> torch.Tensor:
        """The network's outputs (logits or embeddings) for (height, width, 3) uint8 arrays, on the CPU."""
        return self.method.embed(self.network, arrays, self.spec, bs=self.settings.bs, device=self.device, progress=progress).cpu()

    def id_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(photos, ids) scores for the network's outputs."""
        return self.method.id_scores(outputs, self.catalogue).cpu()

    def scores(self, arrays, progress=None) -> torch.Tensor:
        """(photos, ids) scores for (height, width, 3) uint8 arrays."""
        return self.id_scores(self.outputs(arrays, progress))

    def scores_and_similarities(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For one photo's output: (scores per id, cosine to each catalogue photo, or None without a catalogue)."""
        scores = self.id_scores(output[None])[0]
        return scores, None if self.catalogue is None else self.catalogue.similarities(output[None])[0].cpu()

    def rank(self, scores: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per photo, the k best (id, score) with new_whale placed by the calibrated threshold."""
        threshold = None if NEW_WHALE in self.ids else self.threshold
        ranked = rank_with_new_whale(scores, threshold, k)
        return [
            [(NEW_WHALE, float(threshold)) if i == NEW_WHALE_TARGET else (self.ids[i], float(row[i])) for i in idx] for row, idx in zip(scores, ranked.tolist())
        ]

    def known_photos(self) -> list[tuple[Path, str]]:
        """(photo, id) of the photos shown beside a candidate: the catalogue's (arcface) or the training photos (softmax)."""
        return self.method.known_photos(self.settings, self.catalogue)
