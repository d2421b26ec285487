"""The catalogue of an ArcFace model: one embedding per known photo, with its id, file and content digest.

It grows without retraining (`catalogue add`): adding is idempotent per photo (a photo is known by
the SHA-256 of its bytes, whatever its name or folder), and moving a photo to another id is an
explicit, reported relabel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from whalefast import NEW_WHALE
from whalefast.errors import WhalefastError
from whalefast.io import file_digest, load_saved, read_labels, save_torch

CATALOGUE_FILE = "catalogue.pt"


def make_catalogue(embeddings: torch.Tensor, ids: list[str], labels: list[str], photos: list[str | os.PathLike]) -> dict:
    """A catalogue of photos (one embedding each) labelled with ids; `ids` fixes the id order (more may follow)."""
    order = list(dict.fromkeys(list(ids) + list(labels)))
    code = {v: i for i, v in enumerate(order)}
    return {
        "embeddings": embeddings.float().cpu(),
        "labels": torch.tensor([code[i] for i in labels], dtype=torch.long),
        "ids": order,
        "photos": [str(Path(p).resolve()) for p in photos],
        "digests": [file_digest(p) for p in photos],
    }


def catalogue_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CATALOGUE_FILE


def save_catalogue(catalogue: dict, path: str | os.PathLike) -> None:
    """torch.save of plain tensors, lists and strings (loadable with weights_only=True), atomically."""
    save_torch(catalogue, path)


def load_catalogue(run_dir: str | os.PathLike) -> dict:
    """The saved catalogue of an arcface run, loaded without running any code from the file."""
    from whalefast.train import load_config

    cfg = load_config(run_dir)
    if cfg.method != "arcface":
        raise WhalefastError(f"{run_dir}: a {cfg.method} model has no catalogue; only arcface models (fit --method arcface) have one")
    path = catalogue_path(run_dir)
    if not path.is_file():
        raise WhalefastError(f"{path}: not found; did `whalefast fit --name {Path(run_dir).name}` finish?")
    catalogue = load_saved(path, "catalogue")
    if not isinstance(catalogue, dict) or "digests" not in catalogue:
        raise WhalefastError(f"{path}: an older catalogue format; run `whalefast fit` again to rebuild it")
    return catalogue


def known_photos(cfg, catalogue: dict | None = None) -> list[tuple[Path, str]]:
    """(photo, id) of every known whale's photos: the catalogue's in its order (arcface), else the training photos (softmax)."""
    if catalogue is not None:
        return [(Path(p), catalogue["ids"][label]) for p, label in zip(catalogue["photos"], catalogue["labels"].tolist())]
    data = Path(cfg.data)
    clean = cfg.prepared_dir / "train_clean.csv"
    labels = pd.read_csv(clean if clean.exists() else data / "train.csv", dtype=str, keep_default_na=False)
    labels = labels[labels.Id != NEW_WHALE]
    return [(data / "train" / n, i) for n, i in zip(labels.Image, labels.Id)]


@dataclass
class AddPlan:
    """What adding a CSV of photos changes: new photos, photos already there, relabels."""

    new: list[tuple[str, str, str]] = field(default_factory=list)  # (photo path, id, digest)
    unchanged: list[str] = field(default_factory=list)  # photo paths already catalogued under the same id
    relabel: list[tuple[str, int, str, str]] = field(default_factory=list)  # (photo path, entry, old id, new id)


def plan_additions(catalogue: dict, photos: list[tuple[Path, str]], source: str) -> AddPlan:
    """Sort (photo path, id) pairs into new photos, photos already catalogued under that id, and relabels."""
    entry_of = {d: i for i, d in enumerate(catalogue["digests"])}
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
        old = catalogue["ids"][int(catalogue["labels"][entry])]
        if old == wid:
            plan.unchanged.append(str(path))
        else:
            plan.relabel.append((str(path), entry, old, wid))
    return plan


def add_to_catalogue(run_dir: str | os.PathLike, csv: str | os.PathLike, images_dir: str | os.PathLike, relabel: bool = False) -> dict:
    """Embed the photos listed in `csv` (Image,Id) from `images_dir` and add them, new ids included, to the saved catalogue."""
    rows = read_labels(csv)
    images_dir = Path(images_dir)
    missing = [n for n in rows.Image if not (images_dir / n).is_file()]
    if missing:
        raise WhalefastError(f"{images_dir / missing[0]}: image listed in {csv} not found")
    return add_photos(run_dir, [(images_dir / n, i) for n, i in zip(rows.Image, rows.Id)], relabel, source=str(csv))


def add_photos(
    run_dir: str | os.PathLike, photos: list[tuple[str | os.PathLike, str]], relabel: bool = False, source: str = "photos", embedded: dict | None = None
) -> dict:
    """Add (photo path, id) pairs, new ids included, to a run's catalogue; returns what changed.

    A photo already in the catalogue under the same id is left as it is; under another id it is an
    error unless `relabel`, which moves it and reports the move. `embedded` maps a photo's path (as
    given) to its embedding where the caller has one already (the review app); the others are embedded here.
    """
    from whalefast.inference import PhotoLoader, load_model, run_model

    catalogue = load_catalogue(run_dir)
    plan = plan_additions(catalogue, [(Path(p), i) for p, i in photos], source)
    if plan.relabel and not relabel:
        path, _, old, new = plan.relabel[0]
        raise WhalefastError(
            f"{source}: {Path(path).name} is already catalogued as {old}, not {new} ({len(plan.relabel)} such photos); "
            "pass --relabel to move them to the new ids"
        )
    embedded = {str(k): v for k, v in (embedded or {}).items()}
    todo = [path for path, _, _ in plan.new if path not in embedded]
    if todo:
        model, cfg, _ = load_model(run_dir)
        loader = PhotoLoader(cfg)
        arrays = []
        for path in todo:
            array, problem = loader.load(path)
            if problem:
                raise WhalefastError(f"{path}: {problem}")
            arrays.append(array)
        outputs = run_model(model, arrays, bs=cfg.bs, tta=cfg.flip_tta, device=next(model.parameters()).device).cpu()
        embedded.update(zip(todo, outputs))
    ids = list(catalogue["ids"])
    ids += [i for i in dict.fromkeys([w for _, w, _ in plan.new] + [n for _, _, _, n in plan.relabel]) if i not in ids]
    code = {v: i for i, v in enumerate(ids)}
    labels = catalogue["labels"].clone()
    for _, entry, _, new in plan.relabel:
        labels[entry] = code[new]
    embeddings = catalogue["embeddings"]
    if plan.new:
        added = torch.stack([embedded[path].reshape(-1) for path, _, _ in plan.new])
        embeddings = torch.cat([embeddings, torch.nn.functional.normalize(added.float(), dim=1)])
        labels = torch.cat([labels, torch.tensor([code[w] for _, w, _ in plan.new], dtype=torch.long)])
    grown = {
        "embeddings": embeddings,
        "labels": labels,
        "ids": ids,
        "photos": list(catalogue["photos"]) + [str(Path(p).resolve()) for p, _, _ in plan.new],
        "digests": list(catalogue["digests"]) + [d for _, _, d in plan.new],
    }
    if plan.new or plan.relabel:
        save_catalogue(grown, catalogue_path(run_dir))
    return {
        "added_photos": len(plan.new),
        "unchanged_photos": len(plan.unchanged),
        "relabelled": [{"photo": p, "from": old, "to": new} for p, _, old, new in plan.relabel],
        "new_ids": len(ids) - len(catalogue["ids"]),
        **summarise(grown),
    }


def summarise(catalogue: dict) -> dict:
    """Ids, photos and embedding size of a catalogue."""
    return {
        "ids": len(set(catalogue["labels"].tolist())),
        "photos": int(catalogue["embeddings"].shape[0]),
        "embedding_dim": int(catalogue["embeddings"].shape[1]),
    }
