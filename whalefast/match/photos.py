"""New photos as a run expects them: at its size, grey or not, cropped to the fluke by its box model where it has one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from whalefast.core.console import warn
from whalefast.core.errors import WhalefastError
from whalefast.core.images import load_image
from whalefast.core.spec import InputSpec
from whalefast.match.box_model import BoxModel


class PhotoLoader:
    """Loads photos as `spec` says; the box model, if the spec has one, loads on first use."""

    def __init__(self, spec: InputSpec):
        self.spec, self._boxes, self.warned = spec, None, False

    def box(self, path: Path):
        """The fluke box of a photo, in its pixels, as the spec's box model sees it."""
        if self._boxes is None:
            self._boxes = BoxModel(self.spec.box_model)
        return tuple(self._boxes.boxes([path])[0].tolist())

    def load(self, path: str | os.PathLike) -> tuple[np.ndarray | None, str]:
        """(array, "") for a readable photo, (None, why) otherwise."""
        path = Path(path)
        if not path.is_file():
            return None, "file not found"
        try:
            box = None
            if self.spec.crop == "box-model":
                box = self.box(path)
            elif self.spec.crop == "boxes" and not self.warned:
                self.warned = True
                warn("this model was trained on fluke crops from a boxes file and has no box model; new photos are used whole")
            return load_image(path, self.spec.size, box, margin=self.spec.margin, grey=self.spec.grey), ""
        except WhalefastError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"unreadable image ({type(e).__name__})"
