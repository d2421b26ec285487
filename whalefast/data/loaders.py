"""The fastai DataBlock and DataLoaders over prepare's split and the decoded-image cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from fastai.data.block import DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorCategory, TensorImage
from fasttransform import DisplayedTransform, Transform

from whalefast import NEW_WHALE
from whalefast.core.errors import WhalefastError
from whalefast.core.ranking import NEW_WHALE_TARGET
from whalefast.core.spec import InputSpec
from whalefast.data.augment import FlukeAugment, RandomFlips, rotate_and_crop
from whalefast.data.cache import CachedImages
from whalefast.data.prepared import image_cache, load_split
from whalefast.data.split import oversampling_splitter


def training_items(split: pd.DataFrame, train_new_whale: bool = False, every_photo: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The rows the DataBlock sees and the class vocabulary: training ids (new_whale only if trained as a class).

    With `every_photo` (fit --refit's second network), the held-out photos train too, each under its
    own id; they stay behind as the validation rows as well, so an epoch still ends with a (no longer
    held-out) valid loss.
    """
    items = split.copy()
    if every_photo:
        items = pd.concat([items.assign(is_valid=False, target=items.Id), items[items.is_valid]], ignore_index=True)
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


@dataclass
class TrainingData:
    """What a fit learns from: fastai's DataLoaders, the rows they draw from (prepare's split), the class vocabulary and the decoded photos."""

    dls: DataLoaders
    items: pd.DataFrame
    vocab: list[str]
    images: CachedImages

    def class_counts(self) -> list[int]:
        """The number of training photos (validation left out, before oversampling) of each class of the vocabulary."""
        counts = self.items[~self.items.is_valid].Id.value_counts()
        return [int(counts.get(v, 0)) for v in self.vocab]


def whale_dataloaders(
    data: str | os.PathLike,
    prepared: str | os.PathLike,
    spec: InputSpec,
    bs: int = 128,
    min_samples: int = 10,
    train_new_whale: bool = False,
    augment: str = "reference",
    num_workers: int | None = None,
    device: torch.device | None = None,
    seed: int | None = None,
    every_photo: bool = False,
) -> TrainingData:
    """DataLoaders for training: oversampled train split, untouched validation, batch-side augmentation and the spec's normalisation.

    `augment` is "reference" (random horizontal and vertical flips) or "fluke" (see FlukeAugment);
    `every_photo`: the held-out photos train too (see training_items).
    """
    prepared = Path(prepared)
    items, vocab = training_items(load_split(prepared), train_new_whale, every_photo)
    if not vocab:
        raise WhalefastError(f"{prepared / 'split.csv'}: no training ids left; is the dataset too small?")
    images = image_cache(data, prepared, "train", list(dict.fromkeys(items.Image)), spec)
    n_originals = int((~items.is_valid).sum())
    block = DataBlock(
        blocks=(
            TransformBlock(type_tfms=[CacheReader(images)], batch_tfms=[IntToFloatTensor()]),
            TransformBlock(type_tfms=[IdEncoder(vocab)]),
        ),
        get_x=lambda r: r["Image"],
        get_y=lambda r: r["label"],
        splitter=oversampling_splitter(min_samples=min_samples),
        batch_tfms=[RandomFlips() if augment == "reference" else FlukeAugment(), Normalize.from_stats(list(spec.mean), list(spec.std))],
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
    return TrainingData(dls, items, vocab, images)
