"""The catalogue of an ArcFace run: one embedding per known photo, with its id, file and content digest.

It grows without retraining: adding is idempotent per photo (a photo is known by the SHA-256 of its
bytes, whatever its name or folder), and moving a photo to another id is an explicit, reported
relabel. It is saved as plain tensors, lists and strings, loaded without running code from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from whalefast.core.errors import WhalefastError
from whalefast.core.files import file_digest, load_saved, save_torch
from whalefast.core.ranking import cosine_id_scores, photo_similarities


@dataclass
class AddPlan:
    """What adding photos changes: new photos, photos already there, relabels."""

    new: list[tuple[str, str, str]] = field(default_factory=list)  # (photo path, id, digest)
    unchanged: list[str] = field(default_factory=list)  # photo paths already catalogued under the same id
    relabel: list[tuple[str, int, str, str]] = field(default_factory=list)  # (photo path, entry, old id, new id)

    @property
    def changes(self) -> bool:
        return bool(self.new or self.relabel)


@dataclass
class Catalogue:
    """Unit embeddings of known photos (rows), each labelled with an index into `ids`, with where the photo lives and its digest."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    photos: list[str]
    digests: list[str]

    @classmethod
    def build(cls, embeddings: torch.Tensor, ids: list[str], labels: list[str], photos: list[str | os.PathLike]) -> Catalogue:
        """A catalogue of photos (one unit embedding each) labelled with ids; `ids` fixes the id order (more may follow)."""
        order = list(dict.fromkeys(list(ids) + list(labels)))
        code = {v: i for i, v in enumerate(order)}
        return cls(
            embeddings.float().cpu(),
            torch.tensor([code[i] for i in labels], dtype=torch.long),
            order,
            [str(Path(p).resolve()) for p in photos],
            [file_digest(p) for p in photos],
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Catalogue:
        """The catalogue saved at `path`, or a one-line error naming the file."""
        path = Path(path)
        if not path.is_file():
            raise WhalefastError(f"{path}: not found; did `whalefast fit --name {path.parent.name}` finish?")
        raw = load_saved(path, "catalogue")
        if not isinstance(raw, dict) or "digests" not in raw:
            raise WhalefastError(f"{path}: an older catalogue format; run `whalefast fit` again to rebuild it")
        return cls(raw["embeddings"], raw["labels"], list(raw["ids"]), list(raw["photos"]), list(raw["digests"]))

    def save(self, path: str | os.PathLike) -> None:
        """Plain tensors, lists and strings (loadable with weights_only=True), written atomically."""
        save_torch({"embeddings": self.embeddings, "labels": self.labels, "ids": self.ids, "photos": self.photos, "digests": self.digests}, path)

    def __len__(self) -> int:
        return len(self.photos)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(photos, ids): each photo's cosine similarity to each id's nearest catalogue photo."""
        return cosine_id_scores(outputs, self.embeddings.to(outputs.device), self.labels.to(outputs.device), len(self.ids))

    def similarities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(photos, catalogue photos) cosine similarities."""
        return photo_similarities(outputs, self.embeddings)

    def known_photos(self) -> list[tuple[Path, str]]:
        """(photo, id) of every catalogue photo, in catalogue order."""
        return [(Path(p), self.ids[label]) for p, label in zip(self.photos, self.labels.tolist())]

    def plan(self, photos: list[tuple[str | os.PathLike, str]], source: str) -> AddPlan:
        """Sort (photo path, id) pairs into new photos, photos already catalogued under that id, and relabels."""
        entry_of = {d: i for i, d in enumerate(self.digests)}
        plan, seen = AddPlan(), {}
        for path, wid in photos:
            digest = file_digest(path)
            if digest in seen:
                if seen[digest] != wid:
                    raise WhalefastError(f"{source}: {Path(path).name} is the same photo as another one listed, with another id ({seen[digest]} vs {wid})")
                continue
            seen[digest] = wid
            if digest not in entry_of:
                plan.new.append((str(path), wid, digest))
                continue
            entry = entry_of[digest]
            old = self.ids[int(self.labels[entry])]
            if old == wid:
                plan.unchanged.append(str(path))
            else:
                plan.relabel.append((str(path), entry, old, wid))
        return plan

    def grown(self, plan: AddPlan, embedded: dict[str, torch.Tensor]) -> Catalogue:
        """This catalogue with `plan` carried out; `embedded` maps each new photo's path to its embedding."""
        ids = list(self.ids)
        ids += [i for i in dict.fromkeys([w for _, w, _ in plan.new] + [n for _, _, _, n in plan.relabel]) if i not in ids]
        code = {v: i for i, v in enumerate(ids)}
        labels = self.labels.clone()
        for _, entry, _, new in plan.relabel:
            labels[entry] = code[new]
        embeddings = self.embeddings
        if plan.new:
            added = torch.stack([embedded[path].reshape(-1) for path, _, _ in plan.new])
            embeddings = torch.cat([embeddings, F.normalize(added.float(), dim=1)])
            labels = torch.cat([labels, torch.tensor([code[w] for _, w, _ in plan.new], dtype=torch.long)])
        photos = list(self.photos) + [str(Path(p).resolve()) for p, _, _ in plan.new]
        return Catalogue(embeddings, labels, ids, photos, list(self.digests) + [d for _, _, d in plan.new])

    def summary(self) -> dict:
        """Ids, photos and embedding size."""
        return {"ids": len(set(self.labels.tolist())), "photos": len(self), "embedding_dim": int(self.embeddings.shape[1])}
