"""The evaluate stage: MAP@5 of a submission against the answers, after checking its format."""

from __future__ import annotations

import os
from pathlib import Path

from whalefast import NEW_WHALE
from whalefast.core.errors import WhalefastError
from whalefast.core.files import read_csv_file
from whalefast.core.labels import read_labels
from whalefast.core.ranking import map5_labels


def read_submission(path: str | os.PathLike, images: list[str], known_ids: set[str] | None = None) -> dict[str, list[str]]:
    """A submission as {image: [ids]}, rejecting the first format problem with a one-line error."""
    path = Path(path)
    df = read_csv_file(path)
    if list(df.columns) != ["Image", "Id"]:
        raise WhalefastError(f"{path}: header must be Image,Id, found {','.join(map(str, df.columns))}")
    seen: dict[str, list[str]] = {}
    expected = set(images)
    for line, (image, ids) in enumerate(zip(df.Image, df.Id), start=2):
        if image in seen:
            raise WhalefastError(f"{path}: line {line}: {image} appears twice")
        if image not in expected:
            raise WhalefastError(f"{path}: line {line}: {image} is not a test image")
        labels = ids.split()
        if not labels:
            raise WhalefastError(f"{path}: line {line}: no ids for {image}")
        if len(labels) > 5:
            raise WhalefastError(f"{path}: line {line}: {len(labels)} ids for {image}, at most 5 allowed")
        if known_ids is not None:
            unknown = [i for i in labels if i != NEW_WHALE and i not in known_ids]
            if unknown:
                raise WhalefastError(f"{path}: line {line}: unknown id {unknown[0]}")
        seen[image] = labels
    missing = [i for i in images if i not in seen]
    if missing:
        raise WhalefastError(f"{path}: no row for {missing[0]} ({len(missing)} test images missing)")
    return seen


def evaluate(submission: str | os.PathLike, answers: str | os.PathLike, train_csv: str | os.PathLike | None = None) -> dict:
    """MAP@5 of `submission` against `answers` (Image,Id), with its catalogued / new_whale breakdown and top-1."""
    truth = read_labels(answers)
    if train_csv is None and (Path(answers).parent / "train.csv").exists():
        train_csv = Path(answers).parent / "train.csv"
    train = read_labels(train_csv) if train_csv else None
    known = set(train.Id) if train is not None else None
    predictions = read_submission(submission, truth.Image.tolist(), known)
    preds = [predictions[i] for i in truth.Image]
    is_new = truth.Id == NEW_WHALE

    def part(mask) -> float:
        return map5_labels([p for p, m in zip(preds, mask) if m], truth.Id[mask].tolist())

    photos = train.Id.value_counts() if train is not None else None
    single = truth.Id.map(photos).fillna(0).eq(1) & ~is_new if photos is not None else None
    return {
        "map5_single_photo_ids": part(single) if single is not None else None,
        "single_photo_ids": int(single.sum()) if single is not None else 0,
        "map5": map5_labels(preds, truth.Id.tolist()),
        "map5_catalogued": part(~is_new),
        "map5_new_whale": part(is_new),
        "top1": sum(p[0] == t for p, t in zip(preds, truth.Id)) / len(truth),
        "images": len(truth),
        "catalogued": int((~is_new).sum()),
        "new_whale": int(is_new.sum()),
    }
