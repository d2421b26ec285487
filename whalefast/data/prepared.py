"""prepare's output folder as the later stages read it: finished or not, its split, boxes, settings and decoded-image caches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from whalefast import NEW_WHALE
from whalefast.core.console import progress_bar
from whalefast.core.errors import WhalefastError
from whalefast.core.images import Box, size_text
from whalefast.core.spec import InputSpec
from whalefast.data.cache import CachedImages, build_cache

if TYPE_CHECKING:
    import pandas as pd


def default_out(data: str | os.PathLike) -> Path:
    """Where prepare writes for the data folder `data`."""
    return Path(data) / "prepared"


# prepare's output files. SETTINGS is written last: a prepared folder without it is the remains of a prepare that did not finish.
HASHES, SKIPPED, DEDUP, TRAIN_CLEAN = "hashes.csv", "skipped.csv", "dedup.csv", "train_clean.csv"
TEST_MATCHES, SPLIT, BOXES, SETTINGS, CACHE = "test_matches.csv", "split.csv", "boxes.csv", "prepare.json", "cache"


def check_prepared(prepared: str | os.PathLike) -> Path:
    """`prepared` if a prepare finished writing it, else a one-line error saying to run prepare (again)."""
    prepared = Path(prepared)
    if not (prepared / SPLIT).is_file():
        raise WhalefastError(f"{prepared / SPLIT}: not found; run `whalefast prepare` first")
    if not (prepared / SETTINGS).is_file():
        raise WhalefastError(f"{prepared}: a prepare that did not finish left it (no {SETTINGS}); run `whalefast prepare` again")
    return prepared


def load_split(prepared: str | os.PathLike) -> pd.DataFrame:
    """prepare's split.csv, or a one-line error telling to run prepare."""
    import pandas as pd

    path = check_prepared(prepared) / SPLIT
    split = pd.read_csv(path, dtype={"Image": str, "Id": str, "target": str}, keep_default_na=False)
    missing = {"Image", "Id", "is_valid", "target"} - set(split.columns)
    if missing:
        raise WhalefastError(f"{path}: missing columns {', '.join(sorted(missing))}; run `whalefast prepare` again")
    return split


def prepare_settings(prepared: str | os.PathLike) -> dict:
    """prepare.json of a prepared folder ({} if absent)."""
    path = Path(prepared) / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def prepared_boxes(prepared: Path, folder: str) -> dict[str, Box] | None:
    """The fluke boxes prepare chose for the photos of `folder` (None when prepare ran without --boxes)."""
    import pandas as pd

    path = Path(prepared) / BOXES
    if not path.is_file():
        return None
    boxes = pd.read_csv(path, dtype={"Image": str, "Folder": str}, keep_default_na=False)
    boxes = boxes[boxes.Folder == folder]
    return {r.Image: (r.x0, r.y0, r.x1, r.y1) for r in boxes.itertuples(index=False)}


def image_cache(data: str | os.PathLike, prepared: str | os.PathLike, folder: str, names: list[str], spec: InputSpec) -> CachedImages:
    """The decoded-image cache of `names` in `data/folder` as `spec` says: its size, grey or not, cropped to prepare's fluke boxes where it crops."""
    boxes = None
    if spec.cropped:
        boxes = prepared_boxes(prepared, folder)
        if boxes is None:
            raise WhalefastError(f"{Path(prepared) / BOXES}: not found; this model was trained on fluke crops, run `whalefast prepare --boxes ...` again")
    label = f"caching {folder}/ at {size_text(spec.size)}px{' (fluke crops)' if boxes is not None else ''}{' grey' if spec.grey else ''}"
    with progress_bar(label, len(names)) as advance:
        return build_cache(Path(data) / folder, names, Path(prepared) / CACHE, spec.size, boxes=boxes, grey=spec.grey, margin=spec.margin, progress=advance)


def training_photos(data: str | os.PathLike, prepared: str | os.PathLike) -> list[tuple[Path, str]]:
    """(photo, id) of every catalogued training photo (new_whale left out): what a softmax model shows beside its candidates."""
    import pandas as pd

    data, clean = Path(data), Path(prepared) / TRAIN_CLEAN
    labels = pd.read_csv(clean if clean.exists() else data / "train.csv", dtype=str, keep_default_na=False)
    labels = labels[labels.Id != NEW_WHALE]
    return [(data / "train" / n, i) for n, i in zip(labels.Image, labels.Id)]


def whole_photo_cache(folder: Path, names: list[str], size: int, cache_dir: Path):
    """The decoded-image cache of whole photos squashed to size x size: what a box model sees."""
    with progress_bar(f"caching {folder.name}/ at {size}px for boxes", len(names)) as advance:
        return build_cache(folder, names, cache_dir, (size, size), progress=advance)
