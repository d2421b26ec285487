"""What a resumed run needs besides its weights: the optimiser's state and the random generators', in types torch.load(weights_only=True) accepts."""

from __future__ import annotations

import random

import numpy as np
import torch
from fastcore.foundation import L


def optimizer_state(opt) -> dict:
    """A fastai optimiser's state as plain lists, dicts and numbers, so it loads with torch.load(weights_only=True)."""
    sd = opt.state_dict()
    return {"state": [plain_numbers(s) for s in sd["state"]], "hypers": [plain_numbers(h) for h in sd["hypers"]]}


def plain_numbers(values: dict) -> dict:
    """`values` with NumPy scalars (fastai's one-cycle schedule sets the lr as one) as Python numbers."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def rng_state(dls) -> dict:
    """The random-number generators' states (Python's, NumPy's, torch's, each loader's), in types torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loaders": [dl.rng.getstate() if isinstance(getattr(dl, "rng", None), random.Random) else None for dl in dls.loaders],
    }


def set_rng_state(dls, state: dict) -> None:
    """Restore what `rng_state` saved, so a resumed run draws the same shuffles and augmentations as an uninterrupted one."""
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, loader_state in zip(dls.loaders, state["loaders"]):
        if loader_state is not None:
            dl.rng.setstate(loader_state)


def load_optimizer_state(opt, state: dict) -> None:
    """Restore what `optimizer_state` saved."""
    opt.load_state_dict({"state": state["state"], "hypers": L(state["hypers"])})
