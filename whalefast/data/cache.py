"""Decode, crop and resize every image once into a memory-mapped uint8 array that the DataLoaders read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from whalefast.core.files import atomic_path, remove_stale_temps, reserve_space, write_csv
from whalefast.core.images import BOX_MARGIN, Box, Size, as_size, load_image, size_text
from whalefast.core.parallel import process_pool


class CachedImages:
    """Read-only view of a decoded-image cache: `images[name]` gives a (height, width, 3) uint8 array."""

    def __init__(self, data_path: str | os.PathLike, names: list[str], size: Size, problems: dict[str, str] | None = None):
        self.data_path, self.size = str(data_path), tuple(size)
        self.problems = problems or {}  # name -> why it could not be decoded (its row is black)
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:  # opened lazily, so DataLoader workers map the file instead of copying it
            self._array = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(len(self.names), *self.size, 3))
        return self._array

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array[self.index[name]]


def _decode_chunk(args: tuple[list[str], list[Box | None], Size, bool, float]) -> tuple[np.ndarray, list[str]]:
    paths, boxes, size, grey, margin = args
    arrays, problems = np.zeros((len(paths), *size, 3), np.uint8), []
    for i, (p, box) in enumerate(zip(paths, boxes)):
        try:
            arrays[i] = load_image(p, size, box, margin=margin, grey=grey)
            problems.append("")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            problems.append(f"unreadable ({type(e).__name__})")
    return arrays, problems


def _box_text(box: Box | None) -> str:
    return "" if box is None else " ".join(f"{v:.2f}" for v in box)


def build_cache(
    folder: str | os.PathLike,
    names: list[str],
    cache_dir: str | os.PathLike,
    size: Size,
    boxes: dict[str, Box] | None = None,
    grey: bool = False,
    margin: float = BOX_MARGIN,
    workers: int | None = None,
    progress=None,
) -> CachedImages:
    """Cache `names` from `folder` at size (height, width), each cropped to its box in `boxes` widened by `margin` if it has one (and grey with `grey`).

    Files whose size, mtime and box are unchanged are not decoded again.
    """
    import pandas as pd

    folder, cache_dir, size = Path(folder), Path(cache_dir), as_size(size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache_dir)
    stem = (
        cache_dir
        / f"{folder.name}-{size_text(size)}{'-crop' if boxes is not None else ''}{f'-margin{margin:g}' if boxes is not None and margin != BOX_MARGIN else ''}{'-grey' if grey else ''}"
    )
    data_path, index_path = stem.with_suffix(".u8"), stem.with_suffix(".csv")
    boxes = boxes or {}
    stats = {n: os.stat(folder / n) for n in names}
    key = {n: (st.st_size, st.st_mtime_ns, _box_text(boxes.get(n))) for n, st in stats.items()}

    columns = ["Image", "bytes", "mtime_ns", "box", "problem"]
    old = pd.read_csv(index_path, keep_default_na=False, dtype={"box": str}) if index_path.exists() and data_path.exists() else pd.DataFrame(columns=columns)
    if list(old.columns) != columns:
        old = pd.DataFrame(columns=columns)
    problems = {r.Image: r.problem for r in old.itertuples(index=False) if r.problem}
    old_rows = {r.Image: i for i, r in enumerate(old.itertuples(index=False)) if key.get(r.Image) == (int(r.bytes), int(r.mtime_ns), r.box)}
    if len(old) and all(n in old_rows for n in names) and list(old.Image) == list(names):
        return CachedImages(data_path, names, size, problems)

    todo = [n for n in names if n not in old_rows]
    old_array = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(len(old), *size, 3)) if len(old) else None
    shape = (max(1, len(names)), *size, 3)
    with atomic_path(data_path) as tmp:
        reserve_space(tmp, int(np.prod(shape)))
        out = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
        for i, n in enumerate(names):
            if n in old_rows:
                out[i] = old_array[old_rows[n]]
        position = {n: i for i, n in enumerate(names)}
        workers = workers or os.cpu_count() or 1
        step = max(1, min(64, len(todo) // (workers * 4) + 1))
        chunks = [todo[i : i + step] for i in range(0, len(todo), step)]
        if chunks:
            with process_pool(workers) as pool:
                jobs = [([str(folder / n) for n in c], [boxes.get(n) for n in c], tuple(size), grey, margin) for c in chunks]
                for chunk, (arr, chunk_problems) in zip(chunks, pool.map(_decode_chunk, jobs)):
                    out[[position[n] for n in chunk]] = arr
                    problems.update({n: p for n, p in zip(chunk, chunk_problems)})
                    if progress:
                        progress(len(chunk))
        out.flush()
        del out
        index_path.unlink(missing_ok=True)  # a stale index must never describe the new data
    problems = {n: problems[n] for n in names if problems.get(n)}
    index = {
        "Image": names,
        "bytes": [key[n][0] for n in names],
        "mtime_ns": [key[n][1] for n in names],
        "box": [key[n][2] for n in names],
        "problem": [problems.get(n, "") for n in names],
    }
    write_csv(pd.DataFrame(index), index_path)
    return CachedImages(data_path, names, size, problems)
