"""The export stage: a finished run's network (and its box model's) as ONNX graphs, checked against PyTorch."""

from __future__ import annotations

import os

from whalefast.core.errors import WhalefastError
from whalefast.core.files import write_bytes
from whalefast.runs.folder import BOXES, Run


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[dict]:
    """Export a run's network to model.onnx in its folder (and a copy to `out`), and the box model it crops with; one summary per graph.

    Each graph takes (batch, 3, height, width) photos normalised as the run's input.json says and
    gives what the PyTorch network gives (embeddings before the catalogue's projection, logits, or
    boxes as fractions of the photo), for any batch size and photo size.
    """
    run = Run.open(run_dir, kind=None)
    runs = [run]
    if run.spec.crop == "box-model" and run.spec.box_model:
        runs.append(Run.open(run.spec.box_model, kind=BOXES))
    summaries = []
    for r in runs:
        exported = r.onnx_network(export=True)
        path = r / Run.ONNX
        if not path.is_file():
            raise WhalefastError(f"{path}: could not be written (see above); exporting needs the run's folder writable")
        if out is not None and r is run:
            path = write_bytes(path.read_bytes(), out)
        summaries.append({"run": r.name, "path": str(path), "megabytes": path.stat().st_size / 2**20, "cosine": exported.agreement})
    return summaries
