"""The catalogue of an ArcFace model: embeddings of every known photo, growable without retraining."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from whalefast.errors import WhalefastError
from whalefast.io import load_square, read_labels


def embed_with_flips(model, arrays, bs: int, device) -> torch.Tensor:
    """Embeddings of each photo and of its horizontal flip (two catalogue entries per photo)."""
    from whalefast.inference import run_model

    plain = run_model(model, arrays, bs=bs, tta=False, device=device)
    flipped = run_model(model, [a[:, ::-1] for a in arrays], bs=bs, tta=False, device=device)
    return torch.cat([plain, flipped]).cpu()


def build_catalogue(cfg, model, images, rows: pd.DataFrame, device) -> dict:
    """Embed the training photos in `rows` (Image, Id) from the image cache: the catalogue of a run."""
    rows = rows[rows.Id.isin(cfg.vocab)]
    arrays = [images[n] for n in rows.Image]
    code = {v: i for i, v in enumerate(cfg.vocab)}
    labels = torch.tensor([code[i] for i in rows.Id] * 2)
    return {
        "embeddings": embed_with_flips(model, arrays, cfg.bs, device),
        "labels": labels,
        "ids": list(cfg.vocab),
        "images": list(rows.Image) * 2,
    }


def catalogue_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "catalogue.pt"


def load_catalogue(run_dir: str | os.PathLike) -> dict:
    path = catalogue_path(run_dir)
    if not path.is_file():
        raise WhalefastError(f"{path}: not found; only arcface models have a catalogue")
    return torch.load(path, map_location="cpu", weights_only=False)


def add_to_catalogue(run_dir: str | os.PathLike, csv: str | os.PathLike, images_dir: str | os.PathLike) -> dict:
    """Embed the photos listed in `csv` (Image,Id) from `images_dir` and add them, new ids included, to the saved catalogue."""
    from whalefast.inference import load_model
    from whalefast.io import atomic_path

    model, cfg, _ = load_model(run_dir)
    if cfg.method != "arcface":
        raise WhalefastError(f"{run_dir}: a {cfg.method} model has no catalogue; train with --method arcface")
    catalogue = load_catalogue(run_dir)
    rows = read_labels(csv)
    images_dir = Path(images_dir)
    missing = [n for n in rows.Image if not (images_dir / n).is_file()]
    if missing:
        raise WhalefastError(f"{images_dir / missing[0]}: image listed in {csv} not found")
    arrays = []
    for name in rows.Image:
        try:
            arrays.append(load_square(images_dir / name, cfg.size))
        except Exception as e:  # noqa: BLE001
            raise WhalefastError(f"{images_dir / name}: unreadable image ({type(e).__name__})") from None
    ids = list(catalogue["ids"])
    new_ids = [i for i in dict.fromkeys(rows.Id) if i not in ids]
    ids += new_ids
    code = {v: i for i, v in enumerate(ids)}
    device = next(model.parameters()).device
    embeddings = embed_with_flips(model, arrays, cfg.bs, device)
    catalogue = {
        "embeddings": torch.cat([catalogue["embeddings"], embeddings]),
        "labels": torch.cat([catalogue["labels"], torch.tensor([code[i] for i in rows.Id] * 2)]),
        "ids": ids,
        "images": list(catalogue["images"]) + list(rows.Image) * 2,
    }
    with atomic_path(catalogue_path(run_dir)) as tmp:
        torch.save(catalogue, tmp)
    return {"added_photos": len(rows), "new_ids": len(new_ids), **summarise(catalogue)}


def summarise(catalogue: dict) -> dict:
    """Ids, photos and embedding size of a catalogue."""
    return {
        "ids": len(catalogue["ids"]),
        "photos": len(set(catalogue["images"])),
        "entries": int(catalogue["embeddings"].shape[0]),
        "embedding_dim": int(catalogue["embeddings"].shape[1]),
    }
