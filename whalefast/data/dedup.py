"""Perceptual hashes (parallel, cached), duplicate groups and the reference's dedup rules."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from whalefast import NEW_WHALE
from whalefast.core.images import to_rgb
from whalefast.core.parallel import process_pool

HASH_COLUMNS = ["Image", "Folder", "hash", "width", "height", "mode", "bytes", "mtime_ns", "problem"]


def hash_one(path: str) -> tuple[str, int, int, str, str]:
    """pHash (hex), width, height, mode of one image, decoded once; a problem text instead if it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as raw:
                raw.load()
                mode = raw.mode
                im = to_rgb(raw)
    except FileNotFoundError:
        return "", 0, 0, "", "missing"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return "", 0, 0, "", f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
    return str(imagehash.phash(im)), im.width, im.height, mode, ""


def _hash_chunk(paths: list[str]) -> list[tuple]:
    return [hash_one(p) for p in paths]


def hash_images(folder: str | os.PathLike, names: list[str], cache: pd.DataFrame | None = None, workers: int | None = None, progress=None) -> pd.DataFrame:
    """Hash `names` in `folder` on all cores, reusing rows of `cache` whose file size and mtime are unchanged."""
    folder = Path(folder)
    rows, todo = {}, []
    cached = {} if cache is None or cache.empty else {(r.Folder, r.Image): r for r in cache.itertuples(index=False)}
    for name in names:
        path = folder / name
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            rows[name] = (name, folder.name, "", 0, 0, "", 0, 0, "missing")
            continue
        except OSError as e:  # a symbolic link loop, a file we may not read
            rows[name] = (name, folder.name, "", 0, 0, "", 0, 0, f"unreadable ({e.strerror or type(e).__name__})")
            continue
        hit = cached.get((folder.name, name))
        if hit is not None and int(hit.bytes) == size and int(hit.mtime_ns) == mtime:
            rows[name] = tuple(hit)
        else:
            todo.append((name, size, mtime))
    if progress and len(rows):
        progress(len(rows))
    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(64, len(todo) // (workers * 4) + 1))
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    if chunks:
        with process_pool(workers) as pool:
            for part, results in zip(chunks, pool.map(_hash_chunk, [[str(folder / n) for n, _, _ in c] for c in chunks])):
                for (name, size, mtime), (h, w, hgt, mode, problem) in zip(part, results):
                    rows[name] = (name, folder.name, h, w, hgt, mode, size, mtime, problem)
                if progress:
                    progress(len(part))
    df = pd.DataFrame([rows[n] for n in names], columns=HASH_COLUMNS)
    df["problem"] = df["problem"].fillna("").astype(str)
    df["hash"] = df["hash"].fillna("").astype(str)
    return df


def hashes_to_ints(hexes) -> np.ndarray:
    """Hex pHash strings as uint64."""
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def hamming_pairs(a: np.ndarray, b: np.ndarray | None = None, max_distance: int = 0, block: int = 2048):
    """Index pairs (i, j) with Hamming distance <= max_distance between hashes a[i] and b[j] (i < j within one set)."""
    same = b is None
    b = a if same else b
    out_i, out_j = [], []
    for start in range(0, len(a), block):
        x = a[start : start + block, None] ^ b[None, :]
        dist = np.bitwise_count(x)
        i, j = np.nonzero(dist <= max_distance)
        i = i + start
        if same:
            keep = i < j
            i, j = i[keep], j[keep]
        out_i.append(i)
        out_j.append(j)
    if not out_i:
        return np.array([], dtype=int), np.array([], dtype=int)
    return np.concatenate(out_i), np.concatenate(out_j)


def group_labels(hashes: np.ndarray, max_distance: int = 0) -> np.ndarray:
    """Connected components of images within `max_distance` of each other: a group number per image."""
    parent = np.arange(len(hashes))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in zip(*hamming_pairs(hashes, max_distance=max_distance)):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(len(hashes))])
    _, labels = np.unique(roots, return_inverse=True)
    return labels


def decide_group(ids: list[str]) -> str:
    """The reference's rule for one duplicate group: keep_one, drop_new_whale or drop_all."""
    known = set(ids) - {NEW_WHALE}
    if len(set(ids)) == 1:
        return "keep_one"
    if len(known) == 1:
        return "drop_new_whale"
    return "drop_all"


def dedup(train: pd.DataFrame, max_distance: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the dedup rules to `train` (Image, Id, hash, width, height): the clean set and one row per group."""
    train = train.reset_index(drop=True).copy()
    train["group"] = group_labels(hashes_to_ints(train["hash"]), max_distance)
    keep = np.ones(len(train), dtype=bool)
    groups = []
    for g, members in train.groupby("group", sort=False):
        if len(members) < 2:
            continue
        action = decide_group(members["Id"].tolist())
        candidates = members if action == "keep_one" else members[members["Id"] != NEW_WHALE]
        if action == "drop_all":
            kept = []
        else:  # keep the largest photo; ties broken by name so the choice is stable
            best = candidates.assign(area=candidates.width * candidates.height).sort_values(["area", "Image"], ascending=[False, True])
            kept = [best.index[0]]
        keep[members.index] = False
        keep[kept] = True
        groups.append(
            {
                "group": int(g),
                "action": action,
                "images": " ".join(members["Image"]),
                "ids": " ".join(members["Id"]),
                "kept": " ".join(train.loc[kept, "Image"]),
            }
        )
    clean = train[keep].reset_index(drop=True)
    return clean, pd.DataFrame(groups, columns=["group", "action", "images", "ids", "kept"])


def match_test(test: pd.DataFrame, train: pd.DataFrame, max_distance: int = 0) -> pd.DataFrame:
    """Pairs of test and training images whose hashes lie within `max_distance`, with the training image's id."""
    i, j = hamming_pairs(hashes_to_ints(test["hash"]), hashes_to_ints(train["hash"]), max_distance)
    a, b = hashes_to_ints(test["hash"])[i], hashes_to_ints(train["hash"])[j]
    return (
        pd.DataFrame(
            {
                "Image": test["Image"].to_numpy()[i],
                "TrainImage": train["Image"].to_numpy()[j],
                "Id": train["Id"].to_numpy()[j],
                "distance": np.bitwise_count(a ^ b).astype(int),
            }
        )
        .sort_values(["Image", "distance", "TrainImage"])
        .reset_index(drop=True)
    )
