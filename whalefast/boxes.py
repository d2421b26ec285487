"""The boxes stage: fluke bounding boxes, read from a CSV or predicted by a small regressor trained on one."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.metrics import AvgMetric
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from whalefast.console import console, progress_bar
from whalefast.errors import WhalefastError
from whalefast.io import load_image, load_saved, photo_size, read_csv_file, read_labels, write_csv, write_json
from whalefast.run_status import check_finished, mark_finished

BOX_COLUMNS = ["x0", "y0", "x1", "y1"]
BOXES_KIND = "boxes"  # config.json's "kind" for a box model


def read_boxes(path: str | os.PathLike) -> pd.DataFrame:
    """A boxes CSV (Image,x0,y0,x1,y1 in pixels of each photo), checked: one line naming the file and the problem."""
    path = Path(path)
    df = read_csv_file(path)
    missing = [c for c in ["Image", *BOX_COLUMNS] if c not in df.columns]
    if missing:
        raise WhalefastError(f"{path}: expected columns Image,x0,y0,x1,y1, found {','.join(map(str, df.columns)) or 'none'}")
    df = df[["Image", *BOX_COLUMNS]].copy()
    df["Image"] = df.Image.str.strip()
    for c in BOX_COLUMNS:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = df.index[values.isna() | ~np.isfinite(values.fillna(0)) | (values < 0)]
        if len(bad):
            raise WhalefastError(f"{path}: line {bad[0] + 2}: {c} must be a number of pixels, got {df[c][bad[0]]!r}")
        df[c] = values.astype(float)
    empty = df.index[(df.x1 <= df.x0) | (df.y1 <= df.y0)]
    if len(empty):
        raise WhalefastError(f"{path}: line {empty[0] + 2}: an empty box (x1 must exceed x0 and y1 exceed y0)")
    dup = df.index[df.Image.duplicated()]
    if len(dup):
        raise WhalefastError(f"{path}: line {dup[0] + 2}: {df.Image[dup[0]]} has two boxes")
    return df.reset_index(drop=True)


def write_training_boxes(boxes_csv: str | os.PathLike, labels_csv: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The boxes of the labelled (training) photos alone, written to out: what an honest box model may learn from."""
    boxes = read_boxes(boxes_csv)
    train = set(read_labels(labels_csv).Image)
    return write_csv(boxes[boxes.Image.isin(train)], out)


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


@dataclass
class BoxConfig:
    """A box-regressor run; saved as config.json beside its weights."""

    data: str = "data"
    boxes: str = "data/boxes.csv"
    arch: str = "efficientnet-lite0"
    size: int = 96
    epochs: int = 4
    bs: int = 32
    lr: float = 5e-4
    valid_pct: float = 0.1
    seed: int = 42
    pretrained: bool = True
    name: str = "boxes"
    models_dir: str = "models"
    kind: str = BOXES_KIND
    prepared: str | None = None  # where the decoded-image cache goes: PREPARED/cache (DATA/prepared by default)

    @property
    def run_dir(self) -> Path:
        return Path(self.models_dir) / self.name


