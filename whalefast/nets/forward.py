"""The one forward path over photos: uint8 arrays to normalised batches to outputs, for training-time metrics and inference alike."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from whalefast.core.spec import InputSpec
from whalefast.nets.views import Combine, Views


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float normalised with `mean` and `std` (per channel, of 0..1 values)."""
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255) - mean) / std


@torch.no_grad()
def forward_photos(model: nn.Module, arrays, mean, std, bs: int = 64, device: torch.device | None = None, progress=None) -> torch.Tensor:
    """`model`'s outputs for a sequence of (height, width, 3) uint8 arrays, in batches of `bs` (bf16 autocast on CUDA)."""
    device = device or next(model.parameters(), torch.zeros(0)).device
    outputs = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, len(arrays), bs):
        batch = np.stack([arrays[i] for i in range(start, min(start + bs, len(arrays)))])
        x = normalise(torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2), mean, std)
        with autocast:
            outputs.append(model(x).float())
        if progress:
            progress(len(x))
    return torch.cat(outputs) if outputs else torch.zeros(0)


def embed(network: nn.Module, arrays, spec: InputSpec, combine: Combine, bs: int = 64, device: torch.device | None = None, progress=None) -> torch.Tensor:
    """The network's output for photos decoded as `spec` says, over the spec's views (scales, mirror image) combined by `combine`.

    Every stage embeds through here: the training-time MAP@5, calibration, the catalogue, submit,
    predict, `catalogue add` and the review app, so they cannot disagree.
    """
    was_training = network.training
    network.eval()
    try:
        return forward_photos(Views(network, spec.scales, spec.mirror, combine, spec.mirror_view), arrays, spec.mean, spec.std, bs, device, progress)
    finally:
        network.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
