"""New photos as a run expects them: at its size, grey or not, cropped to the fluke by its box model where it has one."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from whalefast.core.console import warn
from whalefast.core.errors import WhalefastError
from whalefast.core.images import load_image
from whalefast.core.spec import InputSpec
from whalefast.match.box_model import BoxModel


class PhotoLoader:
    """Loads photos as `spec` says; the box model, if the spec has one, loads on first use."""

    def __init__(self, spec: InputSpec, runtime: str = "auto", device=None):
        self.spec, self.runtime, self.device, self._boxes, self.warned = spec, runtime, device, None, False

    def load(self, path: str | os.PathLike) -> tuple[np.ndarray | None, str]:
        """(array, "") for a readable photo, (None, why) otherwise."""
        return self.load_many([path])[0]

    def load_many(self, paths: list[str | os.PathLike], workers: int | None = None) -> list[tuple[np.ndarray | None, str]]:
        """`load` for each photo, decoded by `workers` threads (one per core) and boxed by the box model in batches."""
        paths = [Path(p) for p in paths]
        boxes: list = [None] * len(paths)
        problems = ["" if p.is_file() else "file not found" for p in paths]
        if self.spec.crop == "boxes" and not self.warned:
            self.warned = True
            warn("this model was trained on fluke crops from a boxes file and has no box model; new photos are used whole")
        # Decoding and resizing release the GIL. The outer catch_warnings is what every thread's own one restores last: the filters end as they began.
        with warnings.catch_warnings(), ThreadPoolExecutor(workers or min(len(paths), os.cpu_count() or 1) or 1) as pool:

            def each(read):
                return list(pool.map(lambda i: self._read(read, paths[i], boxes[i]) if not problems[i] else (None, problems[i]), range(len(paths))))

            if self.spec.crop == "box-model":
                if self._boxes is None:
                    self._boxes = BoxModel(self.spec.box_model, self.device, self.runtime)
                side = self._boxes.cfg.size
                wholes = each(lambda path, _: load_image(path, (side, side)))
                problems = [problem for _, problem in wholes]
                found = [i for i, (_, problem) in enumerate(wholes) if not problem]
                if found:
                    for i, box in zip(found, self._boxes.boxes([paths[i] for i in found], [wholes[i][0] for i in found]).tolist()):
                        boxes[i] = tuple(box)
            return each(lambda path, box: load_image(path, self.spec.size, box, margin=self.spec.margin, grey=self.spec.grey))

    @staticmethod
    def _read(read, path: Path, box) -> tuple[np.ndarray | None, str]:
        try:
            return read(path, box), ""
        except WhalefastError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"unreadable image ({type(e).__name__})"
