"""Reading the Kaggle layout safely and writing outputs atomically."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from whalefast.errors import StorageError, WhalefastError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# A whale id: letters, digits, '_', '.' and '-', not starting with '.' or '-'. Nothing a spreadsheet
# reads as a formula, and nothing a shell, a URL or rich's markup treats specially.
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
ID_RULE = "letters, digits, '_', '.' and '-', starting with a letter, digit or '_'"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")


def is_valid_id(text: str) -> bool:
    """Whether `text` is a whale id whalefast accepts (see ID_RULE)."""
    return bool(ID_PATTERN.fullmatch(text))


def os_error_text(e: OSError, path: str | os.PathLike | None = None) -> str:
    """An OSError as one line naming its file: '...: no space left on device'."""
    where = path if path is not None else e.filename
    if e.errno in FULL_DISK:
        return f"{where}: no space left on device; free some space and run it again (what was there before is unchanged)"
    if e.errno in NOT_WRITABLE:
        return f"{where}: cannot write here ({os.strerror(e.errno).lower()})"
    return f"{where}: {e.strerror or type(e).__name__}"


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    The new file is flushed to disk before the rename, so a crash or power cut leaves either the old
    file or the new one. A full disk or an unwritable folder is a one-line error naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:  # not mkstemp: its files are 0600, and outputs must honour the user's umask like any new file
            tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
    except OSError as e:
        raise StorageError(os_error_text(e, path.parent)) from None
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except OSError as e:
        if e.errno in FULL_DISK + NOT_WRITABLE:
            raise StorageError(os_error_text(e, path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def reserve_space(path: str | os.PathLike, nbytes: int) -> None:
    """Grow the file at `path` to `nbytes` with its disk blocks allocated now.

    A memory map over a sparse file meets a full disk as SIGBUS in the middle of writing; reserved
    blocks make it an OSError (ENOSPC) here, which atomic_path turns into one line.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, nbytes)  # a file system without fallocate
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temporary files that killed whalefast processes left in `folder`; how many went."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for tmp in folder.iterdir():
        match = _TEMP.match(tmp.name)
        if not match or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def spreadsheet_safe(value):
    """A cell as a spreadsheet shows it and never runs it: text starting with = + - @ tab, CR or ' gets a leading '.

    OWASP's rule for CSV injection; the ' also marks text that started with one, so `from_spreadsheet_safe`
    gives back exactly what was written.
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r", "'"):
        return "'" + value
    return value


def from_spreadsheet_safe(value):
    """What `spreadsheet_safe` was given."""
    return value[1:] if isinstance(value, str) and value[:1] == "'" else value


def safe_csv_text(df: pd.DataFrame, columns=None) -> str:
    """`df` as CSV text with the text cells of `columns` (default: all) neutralised by `spreadsheet_safe`."""
    columns = list(df.columns) if columns is None else [c for c in columns if c in df.columns]
    return df.assign(**{c: df[c].map(spreadsheet_safe) for c in columns}).to_csv(index=False)


def write_csv(df: pd.DataFrame, path: str | os.PathLike, user_text=()) -> Path:
    """Write `df` to `path` atomically; cells of the `user_text` columns (what a person typed) can never run as a spreadsheet formula."""
    with atomic_path(path) as tmp:
        tmp.write_text(safe_csv_text(df, user_text)) if user_text else df.to_csv(tmp, index=False)
    return Path(path)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_torch(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` (tensors, lists, numbers and strings) to `path` atomically.

    Serialised in memory first: torch's own file writer reports a full disk as a cryptic
    'unexpected pos' RuntimeError, a plain write as the OSError it is.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(buffer.getvalue(), path)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: the identity of a photo in the catalogue, of a train.csv in a run."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finite_or_none(obj):
    """`obj` with every NaN or infinite float replaced by None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def to_json(obj) -> str:
    """Strict JSON text of `obj` (non-finite numbers become null), indented."""
    return json.dumps(finite_or_none(obj), indent=2, allow_nan=False)


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write `obj` as strict JSON to `path` atomically."""
    return write_text(to_json(obj) + "\n", path)


def load_saved(path: str | os.PathLike, what: str):
    """A file whalefast saved with torch (weights, resume state, catalogue), loaded without running code from it; a one-line error naming it if it cannot be."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged, truncated or foreign file
        raise WhalefastError(f"{path}: not a whalefast {what}, or damaged ({type(e).__name__})") from None


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


