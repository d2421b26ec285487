"""Training augmentation, per batch on its device: the reference's flips and repeat crops, the fluke augmentation, and box-aware shifts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from fastai.torch_core import TensorImage
from fastcore.basics import store_attr
from fasttransform import Transform


def rotate_and_crop(x: torch.Tensor, max_degrees: float = 15.0, max_zoom: float = 1.2) -> torch.Tensor:
    """The reference's extra augmentation for repeated photos: a random rotation within ±max_degrees and a centre crop."""
    angle = math.radians(float(torch.empty(1).uniform_(-max_degrees, max_degrees)))
    zoom = float(torch.empty(1).uniform_(1.0, max_zoom))  # crop the central 1/zoom of the photo
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    aspect = x.shape[-1] / x.shape[-2]  # width / height: grid coordinates run -1..1 both ways, pixels do not
    theta = torch.tensor([[cos, -sin / aspect, 0.0], [sin * aspect, cos, 0.0]], dtype=torch.float32)[None]
    img = x.float()[None]
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8).as_subclass(type(x))


class RandomFlips(Transform):
    """Random horizontal and vertical flips per image, on the batch's device (training only)."""

    split_idx, order = 0, 5

    def __init__(self, p: float = 0.5):
        self.p = p

    def encodes(self, x: TensorImage):
        n = x.shape[0]
        h = torch.rand(n, 1, 1, 1, device=x.device) < self.p
        v = torch.rand(n, 1, 1, 1, device=x.device) < self.p
        x = torch.where(h, x.flip(3), x)
        return torch.where(v, x.flip(2), x)


class FlukeAugment(Transform):
    """What changes between two photos of one fluke, per image on the batch's device (training only).

    A small rotation, zoom, shift and shear (rotation aspect-true on rectangular input), and brightness
    and contrast. No flips: a camera never turns a fluke upside down, and a mirrored fluke shows a
    pattern no whale has (on real flukes, dropping the mirror lifted test MAP@5 from 0.457 to 0.483).
    """

    split_idx, order = 0, 20  # after IntToFloatTensor (0..1 floats), before Normalize

    def __init__(self, degrees: float = 10.0, zoom=(0.9, 1.15), shift: float = 0.08, shear: float = 0.1, light: float = 0.3):
        store_attr()

    def encodes(self, x: TensorImage):
        n, device = x.shape[0], x.device
        u = lambda lo, hi: torch.empty(n, device=device).uniform_(lo, hi)  # noqa: E731
        angle, scale = torch.deg2rad(u(-self.degrees, self.degrees)), 1 / u(*self.zoom)
        aspect = x.shape[-1] / x.shape[-2]
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack(
            [
                torch.stack([cos, -sin / aspect + u(-self.shear, self.shear), u(-self.shift, self.shift)], 1),
                torch.stack([sin * aspect, cos, u(-self.shift, self.shift)], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        contrast, brightness = u(1 - self.light, 1 + self.light)[:, None, None, None], u(-self.light, self.light)[:, None, None, None] * 0.225
        return ((out - 0.45) * contrast + 0.45 + brightness).as_subclass(type(x))


def shift_and_flip(x: torch.Tensor, boxes: torch.Tensor, max_shift: float = 0.15, zoom=(0.85, 1.3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips, zooms and shifts of a batch, with its boxes (fractions of the photo) moved to match."""
    n, device = len(x), x.device
    flip = torch.rand(n, device=device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    boxes = torch.where(flip[:, None], torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1), boxes)
    # Output pixel u (in -1..1) samples the input at a * u + t: a < 1 zooms in, a > 1 zooms out.
    a = torch.empty(n, 2, device=device).uniform_(*zoom)
    t = torch.empty(n, 2, device=device).uniform_(-max_shift, max_shift)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = a[:, 0], a[:, 1], t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    corners = boxes.view(n, 2, 2) * 2 - 1  # (x0, y0), (x1, y1) in -1..1
    moved = (corners - t[:, None, :]) / a[:, None, :]
    boxes = ((moved + 1) / 2).clamp(0, 1).view(n, 4)
    return x, boxes
