"""Growing an arcface run's catalogue without retraining (`whalefast catalogue add` and the review app's confirmations)."""

from __future__ import annotations

import os
from pathlib import Path

from whalefast.core.errors import WhalefastError
from whalefast.core.labels import read_labels
from whalefast.match.matcher import Matcher
from whalefast.runs.folder import Run


def add_to_catalogue(run_dir: str | os.PathLike, csv: str | os.PathLike, images_dir: str | os.PathLike, relabel: bool = False) -> dict:
    """Embed the photos listed in `csv` (Image,Id) from `images_dir` and add them, new ids included, to the saved catalogue."""
    rows = read_labels(csv)
    images_dir = Path(images_dir)
    missing = [n for n in rows.Image if not (images_dir / n).is_file()]
    if missing:
        raise WhalefastError(f"{images_dir / missing[0]}: image listed in {csv} not found")
    return add_photos(Run.open(run_dir), [(images_dir / n, i) for n, i in zip(rows.Image, rows.Id)], relabel, source=str(csv))


def add_photos(run: Run, photos: list[tuple[str | os.PathLike, str]], relabel: bool = False, source: str = "photos", embedded: dict | None = None) -> dict:
    """Add (photo path, id) pairs, new ids included, to a run's catalogue; returns what changed.

    A photo already in the catalogue under the same id is left as it is; under another id it is an
    error unless `relabel`, which moves it and reports the move. `embedded` maps a photo's path (as
    given) to its embedding where the caller has one already (the review app); the others are
    embedded here, through the run's Matcher.
    """
    catalogue = run.catalogue()
    plan = catalogue.plan([(Path(p), i) for p, i in photos], source)
    if plan.relabel and not relabel:
        path, _, old, new = plan.relabel[0]
        raise WhalefastError(
            f"{source}: {Path(path).name} is already catalogued as {old}, not {new} ({len(plan.relabel)} such photos); "
            "pass --relabel to move them to the new ids"
        )
    embedded = {str(k): v for k, v in (embedded or {}).items()}
    todo = [path for path, _, _ in plan.new if path not in embedded]
    if todo:
        matcher = Matcher(run)
        arrays = []
        for path in todo:
            array, problem = matcher.loader.load(path)
            if problem:
                raise WhalefastError(f"{path}: {problem}")
            arrays.append(array)
        embedded.update(zip(todo, matcher.outputs(arrays)))
    grown = catalogue.grown(plan, embedded)
    if plan.changes:
        run.save_catalogue(grown)
    return {
        "added_photos": len(plan.new),
        "unchanged_photos": len(plan.unchanged),
        "relabelled": [{"photo": p, "from": old, "to": new} for p, _, old, new in plan.relabel],
        "new_ids": len(grown.ids) - len(catalogue.ids),
        **grown.summary(),
    }