Size = tuple[int, int]  # (height, width) in pixels
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the upright photo
MAX_SIDE = 2048  # the largest input side: the decoded-image cache holds height x width x 3 bytes per photo
BOX_MARGIN = 0.1  # a crop keeps this share of the box's width and height on each side, so no fluke tip is cut


def parse_size(text: str | int, option: str = "--size") -> Size:
    """'224' -> (224, 224); '128x256' -> (128, 256) (height x width); a one-line error otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not match:
        raise WhalefastError(f"{option} must be N or HEIGHTxWIDTH in pixels (e.g. 224 or 128x256), got {text!r}")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if min(h, w) < 16:
        raise WhalefastError(f"{option} must be at least 16 pixels each way, got {text!r}")
    if max(h, w) > MAX_SIDE:
        raise WhalefastError(f"{option} must be at most {MAX_SIDE} pixels each way, got {text!r}")
    return h, w


def as_size(value) -> Size:
    """A size given as an int (square), 'HxW' text or a (height, width) pair, as (height, width)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return parse_size(value)


def as_scales(value, option: str = "--tta-scales") -> tuple[float, ...]:
    """Test-time scale factors given as text ('6/7,1,8/7' or '0.86,1,1.14'), a number or a sequence, as a tuple of floats; a one-line error otherwise."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        scales = tuple(float(Fraction(str(p).strip())) for p in parts)
    except (ValueError, ZeroDivisionError):
        scales = ()
    if not scales or not all(0 < s <= 4 for s in scales):
        raise WhalefastError(f"{option} must be comma-separated factors between 0 and 4 (e.g. 6/7,1,8/7), got {value!r}")
    return scales


def size_text(size) -> str:
    """(128, 256) -> '128x256'; (224, 224) -> '224'."""
    h, w = as_size(size)
    return str(h) if h == w else f"{h}x{w}"


def open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (see `to_rgb`); `draft_size` lets libjpeg decode a large JPEG at a reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            if draft_size and im.format == "JPEG":
                im.draft(im.mode, (draft_size, draft_size))
            im.load()
            return to_rgb(im)


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of `im` once its EXIF orientation is applied."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def photo_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a photo as whalefast shows it (EXIF orientation applied), read from its header."""
    with Image.open(path) as im:
        return _upright_size(im)


def widen_box(box: Box, width: int, height: int, margin: float = BOX_MARGIN) -> Box:
    """`box` grown by `margin` of its size on each side, clipped to a width x height photo."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    return max(0.0, x0 - mx), max(0.0, y0 - my), min(float(width), x1 + mx), min(float(height), y1 + my)


def load_image(path: str | os.PathLike, size: Size, box: Box | None = None, margin: float = BOX_MARGIN, grey: bool = False) -> np.ndarray:
    """The photo, or its fluke `box` widened by `margin`, resized to size = (height, width): a (height, width, 3) uint8 array.

    With `grey`, colour photos are turned grey (three equal channels), like the greyscale ones.
    """
    h, w = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            full_w, full_h = _upright_size(im)
            if box is not None:
                box = widen_box(box, full_w, full_h, margin)
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    box = None  # a box outside the photo: use the whole photo
            if im.format == "JPEG":  # let libjpeg decode at a reduced scale that still leaves 2x the pixels needed
                fx = 1.0 if box is None else (box[2] - box[0]) / full_w
                fy = 1.0 if box is None else (box[3] - box[1]) / full_h
                want = int(2 * max(w / fx, h / fy))
                im.draft(im.mode, (want, want))
            im.load()
            rgb = to_rgb(im)
    if grey:
        rgb = rgb.convert("L").convert("RGB")
    if box is not None:
        scale = rgb.width / full_w
        rgb = rgb.crop(tuple(round(v * scale) for v in box))
    return np.asarray(rgb.resize((w, h), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
