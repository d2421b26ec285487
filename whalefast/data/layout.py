"""The Kaggle layout of a data folder: train.csv, train/, test/ and sample_submission.csv."""

from __future__ import annotations

from pathlib import Path

from whalefast.core.errors import WhalefastError
from whalefast.core.images import list_images
from whalefast.core.labels import read_labels


def check_layout(data: Path) -> None:
    """Fail with one line if `data` is not in the Kaggle layout."""
    if not data.is_dir():
        raise WhalefastError(f"{data}: data folder not found")
    for name in ("train.csv", "train", "test"):
        if not (data / name).exists():
            raise WhalefastError(f"{data / name}: not found (expected the Kaggle layout: train.csv, train/, test/)")


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
