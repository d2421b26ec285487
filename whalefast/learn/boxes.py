"""The boxes fit stage: a small fluke box regressor trained on a boxes CSV, with its held-out IoU and a sheet of examples."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.metrics import AvgMetric
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from torch import nn

from whalefast.core.allocator import reuse_freed_memory
from whalefast.core.console import console
from whalefast.core.errors import WhalefastError
from whalefast.core.files import atomic_path, load_saved, write_csv, write_json
from whalefast.core.images import open_rgb, photo_size
from whalefast.core.spec import IMAGENET_MEAN, IMAGENET_STD
from whalefast.data.augment import shift_and_flip
from whalefast.data.boxes_csv import BOX_COLUMNS, read_boxes
from whalefast.data.prepared import whole_photo_cache
from whalefast.learn.callbacks import Checkpoints, StartRunFolder, StopOnNonFiniteLoss
from whalefast.learn.trainer import build_learner, quiet_progress
from whalefast.nets.forward import normalise
from whalefast.nets.heads import BoxHead, predict_fractions
from whalefast.nets.losses import BoxLoss
from whalefast.nets.registry import get_arch
from whalefast.runs.config import BoxConfig
from whalefast.runs.folder import Run


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of paired boxes (x0, y0, x1, y1), row by row."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean IoU of a batch of predicted boxes (the fastai metric)."""
    return box_iou(pred.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)).mean()


class BoxAugment(Callback):
    """Normalise every batch; while training, flip, zoom and shift the photos and their boxes together."""

    order = 1

    def before_batch(self):
        x, boxes = normalise(self.xb[0], IMAGENET_MEAN, IMAGENET_STD), self.yb[0]
        if self.training:
            x, boxes = shift_and_flip(x, boxes.float())
            x = x * torch.empty(len(x), 1, 1, 1, device=x.device).uniform_(0.7, 1.3) + torch.empty(len(x), 1, 1, 1, device=x.device).uniform_(-0.3, 0.3)
        self.learn.xb, self.learn.yb = (x,), (boxes,)


class FrozenBatchNorm(Callback):
    """Keep the body's batch-norm statistics at their ImageNet values: small, augmented batches would only add noise."""

    def before_train(self):
        for module in self.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


class BoxDataset(torch.utils.data.Dataset):
    """(photo as (3, s, s) uint8, box as fractions of the photo) from a decoded-image cache."""

    def __init__(self, images, items: pd.DataFrame):
        self.images, self.names = images, items.Image.tolist()
        self.boxes = torch.tensor(items[["fx0", "fy0", "fx1", "fy1"]].to_numpy(), dtype=torch.float32)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[self.names[i]].copy()).permute(2, 0, 1), self.boxes[i]


def box_items(data: Path, boxes: pd.DataFrame) -> pd.DataFrame:
    """The boxed photos found in train/ or test/: Image, Folder, box in pixels and as fractions of the photo."""
    rows = []
    for r in boxes.itertuples(index=False):
        folder = "train" if (data / "train" / r.Image).is_file() else "test" if (data / "test" / r.Image).is_file() else None
        if folder is None:
            continue
        try:
            w, h = photo_size(data / folder / r.Image)
        except Exception:  # noqa: BLE001 - an unreadable photo cannot teach a box
            continue
        rows.append((r.Image, folder, r.x0, r.y0, r.x1, r.y1, r.x0 / w, r.y0 / h, min(r.x1 / w, 1.0), min(r.y1 / h, 1.0)))
    return pd.DataFrame(rows, columns=["Image", "Folder", *BOX_COLUMNS, "fx0", "fy0", "fx1", "fy1"])


class _Images:
    """Photos of several folders' caches under one name lookup."""

    def __init__(self, caches: dict[str, object], folder_of: dict[str, str]):
        self.caches, self.folder_of = caches, folder_of

    def __getitem__(self, name):
        return self.caches[self.folder_of[name]][name]


