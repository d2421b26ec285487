import numpy as np
import pandas as pd
import torch

from whalefast.core.spec import InputSpec
from whalefast.data.augment import rotate_and_crop
from whalefast.data.loaders import OversampledDL, whale_dataloaders
from whalefast.data.split import make_split, oversampling_splitter


def _clean(n_ids=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_ids):
        for j in range(int(rng.integers(1, 6))):
            rows.append((f"{i:03d}_{j}.jpg", f"w_{i:07x}"))
    rows += [(f"nw_{k}.jpg", "new_whale") for k in range(20)]
    df = pd.DataFrame(rows, columns=["Image", "Id"])
    df["hash"] = [f"{rng.integers(0, 2**63):016x}" for _ in range(len(df))]
    return df


def test_split_guarantees():
    clean = _clean()
    clean.loc[1, "hash"] = clean.loc[0, "hash"]  # a near-duplicate pair of one whale must stay together
    split = make_split(clean, valid_pct=0.3, unseen_pct=0.3, seed=1)
    assert split.groupby("group").is_valid.nunique().max() == 1
    valid, train = split[split.is_valid], split[~split.is_valid]
    held = valid[valid.target != "new_whale"]
    assert held.Id.value_counts().max() == 1  # one held-out photo per catalogued id
    assert set(held.Id) <= set(train.Id)  # ...and each keeps training photos
    unseen = valid[valid.target == "new_whale"]
    assert not set(unseen.Id) & (set(train.Id) - {"new_whale"})  # unseen whales have no training photo
    assert 0.15 <= len(unseen) / len(valid) <= 0.45
    assert (unseen.Id == "new_whale").any() and (unseen.Id != "new_whale").any()
    again = make_split(clean, valid_pct=0.3, unseen_pct=0.3, seed=1)
    assert again.equals(split)
    assert not make_split(clean, valid_pct=0.3, unseen_pct=0.3, seed=2).is_valid.equals(split.is_valid)


def test_oversampling_counts_and_untouched_validation():
    items = pd.DataFrame(
        {
            "Id": ["a"] * 12 + ["b"] * 3 + ["c"] + ["b", "c"],
            "is_valid": [False] * 16 + [True, True],
        }
    )
    train_idx, valid_idx = oversampling_splitter(min_samples=10)(items)
    assert valid_idx == [16, 17]
    assert train_idx[:16] == list(range(16))  # originals first, once each
    counts = pd.Series(items.Id.to_numpy()[train_idx]).value_counts().to_dict()
    assert counts == {"a": 12, "b": 10, "c": 10}


def test_rotate_and_crop_changes_the_photo_but_not_its_type():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    y = rotate_and_crop(x)
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(x, y)


def test_only_repeats_get_extra_augmentation(tiny_data, monkeypatch):
    dls = whale_dataloaders(tiny_data, tiny_data / "prepared", InputSpec(size=(32, 32)), bs=8, min_samples=6, num_workers=0).dls
    assert isinstance(dls.train, OversampledDL)
    n = dls.train.n_originals
    assert len(dls.train_ds) > n
    calls = []
    monkeypatch.setattr("whalefast.data.loaders.rotate_and_crop", lambda x: calls.append(1) or x)
    dls.train.create_item(0)
    dls.train.create_item(n - 1)
    assert calls == []
    dls.train.create_item(n)
    assert calls == [1]
    dls.valid.create_item(0)
    assert calls == [1]


def test_batch_shape_type_and_range(tiny_data):
    data = whale_dataloaders(tiny_data, tiny_data / "prepared", InputSpec(size=(48, 48)), bs=8, num_workers=0)
    dls = data.dls
    x, y = dls.one_batch()
    assert x.shape == (8, 3, 48, 48) and x.dtype == torch.float32
    assert -2.2 < float(x.min()) < 0 < float(x.max()) < 2.7  # ImageNet-normalised
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < len(data.vocab)
    _, yv = dls.valid.one_batch()
    assert (yv == -100).any()  # unseen whales in validation carry the new_whale code


def test_fluke_augment_never_mirrors_nor_turns_upside_down():
    from fastai.torch_core import TensorImage

    from whalefast.data.augment import FlukeAugment

    torch.manual_seed(0)
    x = torch.zeros(200, 3, 32, 64)
    x[:, :, :16, :32] = 1.0  # bright top-left quarter
    out = FlukeAugment()(TensorImage(x), split_idx=0)
    assert out.shape == x.shape
    top, bottom = out[:, :, :16].mean((1, 2, 3)), out[:, :, 16:].mean((1, 2, 3))
    left, right = out[..., :32].mean((1, 2, 3)), out[..., 32:].mean((1, 2, 3))
    assert bool((top > bottom).all())  # never upside down
    assert bool((left > right).all())  # never mirrored: a mirrored fluke is another pattern
    assert not torch.allclose(out, x)  # but each photo is moved and relit
    assert torch.equal(FlukeAugment()(TensorImage(x), split_idx=1), x)  # validation is left alone
