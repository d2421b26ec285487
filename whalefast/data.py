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
from fasttransform import DisplayedTransform, Transform

from whalefast import NEW_WHALE
from whalefast.cache import CachedImages, build_cache
from whalefast.console import progress_bar
from whalefast.errors import WhalefastError
from whalefast.metrics import NEW_WHALE_TARGET
from whalefast.split import oversampling_splitter


def load_split(prepared: str | os.PathLike) -> pd.DataFrame:
    """prepare's split.csv, or a one-line error telling to run prepare."""
    path = Path(prepared) / "split.csv"
    if not path.is_file():
        raise WhalefastError(f"{path}: not found; run `whalefast prepare` first")
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
    """Image name -> (3, size, size) uint8 TensorImage from the decoded-image cache."""

    def __init__(self, images: CachedImages):
        self.images = images

    def encodes(self, name: str):
        return TensorImage(torch.from_numpy(self.images[name].copy()).permute(2, 0, 1))


def rotate_and_crop(x: torch.Tensor, max_degrees: float = 15.0, max_zoom: float = 1.2) -> torch.Tensor:
    """The reference's extra augmentation for repeated photos: a random rotation within ±max_degrees and a centre crop."""
    angle = math.radians(float(torch.empty(1).uniform_(-max_degrees, max_degrees)))
    zoom = float(torch.empty(1).uniform_(1.0, max_zoom))  # crop the central 1/zoom of the photo
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)[None]
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


def image_cache(data: Path, prepared: Path, folder: str, names: list[str], size: int) -> CachedImages:
    """The decoded-image cache for `names` in `data/folder`, building what is missing with a progress bar."""
    cache_dir = prepared / "cache"
    with progress_bar(f"caching {folder}/ at {size}px", len(names)) as advance:
        return build_cache(data / folder, names, cache_dir, size, progress=advance)


def whale_dataloaders(
    data: str | os.PathLike,
    prepared: str | os.PathLike | None = None,
    size: int = 224,
    bs: int = 128,
    min_samples: int = 10,
    train_new_whale: bool = False,
    num_workers: int | None = None,
    device: torch.device | None = None,
    seed: int | None = None,
):
    """DataLoaders for training: oversampled train split, untouched validation, GPU-side flips and ImageNet normalisation."""
    data = Path(data)
    prepared = Path(prepared) if prepared else data / "prepared"
    split = load_split(prepared)
    items, vocab = training_items(split, train_new_whale)
    if not vocab:
        raise WhalefastError(f"{prepared / 'split.csv'}: no training ids left; is the dataset too small?")
    images = image_cache(data, prepared, "train", items.Image.tolist(), size)
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
        batch_tfms=[RandomFlips(), Normalize.from_stats(*imagenet_stats)],
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
    if seed is not None:
        for dl in dls.loaders:
            dl.rng.seed(seed)
    dls.vocab = vocab
    dls.items = items
    return dls
