"""The input spec: what a photo becomes before the network sees it, the same for the cache, training and inference.

A run saves its spec (input.json) with its first weights; whalefast.runs.config.resolve_input_spec
makes it from the user's settings and what prepare chose, in one place, as timm's
resolve_data_config does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from whalefast.core.images import BOX_MARGIN, Size, as_scales, as_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("none", "boxes", "box-model")


@dataclass(frozen=True)
class InputSpec:
    """Size, crop, colour, normalisation and the views inference combines.

    crop: "none" (the whole photo), "boxes" (prepare's fluke boxes; new photos, having none, are used
    whole), or "box-model" (boxes predicted by `box_model`, for new photos too). Each box is widened by
    `margin` of its size on every side. `mirror`: inference averages each photo with its mirror image
    (only for networks trained on mirrored photos). `scales`: inference also sees the photo resized by
    each factor, the views combined as ensemble members are. `mirror_view`: the mirror image is one
    more view of its own, combined as the scales are (for never-mirrored networks: a photo's mirror
    image is compared with the catalogue's mirror images, never with a photo).
    """

    size: Size
    grey: bool = False
    crop: str = "none"
    box_model: str | None = None
    margin: float = BOX_MARGIN
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mirror: bool = False
    scales: tuple[float, ...] = (1.0,)
    mirror_view: bool = False

    def __post_init__(self):
        object.__setattr__(self, "size", as_size(self.size))
        object.__setattr__(self, "scales", as_scales(self.scales))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")

    @property
    def cropped(self) -> bool:
        """Whether the network learnt from fluke crops rather than whole photos."""
        return self.crop != "none"

    @property
    def views(self) -> int:
        """How many times inference runs the network on each photo: once per scale, twice where the mirror image is seen too."""
        return len(self.scales) * (2 if self.mirror or self.mirror_view else 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> InputSpec:
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def without_mirror(self) -> InputSpec:
        return replace(self, mirror=False)
