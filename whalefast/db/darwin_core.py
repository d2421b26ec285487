"""Sightings in the field's conventions: Darwin Core terms beside Kaggle's Image,Id, read and written by catalogue import and export."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from whalefast.core.errors import WhalefastError
from whalefast.core.files import read_csv_file
from whalefast.core.labels import ID_RULE, is_valid_id

if TYPE_CHECKING:
    import pandas as pd

# Darwin Core term -> the photos table's column. Wildbook/Flukebook bulk imports and OBIS/GBIF uploads map these directly.
TERMS = {
    "eventDate": "event_date",
    "eventTime": "event_time",
    "locality": "locality",
    "decimalLatitude": "latitude",
    "decimalLongitude": "longitude",
    "recordedBy": "photographer",
    "occurrenceID": "occurrence_id",
}
EXTRAS = {"side": "side", "quality": "quality"}  # whalefast's own, for flukes: which side, and how usable
COLUMNS = {**TERMS, **EXTRAS}
METADATA_COLUMNS = list(COLUMNS.values())  # the photos table's sighting columns
TEXT_TERMS = [t for t in COLUMNS if t not in ("decimalLatitude", "decimalLongitude")]
_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?(/\d{4}(-\d{2}(-\d{2})?)?)?")  # ISO 8601: a year, a month, a day, or a range of them


def read_sightings(path: str | os.PathLike) -> pd.DataFrame:
    """An Image,Id CSV with optional Darwin Core columns, checked (one line naming the file, the line and the problem), as the photos table's columns."""
    import pandas as pd

    path = Path(path)
    df = read_csv_file(path)
    for column in ("Image", "Id"):
        if column not in df.columns:
            raise WhalefastError(f"{path}: expected columns Image,Id (and optional {','.join(COLUMNS)}), found {','.join(map(str, df.columns)) or 'none'}")
    df = df.assign(Image=df.Image.str.strip(), Id=df.Id.str.strip())
    for line, (image, wid) in enumerate(zip(df.Image, df.Id), start=2):
        if not image:
            raise WhalefastError(f"{path}: line {line}: empty Image")
        if not is_valid_id(wid):
            raise WhalefastError(f"{path}: line {line}: malformed Id {wid!r} (an id is {ID_RULE})")
    dup = df.index[df.Image.duplicated()]
    if len(dup):
        raise WhalefastError(f"{path}: line {dup[0] + 2}: {df.Image[dup[0]]} listed twice")
    out = pd.DataFrame({"Image": df.Image, "Id": df.Id})
    for term, column in COLUMNS.items():
        values = df[term].str.strip() if term in df.columns else pd.Series([""] * len(df), index=df.index)
        out[column] = values
    for line, date in enumerate(out.event_date, start=2):
        if date and not _DATE.fullmatch(date):
            raise WhalefastError(f"{path}: line {line}: eventDate must be an ISO 8601 date such as 2019-07-14, got {date!r}")
    for column, most in (("latitude", 90), ("longitude", 180)):
        numbers = pd.to_numeric(out[column].replace("", None), errors="coerce")
        bad = out.index[(out[column] != "") & ~(numbers.abs() <= most)]
        if len(bad):
            term = "decimalLatitude" if column == "latitude" else "decimalLongitude"
            raise WhalefastError(f"{path}: line {bad[0] + 2}: {term} must be a number from -{most} to {most}, got {out[column][bad[0]]!r}")
        out[column] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in numbers]
    return out.reset_index(drop=True)


def to_darwin_core(photos: pd.DataFrame) -> pd.DataFrame:
    """The photos table's rows (with Image and Id) under Darwin Core's names, as export writes them."""
    renamed = photos.rename(columns={column: term for term, column in COLUMNS.items()})
    return renamed[["Image", "Id", *COLUMNS, *[c for c in renamed.columns if c not in ("Image", "Id", *COLUMNS)]]]
