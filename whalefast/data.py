"""The fastai DataBlock and DataLoaders over prepare's split and the decoded-image cache."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.data.block import DataBlock, TransformBlock
from fastai.data.core import TfmdDL
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.core import imagenet_stats
from fastcore.basics import store_attr
from fasttransform import DisplayedTransform, Transform

from whalefast import NEW_WHALE
from whalefast.cache import CachedImages, build_cache
from whalefast.console import progress_bar
from whalefast.errors import WhalefastError
from whalefast.io import Box, Size, as_size, size_text
from whalefast.metrics import NEW_WHALE_TARGET
from whalefast.split import oversampling_splitter


def check_prepared(prepared: str | os.PathLike) -> Path:
    """`prepared` if a prepare finished writing it, else a one-line error saying to run prepare (again)."""
    prepared = Path(prepared)
    if not (prepared / "split.csv").is_file():
        raise WhalefastError(f"{prepared / 'split.csv'}: not found; run `whalefast prepare` first")
    if not (prepared / "prepare.json").is_file():
        raise WhalefastError(f"{prepared}: a prepare that did not finish left it (no prepare.json); run `whalefast prepare` again")
    return prepared


def load_split(prepared: str | os.PathLike) -> pd.DataFrame:
    """prepare's split.csv, or a one-line error telling to run prepare."""
    path = check_prepared(prepared) / "split.csv"
    split = pd.read_csv(path, dtype={"Image": str, "Id": str, "target": str}, keep_default_na=False)
    missing = {"Image", "Id", "is_valid", "target"} - set(split.columns)
    if missing:
        raise WhalefastError(f"{path}: missing columns {', '.join(sorted(missing))}; run `whalefast prepare` again")
    return split


