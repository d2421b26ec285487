"""The prepare stage: hash, deduplicate, match test photos to training photos, split."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from whalefast import NEW_WHALE
from whalefast.console import console, progress_bar, table
from whalefast.dedup import HASH_COLUMNS, dedup, hash_images, match_test
from whalefast.errors import WhalefastError
from whalefast.io import list_images, read_labels, write_csv, write_text
from whalefast.split import make_split


@dataclass
class PrepareConfig:
    """Settings of one prepare run (saved as prepare.json)."""

    max_distance: int = 0
    seed: int = 42
    valid_pct: float = 0.2
    unseen_pct: float = 0.3
    min_samples: int = 10


def default_out(data: str | os.PathLike) -> Path:
    """Where prepare writes for the data folder `data`."""
    return Path(data) / "prepared"


def check_layout(data: Path) -> None:
    """Fail with one line if `data` is not in the Kaggle layout."""
    if not data.is_dir():
        raise WhalefastError(f"{data}: data folder not found")
    for name in ("train.csv", "train", "test"):
        if not (data / name).exists():
            raise WhalefastError(f"{data / name}: not found (expected the Kaggle layout: train.csv, train/, test/)")


def prepare(data: str | os.PathLike, out: str | os.PathLike | None = None, cfg: PrepareConfig = PrepareConfig(), quiet: bool = False) -> dict:
    """Run the prepare stage on `data`, writing to `out`; returns the summary figures."""
    data = Path(data)
    check_layout(data)
    out = Path(out) if out else default_out(data)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.max_distance < 0 or cfg.max_distance > 64:
        raise WhalefastError(f"--max-distance must lie in 0..64, got {cfg.max_distance}")
    if not 0 < cfg.valid_pct < 1:
        raise WhalefastError(f"--valid-pct must lie strictly between 0 and 1, got {cfg.valid_pct}")
    labels = read_labels(data / "train.csv")
    test_names = list_images(data / "test")
    list_images(data / "train")

    hash_path = out / "hashes.csv"
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
    write_csv(skipped, out / "skipped.csv")
    train = labels.merge(train_h[train_h.problem == ""], on="Image")
    test_ok = test_h[test_h.problem == ""]
    if train.empty:
        raise WhalefastError(f"{data / 'train'}: none of the images listed in train.csv could be read")

    clean, groups = dedup(train[["Image", "Id", "hash", "width", "height", "mode"]], cfg.max_distance)
    write_csv(groups, out / "dedup.csv")
    write_csv(clean[["Image", "Id", "hash", "width", "height", "mode"]], out / "train_clean.csv")
    matches = match_test(test_ok, train, cfg.max_distance)
    write_csv(matches, out / "test_matches.csv")
    split = make_split(clean, cfg.valid_pct, cfg.unseen_pct, cfg.seed, cfg.max_distance)
    write_csv(split, out / "split.csv")
    write_text(json.dumps(asdict(cfg), indent=2), out / "prepare.json")

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
        "out": str(out),
    }
    if not quiet:
        show_summary(summary, skipped)
    return summary


def show_summary(s: dict, skipped: pd.DataFrame) -> None:
    """Print prepare's summary tables."""
    console.print(
        table(
            "Deduplication",
            ["", "before", "after"],
            [["images", s["images_before"], s["images_after"]], ["ids", s["ids_before"], s["ids_after"]]],
        )
    )
    console.print(
        table(
            "Duplicate groups by rule",
            ["rule", "groups"],
            [
                ["one id: keep one image", s["groups_keep_one"]],
                ["new_whale + one id: drop new_whale", s["groups_drop_new_whale"]],
                ["two or more ids: drop group", s["groups_drop_all"]],
            ],
        )
    )
    console.print(
        table(
            "Validation split",
            ["", "images"],
            [
                ["train", s["train_images"]],
                ["valid", s["valid_images"]],
                ["valid scored as new_whale", s["valid_new_whale"]],
                ["test photos matching a training photo", s["test_matched"]],
            ],
        )
    )
    if len(skipped):
        console.print(f"[yellow]skipped {len(skipped)} unreadable or missing images (see skipped.csv):[/yellow]")
        for r in skipped.head(10).itertuples(index=False):
            console.print(f"  {r.Folder}/{r.Image}: {r.problem}")
    console.print(f"wrote results to [bold]{s['out']}[/bold]")
