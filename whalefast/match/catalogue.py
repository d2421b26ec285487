"""Growing the catalogue without retraining: `catalogue import` (sightings, no model needed) and `catalogue add` (the same, embedded at once)."""

from __future__ import annotations

import os
from pathlib import Path

from whalefast.core.errors import WhalefastError
from whalefast.core.files import file_digest
from whalefast.db.darwin_core import METADATA_COLUMNS, read_sightings
from whalefast.db.store import Added, CatalogueStore, PhotoRecord
from whalefast.match.matcher import Matcher


def sighting_records(csv: str | os.PathLike, images_dir: str | os.PathLike) -> list[PhotoRecord]:
    """The photos an Image,Id (+ Darwin Core) CSV lists in `images_dir`, with their digests and sighting metadata; a one-line error for a missing one."""
    rows = read_sightings(csv)
    images_dir = Path(images_dir)
    missing = [n for n in rows.Image if not (images_dir / n).is_file()]
    if missing:
        raise WhalefastError(f"{images_dir / missing[0]}: image listed in {csv} not found")
    return [
        PhotoRecord(images_dir / r["Image"], file_digest(images_dir / r["Image"]), r["Id"], str(csv), {k: r[k] for k in METADATA_COLUMNS})
        for r in rows.to_dict("records")
    ]


def summary(added: Added) -> dict:
    return {
        "added_photos": len(added.added),
        "unchanged_photos": len(added.unchanged),
        "relabelled": [{"photo": p, "from": old, "to": new} for p, old, new in added.relabelled],
        "new_ids": len(added.new_ids),
    }


def import_sightings(db: str | os.PathLike, csv: str | os.PathLike, images_dir: str | os.PathLike, relabel: bool = False) -> dict:
    """Add the photos of a sightings CSV to the catalogue database `db`; idempotent by photo digest, a conflicting id refused unless `relabel`.

    No model is needed: each arcface model embeds the new photos the next time it matches.
    """
    records = sighting_records(csv, images_dir)
    with CatalogueStore(db) as store:
        added = store.add_photos(records, relabel=relabel, what=str(csv))
        return {**summary(added), **store.summary()}


def add_to_catalogue(
    run_dir: str | os.PathLike, csv: str | os.PathLike, images_dir: str | os.PathLike, relabel: bool = False, db=None, runtime: str = "auto"
) -> dict:
    """Import a sightings CSV into the catalogue an arcface run matches against, and embed its new photos with that run at once."""
    records = sighting_records(csv, images_dir)
    matcher = Matcher(run_dir, db=db, runtime=runtime)
    added = matcher.store.add_photos(records, relabel=relabel, what=str(csv))
    matcher.embed_missing()
    matcher.refresh()  # appends the new photos; reloads only if photos were relabelled
    return {**summary(added), **matcher.catalogue.summary()}
