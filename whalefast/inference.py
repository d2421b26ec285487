"""Inference from a saved run: rebuild the model from config.json, score images from the decoded-image cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.vision.core import imagenet_stats
from torch import nn

from whalefast.console import warn
from whalefast.errors import WhalefastError
from whalefast.io import load_image, load_saved
from whalefast.train import FitConfig, load_config


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(run_dir: str | os.PathLike, device: torch.device | None = None) -> tuple[nn.Module, FitConfig, dict]:
    """The trained network of a run (best weights, eval mode), its config and its calibration."""
    from whalefast.ensemble import with_test_scales
    from whalefast.methods import inference_model

    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    weights = run_dir / "model.pth"
    if not weights.is_file():
        raise WhalefastError(f"{weights}: not found; did `whalefast fit --name {run_dir.name}` finish?")
    model = inference_model(cfg)
    model.load_state_dict(load_saved(weights, "model"))
    model = with_test_scales(model, cfg)
    calibration_path = run_dir / "calibration.json"
    calibration = json.loads(calibration_path.read_text()) if calibration_path.exists() else {"threshold": None}
    device = device or default_device()
    return model.to(device).eval(), cfg, calibration


def normalise_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> ImageNet-normalised float."""
    mean = torch.tensor(imagenet_stats[0], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(imagenet_stats[1], device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255) - mean) / std


def _normalise(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    return normalise_batch(torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2))


@torch.no_grad()
def run_model(model: nn.Module, arrays, bs: int = 64, tta: bool = True, device: torch.device | None = None, progress=None) -> torch.Tensor:
    """Model outputs for a sequence of (height, width, 3) uint8 arrays; with `tta`, averaged with the horizontal flip."""
    device = device or next(model.parameters()).device
    outputs = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, len(arrays), bs):
        x = _normalise(np.stack([arrays[i] for i in range(start, min(start + bs, len(arrays)))]), device)
        with autocast:
            out = model(x).float()
            if tta:
                out = (out + model(x.flip(3)).float()) / 2
        outputs.append(out)
        if progress:
            progress(len(x))
    return torch.cat(outputs) if outputs else torch.zeros(0)


class PhotoLoader:
    """Loads new photos as a run expects them: at its size, cropped to the fluke by its box model if it has one."""

    def __init__(self, cfg: FitConfig):
        self.cfg, self._boxes = cfg, None
        self.warned = False

    def box(self, path: Path):
        """The fluke box of a photo, in its pixels, as the run's box model sees it."""
        from whalefast.boxes import BoxModel

        if self._boxes is None:
            self._boxes = BoxModel(self.cfg.box_model)
        return tuple(self._boxes.boxes([path])[0].tolist())

    def load(self, path: str | os.PathLike) -> tuple[np.ndarray | None, str]:
        """(array, "") for a readable photo, (None, why) otherwise."""
        path = Path(path)
        if not path.is_file():
            return None, "file not found"
        try:
            box = None
            if self.cfg.box_model:
                box = self.box(path)
            elif self.cfg.crop and not self.warned:
                self.warned = True
                warn("this model was trained on fluke crops from a boxes file and has no box model; new photos are used whole")
            return load_image(path, self.cfg.size, box, grey=self.cfg.grey), ""
        except WhalefastError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"unreadable image ({type(e).__name__})"


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=1)


class Scorer:
    """Scores photos against every known id with a trained run: softmax probabilities or nearest-catalogue cosine."""

    def __init__(self, run_dir: str | os.PathLike, device: torch.device | None = None):
        self.model, self.cfg, self.calibration = load_model(run_dir, device)
        self.device = next(self.model.parameters()).device
        self.threshold = self.calibration.get("threshold")
        self.catalogue = None
        if self.cfg.method == "arcface":
            from whalefast.catalogue import load_catalogue

            self.catalogue = load_catalogue(run_dir)
        self.ids = list(self.catalogue["ids"] if self.catalogue else self.cfg.vocab)

    def outputs(self, arrays, tta: bool = True, progress=None) -> torch.Tensor:
        """The network's outputs (logits or embeddings) for (height, width, 3) uint8 arrays; `tta` only where the run trained on mirror images."""
        return run_model(self.model, arrays, bs=self.cfg.bs, tta=tta and self.cfg.flip_tta, device=self.device, progress=progress)

    def set_catalogue(self, catalogue: dict) -> None:
        """Score against `catalogue` from now on (the review app's grown one)."""
        self.catalogue, self.ids = catalogue, list(catalogue["ids"])

    def scores(self, arrays, tta: bool = True, progress=None) -> torch.Tensor:
        """(N, number of ids) scores for (height, width, 3) uint8 arrays."""
        return self.id_scores(self.outputs(arrays, tta, progress))

    def id_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, number of ids) scores for the network's outputs: softmax probabilities, or cosine to each id's nearest catalogue photo."""
        if self.catalogue is None:
            return softmax_scores(outputs).cpu()
        from whalefast.methods import cosine_id_scores

        cat = self.catalogue
        return cosine_id_scores(outputs.to(self.device), cat["embeddings"].to(self.device), cat["labels"].to(self.device), len(self.ids)).cpu()

    def scores_and_similarities(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For one photo's output: (scores per id, cosine to each catalogue photo, or None without a catalogue)."""
        scores = self.id_scores(outputs)[0]
        if self.catalogue is None:
            return scores, None
        from whalefast.methods import photo_similarities

        return scores, photo_similarities(outputs, self.catalogue["embeddings"])[0].cpu()

    def rank(self, scores: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per photo, the k best (id, score) with new_whale placed by the calibrated threshold."""
        from whalefast import NEW_WHALE
        from whalefast.metrics import NEW_WHALE_TARGET, rank_with_new_whale

        threshold = None if NEW_WHALE in self.ids else self.threshold
        ranked = rank_with_new_whale(scores, threshold, k)
        out = []
        for row, idx in zip(scores, ranked.tolist()):
            out.append([(NEW_WHALE, float(threshold)) if i == NEW_WHALE_TARGET else (self.ids[i], float(row[i])) for i in idx])
        return out
