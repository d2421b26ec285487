"""Fluke box files: Image,x0,y0,x1,y1 in pixels of each photo (the widely shared Kaggle bounding_boxes.csv format)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from whalefast.core.errors import WhalefastError
from whalefast.core.files import read_csv_file, write_csv
from whalefast.core.labels import read_labels

if TYPE_CHECKING:
    import pandas as pd

BOX_COLUMNS = ["x0", "y0", "x1", "y1"]


def read_boxes(path: str | os.PathLike) -> pd.DataFrame:
    """A boxes CSV (Image,x0,y0,x1,y1 in pixels of each photo), checked: one line naming the file and the problem."""
    import pandas as pd

    path = Path(path)
    df = read_csv_file(path)
    missing = [c for c in ["Image", *BOX_COLUMNS] if c not in df.columns]
    if missing:
        raise WhalefastError(f"{path}: expected columns Image,x0,y0,x1,y1, found {','.join(map(str, df.columns)) or 'none'}")
    df = df[["Image", *BOX_COLUMNS]].copy()
    df["Image"] = df.Image.str.strip()
    for c in BOX_COLUMNS:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = df.index[values.isna() | ~np.isfinite(values.fillna(0)) | (values < 0)]
        if len(bad):
            raise WhalefastError(f"{path}: line {bad[0] + 2}: {c} must be a number of pixels, got {df[c][bad[0]]!r}")
        df[c] = values.astype(float)
    empty = df.index[(df.x1 <= df.x0) | (df.y1 <= df.y0)]
    if len(empty):
        raise WhalefastError(f"{path}: line {empty[0] + 2}: an empty box (x1 must exceed x0 and y1 exceed y0)")
    dup = df.index[df.Image.duplicated()]
    if len(dup):
        raise WhalefastError(f"{path}: line {dup[0] + 2}: {df.Image[dup[0]]} has two boxes")
    return df.reset_index(drop=True)


def write_training_boxes(boxes_csv: str | os.PathLike, labels_csv: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The boxes of the labelled (training) photos alone, written to out: what an honest box model may learn from."""
    boxes = read_boxes(boxes_csv)
    train = set(read_labels(labels_csv).Image)
    return write_csv(boxes[boxes.Image.isin(train)], out)
