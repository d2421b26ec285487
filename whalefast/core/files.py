"""Files whalefast writes and reads back: atomic writes, strict JSON, spreadsheet-safe CSV, torch files without code, digests."""

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
from pathlib import Path
from typing import TYPE_CHECKING

from whalefast.core.errors import StorageError, WhalefastError

if TYPE_CHECKING:  # pandas loads where it is used: matching one photo needs none (0.2 s)
    import pandas as pd

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)

NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")


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


def read_safe_csv(path: str | os.PathLike, text_columns=()) -> pd.DataFrame:
    """A CSV written by write_csv(user_text=...), as strings, its text cells as they were typed."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df.assign(**{c: df[c].map(from_spreadsheet_safe) for c in text_columns if c in df.columns})


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


def load_saved(path: str | os.PathLike, what: str):
    """A file whalefast saved with torch (weights, resume state, catalogue), loaded without running code from it; a one-line error naming it if it cannot be."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged, truncated or foreign file
        raise WhalefastError(f"{path}: not a whalefast {what}, or damaged ({type(e).__name__})") from None


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


def read_csv_file(path: Path) -> pd.DataFrame:
    """A CSV as strings, or a one-line error naming the file."""
    import pandas as pd

    if not path.is_file():
        raise WhalefastError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise WhalefastError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