def check_box_config(cfg: BoxConfig) -> None:
    """One-line errors, each naming its option, for settings that cannot work."""
    get_arch(cfg.arch)
    for option in ("epochs", "bs"):
        if getattr(cfg, option) < 1:
            raise WhalefastError(f"--{option} must be at least 1, got {getattr(cfg, option)}")
    if not 32 <= cfg.size <= 1024:
        raise WhalefastError(f"--size must be 32 to 1024 pixels, got {cfg.size}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise WhalefastError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0 < cfg.valid_pct < 1:
        raise WhalefastError(f"--valid-pct must lie strictly between 0 and 1, got {cfg.valid_pct}")
    if not 0 <= cfg.seed < 2**32:
        raise WhalefastError(f"--seed must lie in 0..{2**32 - 1}, got {cfg.seed}")


def fit_boxes(cfg: BoxConfig) -> dict:
    """Train the box regressor on cfg.boxes; report IoU on held-out photos; save it in models/NAME/."""
    check_box_config(cfg)
    data = Path(cfg.data)
    if not data.is_dir():
        raise WhalefastError(f"{data}: data folder not found")
    items = box_items(data, read_boxes(cfg.boxes))
    if len(items) < 10:
        raise WhalefastError(f"{cfg.boxes}: only {len(items)} of its photos are in {data / 'train'} or {data / 'test'}; need at least 10")
    reuse_freed_memory()
    set_seed(cfg.seed, reproducible=True)
    rng = np.random.default_rng(cfg.seed)
    is_valid = np.zeros(len(items), dtype=bool)
    is_valid[rng.permutation(len(items))[: max(1, int(round(cfg.valid_pct * len(items))))]] = True
    items["is_valid"] = is_valid
    caches = {f: whole_photo_cache(data / f, items.Image[items.Folder == f].tolist(), cfg.size, cfg.cache_dir) for f in sorted(set(items.Folder))}
    images = _Images(caches, dict(zip(items.Image, items.Folder)))
    train_ds, valid_ds = BoxDataset(images, items[~items.is_valid]), BoxDataset(images, items[items.is_valid])
    if cfg.bs > len(train_ds):
        raise WhalefastError(f"--bs {cfg.bs} is more than the {len(train_ds)} boxed training photos: no training step would run; use a smaller --bs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dls = DataLoaders.from_dsets(train_ds, valid_ds, bs=cfg.bs, drop_last=True, device=device, num_workers=0)
    dls.valid.drop_last = False
    train = items[~items.is_valid]
    prior = ((train.fx0 + train.fx1).mean() / 2, (train.fy0 + train.fy1).mean() / 2, (train.fx1 - train.fx0).mean(), (train.fy1 - train.fy0).mean())
    head = BoxHead(get_arch(cfg.arch).features, prior)
    learn = build_learner(
        dls,
        cfg.arch,
        n_out=4,
        pretrained=cfg.pretrained,
        head=head,
        loss_func=BoxLoss(),
        opt_func=Adam,
        metrics=[AvgMetric(iou)],
        cbs=[BoxAugment(), FrozenBatchNorm()],
    )
    learn.unfreeze()  # vision_learner freezes a pretrained body; a box needs it fine-tuned
    quiet_progress(learn)
    run = Run(cfg.run_dir)
    checkpoints = Checkpoints(run / Run.WEIGHTS)
    learn.fit_one_cycle(cfg.epochs, lr_max=cfg.lr, cbs=[StopOnNonFiniteLoss(cfg.lr), StartRunFolder(run.start_files(asdict(cfg))), checkpoints])
    learn.model.load_state_dict(load_saved(run / Run.WEIGHTS, "box model"))

    valid = items[items.is_valid].reset_index(drop=True)
    pred = predict_fractions(learn.model.eval(), [images[n] for n in valid.Image], device)
    ious = box_iou(pred, torch.tensor(valid[["fx0", "fy0", "fx1", "fy1"]].to_numpy()))
    summary = {
        "valid_photos": len(valid),
        "train_photos": int((~items.is_valid).sum()),
        "iou_mean": float(ious.mean()),
        "iou_median": float(ious.median()),
        "iou_at_least_0.5": float((ious >= 0.5).float().mean()),
        "iou_at_least_0.75": float((ious >= 0.75).float().mean()),
        "best_epoch": checkpoints.best_epoch,
    }
    write_json(summary, run / Run.BOX_METRICS)
    valid = valid.assign(px0=pred[:, 0].numpy(), py0=pred[:, 1].numpy(), px1=pred[:, 2].numpy(), py1=pred[:, 3].numpy(), iou=ious.numpy())
    write_csv(valid[["Image", "Folder", "fx0", "fy0", "fx1", "fy1", "px0", "py0", "px1", "py1", "iou"]], run / "valid_boxes.csv")
    box_sheet(data, valid, run / "boxes.png")
    run.mark_finished()
    return {"run_dir": str(run.path), **summary}


def box_sheet(data: Path, valid: pd.DataFrame, out: Path, n: int = 12) -> None:
    """A PNG of held-out photos with their true (green) and predicted (red) boxes, worst IoU first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = pd.concat([valid.nsmallest(n // 2, "iou"), valid.nlargest(n - n // 2, "iou")]).drop_duplicates("Image")
    cols = 4
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown.itertuples(index=False)):
        im = open_rgb(data / r.Folder / r.Image)
        ax.imshow(im)
        w, h = im.size
        for (x0, y0, x1, y1), colour in (((r.fx0, r.fy0, r.fx1, r.fy1), "lime"), ((r.px0, r.py0, r.px1, r.py1), "red")):
            ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False, edgecolor=colour, linewidth=1.5))
        ax.set_title(f"{r.Image}  IoU {r.iou:.2f}", fontsize=8)
    fig.suptitle("held-out photos: true box green, predicted red (worst first)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    console.print(f"box examples saved to {out}")
