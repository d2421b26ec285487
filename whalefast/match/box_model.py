"""A trained fluke box model, loaded once: boxes in pixels for whole photos, for prepare --boxes MODEL and for new photos."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from whalefast.core.errors import WhalefastError
from whalefast.core.images import load_image, photo_size
from whalefast.data.boxes_csv import BOX_COLUMNS
from whalefast.data.prepared import whole_photo_cache
from whalefast.nets.forward import default_device
from whalefast.nets.heads import predict_fractions
from whalefast.runs.folder import BOXES, Run

if TYPE_CHECKING:
    import pandas as pd


def check_box_model(run_dir: str | os.PathLike) -> Run:
    """The finished box model in `run_dir`, or a one-line error saying what it is instead."""
    run = Run.open(run_dir, kind=BOXES)
    if not (run / Run.WEIGHTS).is_file():
        raise WhalefastError(f"{run / Run.WEIGHTS}: not found; run `whalefast boxes fit --name {run.name}` again")
    return run


class BoxModel:
    """A trained box regressor, loaded once (eval mode): fluke boxes in pixels for whole photos."""

    def __init__(self, run_dir: str | os.PathLike, device: torch.device | None = None, runtime: str = "auto"):
        run = check_box_model(run_dir)
        self.cfg = run.settings
        self.device = device or default_device()
        self.model = run.inference_network(runtime, self.device)

    def boxes(self, paths: list[Path], arrays=None) -> np.ndarray:
        """(N, 4) boxes (x0, y0, x1, y1) in pixels of each photo; `arrays` are the photos already decoded at the model's size."""
        if arrays is None:
            arrays = [load_image(p, (self.cfg.size, self.cfg.size)) for p in paths]
        fractions = predict_fractions(self.model, arrays, self.device).numpy()
        sizes = np.array([photo_size(p) for p in paths], dtype=float).reshape(-1, 2)
        return fractions * np.concatenate([sizes, sizes], axis=1)


def predict_boxes(
    box_model: BoxModel | str | os.PathLike, folder: str | os.PathLike, names: list[str], cache_dir: str | os.PathLike | None = None, runtime: str = "auto"
) -> pd.DataFrame:
    """Predicted boxes (Image,x0,y0,x1,y1 in pixels) for photos in `folder`; with `cache_dir`, unreadable photos are left out."""
    import pandas as pd

    model = box_model if isinstance(box_model, BoxModel) else BoxModel(box_model, runtime=runtime)
    folder = Path(folder)
    arrays = None
    if cache_dir is not None:
        images = whole_photo_cache(folder, names, model.cfg.size, Path(cache_dir))
        names = [n for n in names if n not in images.problems]
        arrays = [images[n] for n in names]
    pixels = model.boxes([folder / n for n in names], arrays)
    return pd.DataFrame({"Image": names, **{c: pixels[:, i] for i, c in enumerate(BOX_COLUMNS)}})