class BoxHead(nn.Module):
    """Average pooling and a linear map to the box's centre and size, each in (0, 1) of the photo.

    With `prior` (mean centre x, centre y, width, height of the training boxes), it starts out
    predicting that mean box, so training improves on the best constant guess from the first step.
    """

    def __init__(self, features: int, prior: tuple[float, float, float, float] | None = None):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(features, 4))
        if prior is not None:
            linear = self.layers[-1]
            nn.init.normal_(linear.weight, std=1e-3)
            with torch.no_grad():
                linear.bias.copy_(torch.logit(torch.tensor(prior, dtype=torch.float32).clamp(0.02, 0.98)))

    def forward(self, x):
        cx, cy, w, h = torch.sigmoid(self.layers(x).float()).unbind(1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


class BoxLoss(nn.Module):
    """L1 distance of the corners plus the generalised IoU loss."""

    def forward(self, pred, target):
        pred, target = pred.as_subclass(torch.Tensor).float(), target.as_subclass(torch.Tensor).float()
        return F.l1_loss(pred, target) + generalized_box_iou_loss(pred, target, reduction="mean")


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


class BoxAugment(Callback):
    """Normalise every batch; while training, flip, zoom and shift the photos and their boxes together."""

    order = 1

    def before_batch(self):
        from whalefast.inference import normalise_batch

        x, boxes = normalise_batch(self.xb[0]), self.yb[0]
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


def whole_photo_cache(folder: Path, names: list[str], size: int, cache_dir: Path):
    """The decoded-image cache of whole photos squashed to size x size: what a box model sees."""
    from whalefast.cache import build_cache

    with progress_bar(f"caching {folder.name}/ at {size}px for boxes", len(names)) as advance:
        return build_cache(folder, names, cache_dir, (size, size), progress=advance)


class _Images:
    """Photos of several folders' caches under one name lookup."""

    def __init__(self, caches: dict[str, object], folder_of: dict[str, str]):
        self.caches, self.folder_of = caches, folder_of

    def __getitem__(self, name):
        return self.caches[self.folder_of[name]][name]


def check_box_config(cfg: BoxConfig) -> None:
    """One-line errors, each naming its option, for settings that cannot work."""
    from whalefast.models import get_arch

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
    from whalefast.allocator import reuse_freed_memory
    from whalefast.models import build_learner, get_arch
    from whalefast.train import Checkpoints, StartRunFolder, StopOnNonFiniteLoss, quiet_progress, run_files

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
    cache_dir = Path(cfg.prepared or data / "prepared") / "cache"
    caches = {f: whole_photo_cache(data / f, items.Image[items.Folder == f].tolist(), cfg.size, cache_dir) for f in sorted(set(items.Folder))}
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
    run_dir = cfg.run_dir
    checkpoints = Checkpoints(run_dir, resumable=False)
    learn.fit_one_cycle(cfg.epochs, lr_max=cfg.lr, cbs=[StopOnNonFiniteLoss(cfg.lr), StartRunFolder(run_files(run_dir, asdict(cfg))), checkpoints])
    learn.model.load_state_dict(torch.load(run_dir / "model.pth", map_location="cpu", weights_only=True))

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
    write_json(summary, run_dir / "metrics.json")
    valid = valid.assign(px0=pred[:, 0].numpy(), py0=pred[:, 1].numpy(), px1=pred[:, 2].numpy(), py1=pred[:, 3].numpy(), iou=ious.numpy())
    write_csv(valid[["Image", "Folder", "fx0", "fy0", "fx1", "fy1", "px0", "py0", "px1", "py1", "iou"]], run_dir / "valid_boxes.csv")
    box_sheet(data, valid, run_dir / "boxes.png")
    mark_finished(run_dir)
    return {"run_dir": str(run_dir), **summary}


def predict_fractions(model: nn.Module, arrays, device, bs: int = 64) -> torch.Tensor:
    """Boxes as fractions (x0, y0, x1, y1) of each photo, from (s, s, 3) uint8 arrays of whole photos."""
    from whalefast.inference import run_model

    out = run_model(model, arrays, bs=bs, tta=False, device=device)
    return out.cpu() if len(out) else torch.zeros(0, 4)


def check_box_model(run_dir: str | os.PathLike) -> BoxConfig:
    """The settings of the finished box model in `run_dir`, or a one-line error saying what it is instead."""
    import json

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raw = {}
    if raw.get("kind") != BOXES_KIND:
        raise WhalefastError(f"{run_dir}: not a box model (train one with `whalefast boxes fit`)")
    check_finished(run_dir, "metrics.json", f"its boxes fit did not finish; run `whalefast boxes fit --name {run_dir.name}` again")
    if not (run_dir / "model.pth").is_file():
        raise WhalefastError(f"{run_dir / 'model.pth'}: not found; run `whalefast boxes fit --name {run_dir.name}` again")
    return BoxConfig(**{k: v for k, v in raw.items() if k in BoxConfig.__dataclass_fields__})


class BoxModel:
    """A trained box regressor, loaded once (eval mode): fluke boxes in pixels for whole photos."""

    def __init__(self, run_dir: str | os.PathLike, device: torch.device | None = None):
        from whalefast.models import build_model, get_arch

        run_dir = Path(run_dir)
        self.cfg = check_box_model(run_dir)
        model = build_model(self.cfg.arch, 4, head=BoxHead(get_arch(self.cfg.arch).features))
        weights = run_dir / "model.pth"
        model.load_state_dict(load_saved(weights, "box model"))
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()

    def boxes(self, paths: list[Path], arrays=None) -> np.ndarray:
        """(N, 4) boxes (x0, y0, x1, y1) in pixels of each photo; `arrays` are the photos already decoded at the model's size."""
        if arrays is None:
            arrays = [load_image(p, (self.cfg.size, self.cfg.size)) for p in paths]
        fractions = predict_fractions(self.model, arrays, self.device).numpy()
        sizes = np.array([photo_size(p) for p in paths], dtype=float).reshape(-1, 2)
        return fractions * np.concatenate([sizes, sizes], axis=1)


def predict_boxes(
    box_model: BoxModel | str | os.PathLike, folder: str | os.PathLike, names: list[str], cache_dir: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Predicted boxes (Image,x0,y0,x1,y1 in pixels) for photos in `folder`; with `cache_dir`, unreadable photos are left out."""
    model = box_model if isinstance(box_model, BoxModel) else BoxModel(box_model)
    folder = Path(folder)
    arrays = None
    if cache_dir is not None:
        images = whole_photo_cache(folder, names, model.cfg.size, Path(cache_dir))
        names = [n for n in names if n not in images.problems]
        arrays = [images[n] for n in names]
    pixels = model.boxes([folder / n for n in names], arrays)
    return pd.DataFrame({"Image": names, **{c: pixels[:, i] for i, c in enumerate(BOX_COLUMNS)}})


def box_sheet(data: Path, valid: pd.DataFrame, out: Path, n: int = 12) -> None:
    """A PNG of held-out photos with their true (green) and predicted (red) boxes, worst IoU first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from whalefast.io import atomic_path, open_rgb

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
