"""The catalogue's own commands: export, show, summary, merge/unmerge/rename, history, the photo root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from whalefast.core.errors import WhalefastError
from whalefast.core.files import atomic_path, file_digest, write_csv
from whalefast.db.darwin_core import TEXT_TERMS, to_darwin_core
from whalefast.db.store import CatalogueStore
from whalefast.runs.folder import Run


def export_catalogue(db: str | os.PathLike, out: str | os.PathLike, photos: str | os.PathLike | None = None) -> dict:
    """Write every identified photo with its id and Darwin Core metadata to `out` (spreadsheet-safe); with `photos`, copy them there, one folder per individual."""
    with _existing(db) as store:
        table = to_darwin_core(store.export())
    write_csv(table, out, user_text=["Image", "Id", "name", "source", *TEXT_TERMS])
    result = {"out": str(out), "photos": len(table), "individuals": table.Id.nunique()}
    if photos is not None:
        result |= copy_by_individual(table, Path(photos))
    return result


def copy_by_individual(table, folder: Path) -> dict:
    """Copy each photo of an export to FOLDER/ID/ (atomically; again: only what is not there yet); how many were copied and how many are missing."""
    copied = missing = 0
    for image, wid, digest in zip(table.Image, table.Id, table.digest):
        source = Path(image)
        if not source.is_file():
            missing += 1
            continue
        target = folder / wid / source.name
        if target.exists() and file_digest(target) != digest:  # another photo of this whale with the same file name
            target = target.with_name(f"{source.stem}-{digest[:12]}{source.suffix}")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            copied += 1
    return {"copied": copied, "missing": missing}


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
