"""Reading the Kaggle layout safely and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from whalefast.errors import WhalefastError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_ID_PATTERN = re.compile(r"^\S+$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `df` to `path` atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_csv_file(path: Path) -> pd.DataFrame:
    """A CSV as strings, or a one-line error naming the file."""
    if not path.is_file():
        raise WhalefastError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise WhalefastError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None


def read_labels(path: str | os.PathLike, columns=("Image", "Id"), single_id: bool = True) -> pd.DataFrame:
    """Read an `Image,Id` CSV, checking columns, empty cells and repeated images."""
    path = Path(path)
    df = read_csv_file(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise WhalefastError(
            f"{path}: expected columns {','.join(columns)}, found {','.join(map(str, df.columns)) or 'none'}"
        )
    df = df[list(columns)].copy()
    for col in columns:
        df[col] = df[col].str.strip()
        empty = df.index[df[col] == ""]
        if len(empty):
            raise WhalefastError(f"{path}: empty {col} on line {empty[0] + 2}")
    bad = df.index[~df["Id"].str.match(_ID_PATTERN)] if "Id" in columns and single_id else []
    if len(bad):
        raise WhalefastError(f"{path}: malformed Id {df['Id'][bad[0]]!r} on line {bad[0] + 2}")
    dup = df.index[df["Image"].duplicated()]
    if len(dup):
        raise WhalefastError(f"{path}: image {df['Image'][dup[0]]} listed twice (line {dup[0] + 2})")
    return df.reset_index(drop=True)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Names of the image files in `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WhalefastError(f"{folder}: folder not found")
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: EXIF orientation applied, greyscale replicated, CMYK/palette/16-bit converted."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr * (255.0 / (65535.0 if arr.max() > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (0, 0, 0))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (see `to_rgb`); `draft_size` lets libjpeg decode a large JPEG at a reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            if draft_size and im.format == "JPEG":
                im.draft(im.mode, (draft_size, draft_size))
            im.load()
            return to_rgb(im)


def load_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """The image as a (size, size, 3) uint8 array: the whole photo squashed to a square, so no fluke tip is cut."""
    im = open_rgb(path, draft_size=size * 2)
    return np.asarray(im.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
