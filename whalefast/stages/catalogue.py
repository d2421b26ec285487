"""The catalogue's own commands: export, show, summary, merge/unmerge/rename, history, the photo root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from whalefast.core.errors import WhalefastError
from whalefast.core.files import write_csv
from whalefast.db.darwin_core import TEXT_TERMS, to_darwin_core
from whalefast.db.store import CatalogueStore
from whalefast.runs.folder import Run


def export_catalogue(db: str | os.PathLike, out: str | os.PathLike, photos: str | os.PathLike | None = None) -> dict:
    """Write every identified photo with its id and Darwin Core metadata to `out` (spreadsheet-safe); with `photos`, copy them there, one folder per individual."""
    with _existing(db) as store:
        table = to_darwin_core(store.export())
    write_csv(table, out, user_text=["Image", "Id", "name", "source", *TEXT_TERMS])
    if photos is not None:
        photos = Path(photos)
        for image, wid in zip(table.Image, table.Id):
            source = Path(image)
            if source.is_file():
                target = photos / wid / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    shutil.copy2(source, target)
    return {"out": str(out), "photos": len(table), "individuals": table.Id.nunique()}


def describe(db: str | os.PathLike, individual: str) -> dict:
    with _existing(db) as store:
        return store.describe(individual)


def summarise(db: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict:
    """The database's counts, and with `run_dir` the run's catalogue as it matches against it."""
    run = Run.open(run_dir) if run_dir is not None else None
    if run is not None and not run.method.has_catalogue:
        run.open_catalogue(db)  # the one-line error a model without a catalogue gives
    with _existing(db) as store:
        counts = store.summary()
    if run is None:
        return counts
    return {**run.catalogue(db).summary(), "individuals in the database": counts["individuals"]}


def curate(db: str | os.PathLike, action: str, *ids: str) -> dict:
    """merge KEEP MERGED, unmerge MERGED, or rename OLD NEW, in one transaction each, recorded in the history."""
    with _existing(db) as store:
        return {"merge": store.merge, "unmerge": store.unmerge, "rename": store.rename}[action](*ids)


def _summary(action: str, d: dict) -> str:
    """One line saying what a history entry did."""
    if action == "merge":
        return f"into {d['into']}, {len(d['photos'])} photos"
    if action == "unmerge":
        return f"from {d['from']}, {len(d['photos'])} photos"
    if action == "rename":
        return f"{d['from']} -> {d['to']}"
    if action == "relabel":
        return f"photo {d['photo']}: {d['from']} -> {d['to']} ({d['source']})"
    if action == "add":
        return f"{d['photos']} photos, {len(d['new_ids'])} new ids, {d['relabelled']} relabelled"
    return str(d)


def history(db: str | os.PathLike, limit: int = 50) -> list[dict]:
    """The newest `limit` history entries, each with a line saying what happened."""
    with _existing(db) as store:
        entries = store.history(limit)
    for h in entries:
        h["summary"] = _summary(h["action"], h["details"])
    return entries


def set_photo_root(db: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The photos moved with their folder: stored paths are relative to `root` from now on."""
    root = Path(root)
    if not root.is_dir():
        raise WhalefastError(f"{root}: folder not found")
    with _existing(db) as store:
        store.set_photo_root(root)
        return store.photo_root


def _existing(db: str | os.PathLike) -> CatalogueStore:
    """The catalogue database at `db`; a one-line error rather than a new empty one where there is none."""
    if not Path(db).is_file():
        raise WhalefastError(f"{db}: no catalogue database here (fit an arcface model, or `whalefast catalogue import`, to make one; --db names another)")
    return CatalogueStore(db)