def training_items(split: pd.DataFrame, train_new_whale: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The rows the DataBlock sees and the class vocabulary: training ids (new_whale only if trained as a class)."""
    items = split.copy()
    if not train_new_whale:
        items = items[items.is_valid | (items.Id != NEW_WHALE)]
    vocab = sorted(set(items.loc[~items.is_valid, "Id"]))
    items = items.assign(label=items.target.where(items.is_valid, items.Id)).reset_index(drop=True)
    return items, vocab


class IdEncoder(DisplayedTransform):
    """Whale id -> class index; an id outside the vocabulary (an unseen whale) -> new_whale."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.o2i = {v: i for i, v in enumerate(self.vocab)}
        self.new_whale = self.o2i.get(NEW_WHALE, NEW_WHALE_TARGET)

    def encodes(self, o: str):
        return TensorCategory(self.o2i.get(o, self.new_whale))

    def decodes(self, o):
        i = int(o)
        return NEW_WHALE if i == NEW_WHALE_TARGET else self.vocab[i]


class CacheReader(Transform):
    """Image name -> (3, height, width) uint8 TensorImage from the decoded-image cache."""

    def __init__(self, images: CachedImages):
        self.images = images

    def encodes(self, name: str):
        return TensorImage(torch.from_numpy(self.images[name].copy()).permute(2, 0, 1))


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


class OversampledDL(TfmdDL):
    """A TfmdDL whose items at positions >= n_originals (the splitter's repeats) get `rotate_and_crop`."""

    def __init__(self, dataset=None, n_originals: int | None = None, **kwargs):
        self.n_originals = n_originals
        super().__init__(dataset, **kwargs)

    def create_item(self, s):
        item = super().create_item(s)
        if self.n_originals is not None and s is not None and s >= self.n_originals:
            x, *rest = item
            item = (rotate_and_crop(x), *rest)
        return item


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


AUGMENTS = ("reference", "fluke")


def prepared_boxes(prepared: Path, folder: str) -> dict[str, Box] | None:
    """The fluke boxes prepare chose for the photos of `folder` (None when prepare ran without --boxes)."""
    path = Path(prepared) / "boxes.csv"
    if not path.is_file():
        return None
    boxes = pd.read_csv(path, dtype={"Image": str, "Folder": str}, keep_default_na=False)
    boxes = boxes[boxes.Folder == folder]
    return {r.Image: (r.x0, r.y0, r.x1, r.y1) for r in boxes.itertuples(index=False)}


def image_cache(data: Path, prepared: Path, folder: str, names: list[str], size: Size, crop: bool | None = None, grey: bool = False) -> CachedImages:
    """The decoded-image cache for `names` in `data/folder`, cropped to prepare's fluke boxes if it chose any.

    `crop` says what the model expects: a model trained on crops needs prepare's boxes, one trained on
    whole photos gets whole photos.
    """
    size, boxes = as_size(size), prepared_boxes(prepared, folder)
    if crop is not None:
        if crop and boxes is None:
            raise WhalefastError(f"{Path(prepared) / 'boxes.csv'}: not found; this model was trained on fluke crops, run `whalefast prepare --boxes ...` again")
        boxes = boxes if crop else None
    label = f"caching {folder}/ at {size_text(size)}px{' (fluke crops)' if boxes is not None else ''}{' grey' if grey else ''}"
    with progress_bar(label, len(names)) as advance:
        return build_cache(Path(data) / folder, names, Path(prepared) / "cache", size, boxes=boxes, grey=grey, progress=advance)


def whale_dataloaders(
    data: str | os.PathLike,
    prepared: str | os.PathLike | None = None,
    size: Size | int = 224,
    bs: int = 128,
    min_samples: int = 10,
    train_new_whale: bool = False,
    augment: str = "reference",
    grey: bool = False,
    num_workers: int | None = None,
    device: torch.device | None = None,
    seed: int | None = None,
):
    """DataLoaders for training: oversampled train split, untouched validation, batch-side augmentation and ImageNet normalisation.

    `augment` is "reference" (random horizontal and vertical flips) or "fluke" (see FlukeAugment).
    """
    data = Path(data)
    prepared = Path(prepared) if prepared else data / "prepared"
    split = load_split(prepared)
    items, vocab = training_items(split, train_new_whale)
    if not vocab:
        raise WhalefastError(f"{prepared / 'split.csv'}: no training ids left; is the dataset too small?")
    size = as_size(size)
    images = image_cache(data, prepared, "train", items.Image.tolist(), size, grey=grey)
    splitter = oversampling_splitter(min_samples=min_samples)
    n_originals = int((~items.is_valid).sum())
    block = DataBlock(
        blocks=(
            TransformBlock(type_tfms=[CacheReader(images)], batch_tfms=[IntToFloatTensor()]),
            TransformBlock(type_tfms=[IdEncoder(vocab)]),
        ),
        get_x=lambda r: r["Image"],
        get_y=lambda r: r["label"],
        splitter=splitter,
        batch_tfms=[RandomFlips() if augment == "reference" else FlukeAugment(), Normalize.from_stats(*imagenet_stats)],
        n_inp=1,
    )
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if cuda else 0
    dls = block.dataloaders(
        items,
        bs=bs,
        dl_type=OversampledDL,
        dl_kwargs=[{"n_originals": n_originals}, {"n_originals": None}],
        num_workers=num_workers,
        pin_memory=cuda,
        device=device,
    )
    if len(dls.train) == 0:
        raise WhalefastError(
            f"--bs {bs} is more than the {len(dls.train.dataset)} training items (photos and their oversampled repeats): "
            "no training step would run; use a smaller --bs"
        )
    if seed is not None:
        for dl in dls.loaders:
            dl.rng.seed(seed)
    dls.vocab = vocab
    dls.items = items
    dls.crop = prepared_boxes(prepared, "train") is not None
    dls.box_model = prepare_settings(prepared).get("box_model")
    return dls


def prepare_settings(prepared: str | os.PathLike) -> dict:
    """prepare.json of a prepared folder ({} if absent)."""
    import json

    path = Path(prepared) / "prepare.json"
    return json.loads(path.read_text()) if path.is_file() else {}
