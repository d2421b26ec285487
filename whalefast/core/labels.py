"""Whale ids and the Kaggle label files (Image,Id)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from whalefast.core.errors import WhalefastError
from whalefast.core.files import read_csv_file

if TYPE_CHECKING:
    import pandas as pd

# A whale id: letters, digits, '_', '.' and '-', not starting with '.' or '-'. Nothing a spreadsheet
# reads as a formula, and nothing a shell, a URL or rich's markup treats specially.
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

ID_RULE = "letters, digits, '_', '.' and '-', starting with a letter, digit or '_'"


def is_valid_id(text: str) -> bool:
    """Whether `text` is a whale id whalefast accepts (see ID_RULE)."""
    return bool(ID_PATTERN.fullmatch(text))


def read_labels(path: str | os.PathLike, columns=("Image", "Id"), single_id: bool = True) -> pd.DataFrame:
    """Read an `Image,Id` CSV, checking columns, empty cells and repeated images."""
    path = Path(path)
    df = read_csv_file(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise WhalefastError(f"{path}: expected columns {','.join(columns)}, found {','.join(map(str, df.columns)) or 'none'}")
    df = df[list(columns)].copy()
    for col in columns:
        df[col] = df[col].str.strip()
        empty = df.index[df[col] == ""]
        if len(empty):
            raise WhalefastError(f"{path}: empty {col} on line {empty[0] + 2}")
    bad = df.index[~df["Id"].map(is_valid_id)] if "Id" in columns and single_id else []
    if len(bad):
        raise WhalefastError(f"{path}: malformed Id {df['Id'][bad[0]]!r} on line {bad[0] + 2} (an id is {ID_RULE})")
    dup = df.index[df["Image"].duplicated()]
    if len(dup):
        raise WhalefastError(f"{path}: image {df['Image'][dup[0]]} listed twice (line {dup[0] + 2})")
    return df.reset_index(drop=True)
