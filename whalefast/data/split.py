"""The honest validation split and the oversampling splitter."""

from __future__ import annotations

import numpy as np
import pandas as pd

from whalefast import NEW_WHALE
from whalefast.data.dedup import group_labels, hashes_to_ints

SPLIT_GROUP_DISTANCE = 4  # near duplicates closer than this stay on one side of the split


def make_split(clean: pd.DataFrame, valid_pct: float = 0.2, unseen_pct: float = 0.3, seed: int = 42, max_distance: int = 0) -> pd.DataFrame:
    """Hold out one photo per catalogued id plus some unseen whales; no near-duplicate group crosses the split.

    Returns Image, Id, group, is_valid and target: the label validation scores against, which is
    `new_whale` for a held-out photo whose id has no training photo left.
    """
    df = clean[["Image", "Id", "hash"]].reset_index(drop=True).copy()
    df["group"] = group_labels(hashes_to_ints(df["hash"]), max(max_distance, SPLIT_GROUP_DISTANCE))
    rng = np.random.default_rng(seed)
    groups_of = df.groupby("Id")["group"].agg(lambda g: sorted(set(g)))
    group_size = df.group.value_counts()
    catalogued = [wid for wid, gs in groups_of.items() if wid != NEW_WHALE and len(gs) >= 2]
    # One photo per catalogued id at most, so the seen part is capped; the unseen share follows it.
    n_seen = min(int(round(valid_pct * len(df) * (1 - unseen_pct))), len(catalogued))
    n_unseen = int(round(n_seen * unseen_pct / (1 - unseen_pct))) if unseen_pct < 1 else int(round(valid_pct * len(df)))
    n_valid = n_seen + n_unseen
    valid_groups: set[int] = set()

    unseen_pool = [g for g in df.loc[df.Id == NEW_WHALE, "group"].unique()]
    unseen_pool += [gs[0] for wid, gs in groups_of.items() if wid != NEW_WHALE and len(gs) == 1]
    unseen_pool = sorted(set(unseen_pool))
    rng.shuffle(unseen_pool)
    taken = 0
    for g in unseen_pool:
        if taken >= n_unseen:
            break
        valid_groups.add(g)
        taken += int(group_size[g])

    rng.shuffle(catalogued)
    for wid in catalogued:
        if taken >= n_valid:
            break
        gs = [g for g in groups_of[wid] if g not in valid_groups]
        if len(gs) < 2:
            continue
        g = gs[int(rng.integers(len(gs)))]
        valid_groups.add(g)
        taken += int(group_size[g])

    df["is_valid"] = df.group.isin(valid_groups)
    train_ids = set(df.loc[~df.is_valid, "Id"])
    df["target"] = np.where(df.Id.isin(train_ids) & (df.Id != NEW_WHALE), df.Id, NEW_WHALE)
    df.loc[~df.is_valid, "target"] = df.loc[~df.is_valid, "Id"]
    return df.drop(columns=["hash"])


def oversampling_splitter(min_samples: int = 10, valid_col: str = "is_valid", label_col: str = "Id"):
    """Split on `valid_col`; training indices repeat each id with fewer than `min_samples` photos up to that count.

    The originals come first, in order, then the repeats: position >= number of originals marks a repeat.
    """

    def _inner(items: pd.DataFrame):
        valid = items[valid_col].to_numpy(dtype=bool)
        train_idx = np.flatnonzero(~valid)
        labels = items[label_col].to_numpy()[train_idx]
        repeats = []
        for label in pd.unique(labels):
            idxs = train_idx[labels == label]
            if len(idxs) < min_samples:
                repeats.append(np.resize(idxs, min_samples - len(idxs)))
        extra = np.concatenate(repeats) if repeats else np.array([], dtype=int)
        return [int(i) for i in np.concatenate([train_idx, extra])], [int(i) for i in np.flatnonzero(valid)]

    return _inner
