"""The prepare stage: hash, deduplicate, match test photos to training photos, split."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from whalefast import NEW_WHALE
from whalefast.core.console import console, progress_bar, table, warn
from whalefast.core.errors import WhalefastError
from whalefast.core.files import NOT_WRITABLE, file_digest, os_error_text, remove_stale_temps, write_csv, write_json
from whalefast.core.images import list_images
from whalefast.core.labels import read_labels
from whalefast.data.boxes_csv import BOX_COLUMNS, read_boxes
from whalefast.data.dedup import HASH_COLUMNS, dedup, hash_images, match_test
from whalefast.data.layout import check_layout
from whalefast.data.prepared import BOXES, CACHE, DEDUP, HASHES, SETTINGS, SKIPPED, SPLIT, TEST_MATCHES, TRAIN_CLEAN, default_out
from whalefast.data.split import make_split
from whalefast.match.box_model import BoxModel, check_box_model, predict_boxes
from whalefast.runs.folder import Run


@dataclass
class PrepareConfig:
    """Settings of one prepare run (saved as prepare.json)."""

    max_distance: int = 0
    seed: int = 42
    valid_pct: float = 0.1
    unseen_pct: float = 0.3
    min_samples: int = 10
    boxes: str | None = None  # a boxes CSV or a box model (folder, or NAME in models_dir): crop photos to their flukes
    models_dir: str = "models"


def check_prepare_config(cfg: PrepareConfig) -> None:
    """One-line errors, each naming its option, for settings that cannot work."""
    if not 0 <= cfg.max_distance <= 64:
        raise WhalefastError(f"--max-distance must lie in 0..64, got {cfg.max_distance}")
    if not 0 <= cfg.seed < 2**32:
        raise WhalefastError(f"--seed must lie in 0..{2**32 - 1}, got {cfg.seed}")
    if not 0 < cfg.valid_pct < 1:
        raise WhalefastError(f"--valid-pct must lie strictly between 0 and 1, got {cfg.valid_pct}")
    if not 0 <= cfg.unseen_pct <= 1:
        raise WhalefastError(f"--unseen-pct must lie between 0 and 1, got {cfg.unseen_pct}")
    if cfg.min_samples < 1:
        raise WhalefastError(f"--min-samples must be at least 1, got {cfg.min_samples}")


def prepare(data: str | os.PathLike, out: str | os.PathLike | None = None, cfg: PrepareConfig = PrepareConfig(), quiet: bool = False) -> dict:
    """Run the prepare stage on `data`, writing to `out`; returns the summary figures.

    Every input is checked before anything is written. prepare.json goes last, so a prepare that is
    killed leaves a folder fit and submit refuse (see whalefast.data.prepared.check_prepared).
    """
    data = Path(data)
    check_layout(data)
    check_prepare_config(cfg)
    labels = read_labels(data / "train.csv")
    test_names = list_images(data / "test")
    list_images(data / "train")
    box_source = resolve_box_source(cfg.boxes, Path(cfg.models_dir)) if cfg.boxes else None
    out = Path(out) if out else default_out(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS).unlink(missing_ok=True)  # from here until the end, the folder is not a finished one
    except OSError as e:
        hint = "; pass --out to prepare into a folder you can write" if e.errno in NOT_WRITABLE else ""
        raise WhalefastError(os_error_text(e, out) + hint) from None
    for folder in (out, out / CACHE):
        remove_stale_temps(folder)

    hash_path = out / HASHES
    cached = pd.read_csv(hash_path, dtype={"hash": str, "problem": str}, keep_default_na=False) if hash_path.exists() else None
    if cached is not None and list(cached.columns) != HASH_COLUMNS:
        cached = None
    hashed = []
    for folder, names in (("train", labels.Image.tolist()), ("test", test_names)):
        with progress_bar(f"hashing {folder}/", len(names)) as advance:
            hashed.append(hash_images(data / folder, names, cached, progress=advance))
    train_h, test_h = hashed
    write_csv(pd.concat(hashed, ignore_index=True), hash_path)

    skipped = pd.concat([h.loc[h.problem != "", ["Image", "Folder", "problem"]] for h in hashed], ignore_index=True)
    write_csv(skipped, out / SKIPPED)
    train = labels.merge(train_h[train_h.problem == ""], on="Image")
    test_ok = test_h[test_h.problem == ""]
    if train.empty:
        raise WhalefastError(f"{data / 'train'}: none of the images listed in train.csv could be read")

    clean, groups = dedup(train[["Image", "Id", "hash", "width", "height", "mode"]], cfg.max_distance)
    write_csv(groups, out / DEDUP)
    write_csv(clean[["Image", "Id", "hash", "width", "height", "mode"]], out / TRAIN_CLEAN)
    matches = match_test(test_ok, train, cfg.max_distance)
    write_csv(matches, out / TEST_MATCHES)
    split = make_split(clean, cfg.valid_pct, cfg.unseen_pct, cfg.seed, cfg.max_distance)
    write_csv(split, out / SPLIT)
    settings = asdict(cfg)
    boxes_path = out / BOXES
    if box_source:
        readable = {"train": train_h.loc[train_h.problem == ""], "test": test_ok}
        boxes, settings["box_model"] = choose_boxes(box_source, data, readable, out / CACHE)
        write_csv(boxes, boxes_path)
    else:
        boxes = None
        boxes_path.unlink(missing_ok=True)  # whalefast's own output from an earlier run with --boxes: no crops now
    settings["train_digest"] = file_digest(data / "train.csv")
    write_json(settings, out / SETTINGS)

    valid = split[split.is_valid]
    summary = {
        "images_before": len(labels),
        "images_after": len(clean),
        "ids_before": labels.Id.nunique(),
        "ids_after": clean.Id.nunique(),
        "groups": len(groups),
        **{f"groups_{a}": int((groups.action == a).sum()) if len(groups) else 0 for a in ("keep_one", "drop_new_whale", "drop_all")},
        "skipped": len(skipped),
        "test_images": len(test_names),
        "test_matched": int(matches.Image.nunique()),
        "train_images": int((~split.is_valid).sum()),
        "valid_images": len(valid),
        "valid_new_whale": int((valid.target == NEW_WHALE).sum()),
        "boxed": {} if boxes is None else boxes.groupby("Folder").size().to_dict(),
        "unboxed": 0 if boxes is None else len(train_h) + len(test_h) - len(skipped) - len(boxes),
        "out": str(out),
    }
    if not quiet:
        show_summary(summary, skipped)
    return summary


def resolve_box_source(source: str, models_dir: Path) -> tuple[str, Path]:
    """("file", path) for a boxes CSV, ("model", folder) for a box model given as a folder or a NAME in models_dir."""
    path = Path(source)
    if path.is_file():
        return "file", path
    for folder in (path, models_dir / source):
        if (folder / Run.CONFIG).is_file():
            check_box_model(folder)
            return "model", folder
    raise WhalefastError(f"--boxes {source}: neither a boxes CSV nor a box model folder (nor a run in {models_dir})")


def choose_boxes(source: tuple[str, Path], data: Path, photos: dict[str, pd.DataFrame], cache_dir: Path) -> tuple[pd.DataFrame, str | None]:
    """The box of every readable photo (Image, Folder, x0, y0, x1, y1, source) and the box model used, if any.

    `source` is resolve_box_source's answer; `photos` maps a folder to its hashes (Image, width,
    height); a box must lie within its photo.
    """
    kind, path = source
    parts = []
    if kind == "file":
        given = read_boxes(path).set_index("Image")
        for folder, hashed in photos.items():
            rows = hashed[hashed.Image.isin(given.index)][["Image", "width", "height"]].join(given, on="Image")
            outside = rows[(rows.x1 > rows.width * 1.02 + 1) | (rows.y1 > rows.height * 1.02 + 1)]
            if len(outside):
                r = outside.iloc[0]
                raise WhalefastError(
                    f"{path}: the box of {r.Image} ({r.x0:g},{r.y0:g},{r.x1:g},{r.y1:g}) lies outside its {r.width}x{r.height} photo; "
                    "boxes must be in pixels of the photos in this data folder"
                )
            parts.append(rows[["Image", *BOX_COLUMNS]].assign(Folder=folder))
    else:
        model = BoxModel(path)  # loaded once; a one-line error now if it is not a box model
        for folder, hashed in photos.items():
            parts.append(predict_boxes(model, data / folder, hashed.Image.tolist(), cache_dir).assign(Folder=folder))
    boxes = pd.concat(parts, ignore_index=True)[["Image", "Folder", *BOX_COLUMNS]].assign(source=kind)
    return boxes, str(path.resolve()) if kind == "model" else None


def show_summary(s: dict, skipped: pd.DataFrame) -> None:
    """Print prepare's summary tables."""
    tables = {
        ("Deduplication", "", "before", "after"): [["images", s["images_before"], s["images_after"]], ["ids", s["ids_before"], s["ids_after"]]],
        ("Duplicate groups by rule", "rule", "groups"): [
            ["one id: keep one image", s["groups_keep_one"]],
            ["new_whale + one id: drop new_whale", s["groups_drop_new_whale"]],
            ["two or more ids: drop group", s["groups_drop_all"]],
        ],
        ("Validation split", "", "images"): [
            ["train", s["train_images"]],
            ["valid", s["valid_images"]],
            ["valid scored as new_whale", s["valid_new_whale"]],
            ["test photos matching a training photo", s["test_matched"]],
        ],
    }
    for (title, *columns), rows in tables.items():
        console.print(table(title, columns, rows))
    if s["boxed"]:
        console.print(
            f"fluke crops: {s['boxed'].get('train', 0)} train and {s['boxed'].get('test', 0)} test photos have a box"
            + (f"; {s['unboxed']} have none and are used whole" if s["unboxed"] else "")
        )
    if len(skipped):
        warn(f"skipped {len(skipped)} unreadable or missing images (see skipped.csv):")
        for r in skipped.head(10).itertuples(index=False):
            console.print(f"  {r.Folder}/{r.Image}: {r.problem}")
    console.print(f"wrote results to {s['out']}")
