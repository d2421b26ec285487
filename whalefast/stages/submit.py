"""The submit stage: a Kaggle submission for every photo in test/."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from whalefast import NEW_WHALE
from whalefast.core.console import progress_bar, warn
from whalefast.core.errors import WhalefastError
from whalefast.core.files import file_digest, write_csv
from whalefast.core.labels import read_labels
from whalefast.data.layout import test_images
from whalefast.data.prepared import TEST_MATCHES, check_prepared, image_cache
from whalefast.db.filters import PhotoFilter
from whalefast.match.matcher import Matcher
from whalefast.runs.config import check_new_whale_share
from whalefast.runs.folder import Run


def hash_matches(prepared: Path) -> dict[str, list[str]]:
    """For each test photo that duplicates training photos, their ids, closest first."""
    path = prepared / TEST_MATCHES
    if not path.exists():
        return {}
    matches = pd.read_csv(path, dtype=str, keep_default_na=False)
    out: dict[str, list[str]] = {}
    for image, group in matches.groupby("Image", sort=False):
        out[image] = list(dict.fromkeys(group.sort_values("distance").Id))
    return out


def check_same_data(run: Run, data: Path) -> None:
    """A one-line error if the run learnt from another dataset than `data` (its ids would mix with this one's); a warning if train.csv merely grew."""
    train_csv, learnt = data / "train.csv", run.learnt
    if not learnt.train_digest or file_digest(train_csv) == learnt.train_digest:
        return
    ids = set(read_labels(train_csv).Id)
    missing = [i for i in learnt.vocab if i not in ids]
    if missing:
        raise WhalefastError(
            f"{run.path}: trained on other data than {train_csv} ({len(missing)} of its {len(learnt.vocab)} ids, e.g. {missing[0]}, are not in it); "
            f"submit with the data it was trained on (--data {run.settings.data})"
        )
    warn(f"{train_csv} changed after {run.name} was trained (every id it knows is still there); new ids are unknown to it until you fit again")


def apply_matches(ranked: list[str], matched: list[str], k: int = 5) -> list[str]:
    """Put the ids of hash-matched training photos first, then the model's ranking, each id once."""
    return list(dict.fromkeys(matched + ranked))[:k]


def submit(
    data: str | os.PathLike,
    run_dir: Matcher | str | os.PathLike,
    out: str | os.PathLike = "submission.csv",
    tta: bool = True,
    prepared=None,
    db: str | os.PathLike | None = None,
    photo_filter: PhotoFilter | None = None,
    runtime: str = "auto",
    new_whale_share: float | None = None,
) -> dict:
    """Predict every test photo and write `out` (Image,Id with up to five ids) atomically; returns a summary.

    An arcface run matches against the catalogue database `db` (the models folder's by default),
    only the photos `photo_filter` lets through. `runtime` is how the network runs (nets.runtime).
    `run_dir` may be a Matcher already loaded (tta, db, photo_filter and runtime are then its own).
    `new_whale_share`: new_whale placed by Matcher.batch_threshold with this share (0: the calibrated
    threshold; None: the run's fit setting).
    """
    data = Path(data)
    prepared = Path(prepared) if prepared else data / "prepared"
    names = test_images(data)
    check_prepared(prepared)
    run = run_dir.run if isinstance(run_dir, Matcher) else Run.open(run_dir)
    check_same_data(run, data)
    matcher = run_dir if isinstance(run_dir, Matcher) else Matcher(run, tta=tta, db=db, photo_filter=photo_filter, runtime=runtime)
    images = image_cache(data, prepared, "test", names, matcher.spec)
    unreadable = [n for n in names if n in images.problems]
    readable = [n for n in names if n not in images.problems]
    share = check_new_whale_share(run.settings.new_whale_share if new_whale_share is None else new_whale_share)
    with progress_bar("predicting test/", len(readable)) as advance:
        outputs = matcher.outputs([images[n] for n in readable], progress=advance)
    threshold = matcher.batch_threshold(outputs, share)
    if refusal := matcher.batch_share_refusal(len(readable), share):
        warn(f"{data / 'test'}: {refusal}; new_whale_share {share} is not applied")
    ranked = dict(zip(readable, matcher.ranked_outputs(outputs, threshold=threshold)))
    fallback = [(NEW_WHALE, 0.0)] + [(i, 0.0) for i in matcher.ids[:4]]
    matches = hash_matches(prepared)
    rows, top_scores = [], []
    for name in names:
        ranking = ranked.get(name, fallback)
        top_scores.append(ranking[0][1])
        rows.append((name, " ".join(apply_matches([i for i, _ in ranking], matches.get(name, [])))))
    submission = pd.DataFrame(rows, columns=["Image", "Id"])
    write_csv(submission, out)
    first = submission.Id.str.split().str[0]
    summary = {
        "out": str(out),
        "rows": len(submission),
        "new_whale_first": float((first == NEW_WHALE).mean()),
        "new_whale_threshold": threshold,
        "calibrated_threshold": matcher.threshold,
        "hash_matched": sum(1 for n in names if n in matches),
        "unreadable": len(unreadable),
        "mean_top1_score": float(sum(top_scores) / len(top_scores)),
    }
    if unreadable:
        warn(f"{len(unreadable)} unreadable test images got a fallback ranking, e.g. {unreadable[0]}")
    return summary
