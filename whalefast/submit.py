"""The submit stage: a Kaggle submission for every photo in test/."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from whalefast import NEW_WHALE
from whalefast.console import progress_bar, warn
from whalefast.data import check_prepared, image_cache
from whalefast.errors import WhalefastError
from whalefast.inference import Scorer
from whalefast.io import file_digest, list_images, read_labels, write_csv


def test_images(data: Path) -> list[str]:
    """The photos in test/, checked against sample_submission.csv when there is one."""
    names = list_images(data / "test")
    sample_path = data / "sample_submission.csv"
    if sample_path.exists():
        sample = read_labels(sample_path, single_id=False)
        expected, found = set(sample.Image), set(names)
        if expected - found:
            raise WhalefastError(f"{data / 'test'}: {sorted(expected - found)[0]} is in sample_submission.csv but not in test/")
        if found - expected:
            raise WhalefastError(f"{data / 'test'}: {sorted(found - expected)[0]} is not in sample_submission.csv")
        names = sample.Image.tolist()
    if not names:
        raise WhalefastError(f"{data / 'test'}: no images")
    return names


def hash_matches(prepared: Path) -> dict[str, list[str]]:
    """For each test photo that duplicates training photos, their ids, closest first."""
    path = prepared / "test_matches.csv"
    if not path.exists():
        return {}
    matches = pd.read_csv(path, dtype=str, keep_default_na=False)
    out: dict[str, list[str]] = {}
    for image, group in matches.groupby("Image", sort=False):
        out[image] = list(dict.fromkeys(group.sort_values("distance").Id))
    return out


def check_same_data(cfg, run_dir: Path, data: Path) -> None:
    """A one-line error if the run learnt from another dataset than `data` (its ids would mix with this one's); a warning if train.csv merely grew."""
    train_csv = data / "train.csv"
    if not cfg.train_digest or file_digest(train_csv) == cfg.train_digest:
        return
    ids = set(read_labels(train_csv).Id)
    missing = [i for i in cfg.vocab if i not in ids]
    if missing:
        raise WhalefastError(
            f"{run_dir}: trained on other data than {train_csv} ({len(missing)} of its {len(cfg.vocab)} ids, e.g. {missing[0]}, are not in it); "
            f"submit with the data it was trained on (--data {cfg.data})"
        )
    warn(f"{train_csv} changed after {run_dir.name} was trained (every id it knows is still there); new ids are unknown to it until you fit again")


def apply_matches(ranked: list[str], matched: list[str], k: int = 5) -> list[str]:
    """Put the ids of hash-matched training photos first, then the model's ranking, each id once."""
    return list(dict.fromkeys(matched + ranked))[:k]


def submit(data: str | os.PathLike, run_dir: str | os.PathLike, out: str | os.PathLike = "submission.csv", tta: bool = True, prepared=None) -> dict:
    """Predict every test photo and write `out` (Image,Id with five ids) atomically; returns a summary."""
    data = Path(data)
    prepared = Path(prepared) if prepared else data / "prepared"
    names = test_images(data)
    check_prepared(prepared)
    scorer = Scorer(run_dir)
    check_same_data(scorer.cfg, Path(run_dir), data)
    images = image_cache(data, prepared, "test", names, scorer.cfg.size, crop=scorer.cfg.crop, grey=scorer.cfg.grey)
    unreadable = [n for n in names if n in images.problems]
    readable = [n for n in names if n not in images.problems]
    with progress_bar("predicting test/", len(readable)) as advance:
        scores = scorer.scores([images[n] for n in readable], tta=tta, progress=advance)
    ranked = dict(zip(readable, scorer.rank(scores)))
    fallback = [(NEW_WHALE, 0.0)] + [(i, 0.0) for i in scorer.ids[:4]]
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
        "hash_matched": sum(1 for n in names if n in matches),
        "unreadable": len(unreadable),
        "mean_top1_score": float(sum(top_scores) / len(top_scores)),
    }
    if unreadable:
        warn(f"{len(unreadable)} unreadable test images got a fallback ranking, e.g. {unreadable[0]}")
    return summary
