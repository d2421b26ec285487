"""The fit and lr-find stages: Learner assembly, callbacks, checkpoints, history, curves, calibration."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401 - adds Learner.to_channelslast
import fastai.callback.schedule  # noqa: F401 - adds Learner.fit_one_cycle and Learner.lr_find
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.optimizer import SGD, Adam
from fastai.torch_core import rank_distrib, set_seed
from fastcore.foundation import L
from torch import nn

from whalefast.allocator import reuse_freed_memory
from whalefast.console import console, results
from whalefast.data import AUGMENTS, whale_dataloaders
from whalefast.distributed import barrier, rank0_first
from whalefast.errors import WhalefastError
from whalefast.io import MAX_SIDE, as_scales, as_size, atomic_path, file_digest, load_saved, save_torch, size_text, write_csv, write_json
from whalefast.metrics import NEW_WHALE_TARGET, calibrate_threshold, map5, rank_with_new_whale
from whalefast.models import build_learner, freeze_stages, get_arch, stage_count
from whalefast.run_status import check_finished, mark_finished, status_path, training_status
from whalefast.schedule import StepSchedule, body_and_head


@dataclass
class FitConfig:
    """Everything that defines a training run; saved as config.json beside its weights."""

    data: str = "data"
    prepared: str | None = None
    recipe: str = "reference"
    arch: str = "resnet50"
    method: str = "softmax"
    epochs: int = 20
    bs: int = 128
    lr: float = 0.01
    milestones: tuple[int, ...] = (16, 19)
    gamma: float = 0.1
    schedule: str = "step"
    opt: str = "sgd"
    momentum: float = 0.9
    wd: float = 1e-4
    freeze_epochs: int = 0
    frozen_stages: int = 0  # the stem and this many backbone stages keep their ImageNet weights throughout
    size: tuple[int, int] = (224, 224)  # (height, width)
    pretrained: bool = True
    min_samples: int = 10
    train_new_whale: bool = False
    name: str = "resnet50"
    models_dir: str = "models"
    seed: int = 42
    embed_dim: int = 512
    margin: float = 0.3
    scale: float = 30.0
    sub_centers: int = 1
    parts: int = 0  # arcface only, as embed_dim to sub_centers: the feature map cut into this many vertical and horizontal strips, each embedded and trained on its own beside the whole (EmbeddingHead)
    augment: str = "reference"  # or "fluke": see whalefast.data.FlukeAugment
    head_lr_mult: float = 1.0  # the head (and ArcFace's class centres) learns this many times faster than the body
    grey: bool = False  # train and match on greyscale: colour and greyscale photos then look alike
    num_workers: int | None = None
    compile: bool = False
    map_every: int = 1  # validation MAP@5 every N epochs and at the last (arcface embeds every training photo for it)
    members: int = 1  # an ensemble of this many networks, seeds seed, seed + 1, ... (whalefast.ensemble)
    tta_scales: tuple[float, ...] = (1.0,)  # inference sees each photo resized by each factor, the views combined (whalefast.ensemble.MultiScale)
    crop: bool = False  # trained on fluke crops (prepare --boxes)
    box_model: str | None = None  # the box model that crops new photos, when prepare used one
    vocab: list[str] = field(default_factory=list)
    train_digest: str | None = None  # SHA-256 of the train.csv it learnt from: submit refuses other data

    def __post_init__(self):
        self.size = as_size(self.size)
        self.milestones = tuple(int(m) for m in self.milestones)
        self.tta_scales = as_scales(self.tta_scales)

    @property
    def flip_tta(self) -> bool:
        """Whether inference averages each photo with its mirror image: only for models trained on mirrored photos.

        The fluke augmentation never mirrors: a mirrored fluke shows another whale's pattern.
        """
        return self.augment != "fluke"

    @property
    def run_dir(self) -> Path:
        return Path(self.models_dir) / self.name

    @property
    def prepared_dir(self) -> Path:
        return Path(self.prepared) if self.prepared else Path(self.data) / "prepared"


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir` if it exists, else a one-line error listing the runs beside it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        parent = run_dir.parent
        runs = sorted(p.name for p in parent.iterdir() if (p / "config.json").is_file()) if parent.is_dir() else []
        found = f"runs in {parent}: {', '.join(runs)}" if runs else f"no runs in {parent}"
        raise WhalefastError(f"{run_dir}: no such model ({found})")
    return run_dir


def load_config(run_dir: str | os.PathLike, finished: bool = True) -> FitConfig:
    """The FitConfig saved in `run_dir`; with `finished`, a one-line error unless its fit finished."""
    run_dir = check_run_dir(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise WhalefastError(f"{run_dir}: {unfinished_text(run_dir)}")
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        raise WhalefastError(f"{path}: not a whalefast run configuration, or damaged") from None
    if raw.get("kind", "whales") != "whales":
        raise WhalefastError(f"{run_dir}: a {raw['kind']} model, not a whale model")
    if finished:
        check_finished(run_dir, "calibration.json", unfinished_text(run_dir))
    known = FitConfig.__dataclass_fields__
    return FitConfig(**{k: v for k, v in raw.items() if k in known})


def unfinished_text(run_dir: Path) -> str:
    """What an unfinished run folder holds and what to do about it, for an error message."""
    resumable = (run_dir / "config.json").is_file() and ((run_dir / "last.pth").is_file() or any(run_dir.glob("members/*/last.pth")))
    done = ""
    if (run_dir / "history.csv").is_file():
        with contextlib.suppress(Exception):
            done = f" after {len(pd.read_csv(run_dir / 'history.csv').epoch.unique())} epochs"
    if resumable:
        return f"its fit stopped{done} and did not finish; continue it with `whalefast fit --name {run_dir.name} --models-dir {run_dir.parent} --resume`"
    return f"a fit that stopped{done} left no weights to resume; fit it again"


def is_main_process() -> bool:
    return rank_distrib() == 0


class MaskedCrossEntropy(nn.Module):
    """Cross-entropy over the rows whose target is a training class (unseen whales carry no class to learn)."""

    def forward(self, logits, target):
        logits, target = logits.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)
        # A sum over the known rows divided by their count: no data-dependent branch, so no host sync per batch.
        total = F.cross_entropy(logits.float(), target, ignore_index=NEW_WHALE_TARGET, reduction="sum")
        return total / (target != NEW_WHALE_TARGET).sum().clamp(min=1)

    def activation(self, x):
        return F.softmax(x.float(), dim=-1)

    def decodes(self, x):
        return x.argmax(dim=-1)


def sgd_like_torch(params, lr, mom=0.9, wd=1e-4):
    """fastai's SGD with L2 weight decay added to the gradient, i.e. exactly torch.optim.SGD(momentum, weight_decay)."""
    return SGD(params, lr=lr, mom=mom, wd=wd, decouple_wd=False)


class StopOnNonFiniteLoss(Callback):
    """Stop with a one-line error naming the epoch when the loss stops being a finite number (a diverging run)."""

    order = 55  # after the Recorder has logged the epoch, before anything is saved

    def __init__(self, lr: float):
        self.lr = lr

    def before_epoch(self):
        self.bad = None

    def after_loss(self):
        # Accumulated on the device and read once per epoch: no host sync per batch.
        bad = ~torch.isfinite(self.learn.loss.detach()).all()
        self.bad = bad if self.bad is None else self.bad | bad

    def after_epoch(self):
        if self.bad is not None and bool(self.bad):
            raise WhalefastError(
                f"training diverged in epoch {self.epoch}: the loss is no longer a finite number; try a lower --lr (this run used {self.lr:g})"
            )


def _number(value) -> float:
    """A logged metric as a float; NaN where the epoch has none (see fit --map-every)."""
    return float("nan") if value is None else float(value)


class History(Callback):
    """Write history.csv after every epoch (train/valid loss, MAP@5, top-1, lr, seconds) and redraw curves.png."""

    order = 65  # after the Recorder has logged the epoch

    def __init__(self, run_dir: Path, previous: pd.DataFrame | None = None):
        self.run_dir = Path(run_dir)
        self.rows = [] if previous is None else previous.to_dict("records")

    def before_fit(self):
        self.train_batches = 0

    def after_batch(self):
        self.train_batches += int(self.training)

    def before_epoch(self):
        self.skipped, self.start = False, time.time()

    def after_cancel_epoch(self):
        self.skipped = True

    def after_epoch(self):
        if self.skipped or not self.training_done():
            return
        names = list(self.recorder.metric_names[1:-1])
        values = dict(zip(names, self.recorder.log[1 : 1 + len(names)]))
        row = {
            "epoch": self.epoch,
            "train_loss": _number(values.get("train_loss")),
            "valid_loss": _number(values.get("valid_loss")),
            "map5": _number(values.get("map5")),
            "top1": _number(values.get("top1")),
            "lr": float(self.opt.hypers[0]["lr"]),  # the body's (the head's is head_lr_mult times it)
            "seconds": round(time.time() - self.start, 2),
        }
        self.rows = [r for r in self.rows if r["epoch"] != self.epoch] + [row]
        if is_main_process():
            history = pd.DataFrame(self.rows)
            write_csv(history, self.run_dir / "history.csv")
            plot_curves(history, self.run_dir / "curves.png")

    def training_done(self) -> bool:
        return len(self.recorder.log) > 2


class StartRunFolder(Callback):
    """When the first epoch ends, mark the run folder as training (status.json) and write its config files.

    `files` maps a path to its JSON content, written in order (an ensemble's own status and config
    first). Until then nothing is written, so a run that fails before its first epoch ends leaves
    nothing behind, and an earlier run of the same name stays whole; from then on the folder says it
    holds a run in training until `finish` marks it finished.
    """

    order = 60  # after the Recorder has logged the epoch, before History and Checkpoints write into the folder

    def __init__(self, files: dict):
        self.files = dict(files)

    def before_epoch(self):
        self.skipped = False

    def after_cancel_epoch(self):
        self.skipped = True

    def after_epoch(self):
        if self.skipped:
            return
        if is_main_process():
            for path, content in self.files.items():
                write_json(content, path)
        self.files = {}


def run_files(cfg_or_run_dir, config: dict) -> dict:
    """The files StartRunFolder writes for a new run: status.json (training), then config.json."""
    run_dir = Path(cfg_or_run_dir)
    return {status_path(run_dir): training_status(), run_dir / "config.json": config}


class Checkpoints(Callback):
    """Keep the weights of the epoch with the best validation loss and, every epoch, the state to resume from."""

    order = 66

    def __init__(self, run_dir: Path, best_loss: float = float("inf"), best_epoch: int = -1, resumable: bool = True):
        self.run_dir, self.best_loss, self.best_epoch, self.resumable = Path(run_dir), best_loss, best_epoch, resumable

    def before_epoch(self):
        self.skipped = False

    def after_cancel_epoch(self):
        self.skipped = True

    def after_epoch(self):
        if self.skipped:
            return
        valid_loss = float(self.recorder.log[2]) if len(self.recorder.log) > 2 else float("inf")
        main = is_main_process()
        if valid_loss < self.best_loss or self.best_epoch < 0:
            self.best_loss, self.best_epoch = valid_loss, self.epoch
            if main:
                save_torch(unwrap(self.model).state_dict(), self.run_dir / "model.pth")
                console.print(f"better model at epoch {self.epoch}: valid_loss {valid_loss:.4f}")
        if main and self.resumable:
            state = {
                "model": unwrap(self.model).state_dict(),
                "opt": optimizer_state(self.opt),
                "epoch": self.epoch,
                "best_loss": self.best_loss,
                "best_epoch": self.best_epoch,
                "rng": rng_state(self.dls),
            }
            save_torch(state, self.run_dir / "last.pth")


def optimizer_state(opt) -> dict:
    """A fastai optimiser's state as plain lists, dicts and numbers, so it loads with torch.load(weights_only=True)."""
    sd = opt.state_dict()
    return {"state": [plain_numbers(s) for s in sd["state"]], "hypers": [plain_numbers(h) for h in sd["hypers"]]}


def plain_numbers(values: dict) -> dict:
    """`values` with NumPy scalars (fastai's one-cycle schedule sets the lr as one) as Python numbers."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def rng_state(dls) -> dict:
    """The random-number generators' states (Python's, NumPy's, torch's, each loader's), in types torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loaders": [dl.rng.getstate() if isinstance(getattr(dl, "rng", None), random.Random) else None for dl in dls.loaders],
    }


def set_rng_state(dls, state: dict) -> None:
    """Restore what `rng_state` saved, so a resumed run draws the same shuffles and augmentations as an uninterrupted one."""
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, loader_state in zip(dls.loaders, state["loaders"]):
        if loader_state is not None:
            dl.rng.setstate(loader_state)


def load_optimizer_state(opt, state: dict) -> None:
    """Restore what `optimizer_state` saved."""
    opt.load_state_dict({"state": state["state"], "hypers": L(state["hypers"])})


def quiet_progress(learn: Learner) -> Learner:
    """Outside a terminal, drop fastai's progress bars and log one line per epoch to stderr instead."""
    if sys.stdout.isatty():
        return learn
    from fastai.callback.progress import ProgressCallback

    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])

    def log(row):
        names = list(learn.recorder.metric_names)
        if list(row) == names or len(row) < len(names):  # the header, or an epoch skipped on resume (its time alone)
            return
        parts = [f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {'-' if v is None else v}" for n, v in zip(names, row)]
        console.print("  ".join(parts), highlight=False)

    learn.logger = log
    return learn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    """train/valid loss and MAP@5 per epoch, as a PNG; one set of lines per member where `history` has a member column (ensembles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    groups = history.groupby("member") if "member" in history else [(None, history)]
    for i, (member, rows) in enumerate(groups):
        tag, style = ("", "o-") if member is None else (f" (member {member})", ["o-", "s--", "^:", "d-."][i % 4])
        ax1.plot(rows.epoch, rows.train_loss, style, color="tab:blue", label="train loss" + tag)
        ax1.plot(rows.epoch, rows.valid_loss, style, color="tab:orange", label="valid loss" + tag)
        scored = rows.dropna(subset=["map5"])  # epochs without a MAP@5 (fit --map-every)
        ax2.plot(scored.epoch, scored.map5, style, color="tab:green", label="valid MAP@5" + tag)
        ax2.plot(scored.epoch, scored.top1, style, color="tab:olive", label="valid top-1" + tag)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize="small")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _new_whale_class(vocab: list[str]) -> int | None:
    from whalefast import NEW_WHALE

    return vocab.index(NEW_WHALE) if NEW_WHALE in vocab else None


def make_learner(cfg: FitConfig, dls) -> Learner:
    """The Learner for `cfg`: registry backbone, SGD as torch applies it, the chosen method's head and loss."""
    from whalefast.methods import method_parts

    head, loss_func, metrics, extra_cbs = method_parts(cfg, dls)
    learn = build_learner(
        dls,
        cfg.arch,
        n_out=len(dls.vocab),
        pretrained=cfg.pretrained,
        head=head,
        loss_func=loss_func,
        opt_func=partial(sgd_like_torch, mom=cfg.momentum, wd=cfg.wd) if cfg.opt == "sgd" else Adam,
        lr=cfg.lr,
        metrics=metrics,
        wd=cfg.wd,
        wd_bn_bias=True,
        path=cfg.run_dir,
        model_dir=".",
        cbs=extra_cbs,
    )
    quiet_progress(learn)
    # Channels-last convolutions train efficientnet-lite0 about 1.2x faster on a CPU too.
    learn.to_channelslast(use_amp=False)
    if torch.cuda.is_available():
        learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    if cfg.compile:
        learn.model = torch.compile(learn.model)
    return learn


def _dataloaders(cfg: FitConfig):
    return whale_dataloaders(
        cfg.data,
        cfg.prepared_dir,
        size=cfg.size,
        bs=cfg.bs,
        min_samples=cfg.min_samples,
        train_new_whale=cfg.train_new_whale,
        augment=cfg.augment,
        grey=cfg.grey,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
    )


# Upper bounds that keep a typo from asking for terabytes: an embedding of 100 million numbers, a thousand networks.
LIMITS = {"embed_dim": 8192, "sub_centers": 64, "members": 64, "epochs": 10_000, "bs": 65_536}


def check_config(cfg: FitConfig) -> None:
    """One-line errors, each naming its option, for settings that cannot work."""
    get_arch(cfg.arch)
    choices = {"method": ("softmax", "arcface"), "opt": ("sgd", "adam"), "schedule": ("step", "one-cycle"), "augment": AUGMENTS}
    for option, valid in choices.items():
        if getattr(cfg, option) not in valid:
            raise WhalefastError(f"--{option} must be {' or '.join(valid)}, got {getattr(cfg, option)!r}")
    for option in ("epochs", "bs", "min_samples", "embed_dim", "sub_centers", "map_every", "members"):
        if getattr(cfg, option) < 1:
            raise WhalefastError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(cfg, option)}")
    for option in ("freeze_epochs", "frozen_stages"):
        if getattr(cfg, option) < 0:
            raise WhalefastError(f"--{option.replace('_', '-')} must be 0 or more, got {getattr(cfg, option)}")
    for option in ("lr", "scale", "head_lr_mult"):
        value = getattr(cfg, option)
        if not (math.isfinite(value) and value > 0):
            raise WhalefastError(f"--{option.replace('_', '-')} must be a positive number, got {value}")
    for option in ("gamma", "momentum", "wd", "margin"):
        value = getattr(cfg, option)
        if not (math.isfinite(value) and value >= 0):
            raise WhalefastError(f"--{option} must be a number of at least 0, got {value}")
    if cfg.parts < 0 or cfg.parts == 1:
        raise WhalefastError(f"--parts must be 0 (the whole photo only) or at least 2, got {cfg.parts}")
    cells = tuple(math.ceil(side / get_arch(cfg.arch).stride) for side in cfg.size)
    if cfg.parts > min(cells):
        raise WhalefastError(
            f"--parts must be at most {min(cells)} at --size {size_text(cfg.size)}: {cfg.arch}'s feature map is {cells[0]}x{cells[1]} cells, got {cfg.parts}"
        )
    if not 0 <= cfg.seed < 2**32:
        raise WhalefastError(f"--seed must lie in 0..{2**32 - 1}, got {cfg.seed}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise WhalefastError(f"--num-workers must be 0 or more, got {cfg.num_workers}")
    for option, most in LIMITS.items():
        if getattr(cfg, option) > most:
            raise WhalefastError(f"--{option.replace('_', '-')} must be at most {most}, got {getattr(cfg, option)}")
    if cfg.frozen_stages and cfg.frozen_stages > (most := stage_count(cfg.arch)):
        raise WhalefastError(f"--frozen-stages must be at most {most} for {cfg.arch}, got {cfg.frozen_stages}")
    if min(cfg.size) < 16 or max(cfg.size) > MAX_SIDE:
        raise WhalefastError(f"--size must be 16 to {MAX_SIDE} pixels each way, got {size_text(cfg.size)}")
    if any(m < 1 for m in cfg.milestones):
        raise WhalefastError(f"--milestones must be epoch numbers of at least 1, got {','.join(map(str, cfg.milestones))}")
    for option in ("freeze_epochs", "frozen_stages"):
        if getattr(cfg, option) and not cfg.pretrained:
            flag = f"--{option.replace('_', '-')}"
            raise WhalefastError(f"{flag} needs a pretrained model (drop --no-pretrained or {flag})")


RESUMABLE_CHANGES = {"num_workers", "name", "models_dir"}  # options a resumed run may change: they do not alter what it learns (the last two say where it is)


def option_text(value) -> str:
    """An option's value as one would type it: (6/7, 1.0) -> '0.8571,1'."""
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def check_resume(saved: FitConfig, given: dict) -> None:
    """Refuse to resume when an option given now differs from the interrupted run's (resuming ignores them)."""
    differ = []
    for key, value in given.items():
        if key in RESUMABLE_CHANGES or key not in FitConfig.__dataclass_fields__:
            continue
        old = getattr(saved, key)
        new = getattr(FitConfig(**{**asdict(saved), key: value}), key)  # normalised as the config normalises it
        if new != old:
            text = size_text if key == "size" else option_text
            differ.append(f"--{key.replace('_', '-')} {text(new)} (the run has {text(old)})")
    if differ:
        raise WhalefastError(
            f"--resume continues {saved.name} with its saved settings, but {'; '.join(differ)}: drop those options, or start a new run with another --name"
        )


def fit(cfg: FitConfig, resume: bool = False, distributed: bool = False) -> dict:
    """Train a model as `cfg` says; write config, weights, history, curves and calibration to models/NAME/.

    With `distributed` (in processes started by accelerate launch or torchrun), train data-parallel
    through fastai's distrib_ctx; only rank 0 writes files. With `cfg.members` above 1, train an
    ensemble (see `fit_ensemble`).
    """
    if resume:
        saved = load_config(cfg.run_dir, finished=False)
        cfg = replace(saved, num_workers=cfg.num_workers, name=cfg.name, models_dir=cfg.models_dir)  # where it is now, if moved
        if cfg.members == 1 and not (cfg.run_dir / "last.pth").is_file():
            raise WhalefastError(f"{cfg.run_dir / 'last.pth'}: nothing to resume")
    check_config(cfg)
    reuse_freed_memory()
    if cfg.members > 1:
        if distributed:
            raise WhalefastError("--members trains its networks one after another; it does not run with --distributed")
        return fit_ensemble(cfg, resume)
    if distributed:
        from whalefast.distributed import init_distributed

        init_distributed()
    learn, best_epoch, best_loss = train_network(cfg, resume, distributed)
    return finish(cfg, unwrap(learn.model), learn.dls, best_epoch, best_loss)


def train_network(cfg: FitConfig, resume: bool = False, distributed: bool = False, more_configs: dict | None = None) -> tuple[Learner, int, float]:
    """Train one network as `cfg` says, checkpointing to its run folder; (learner with the best weights, best epoch, its valid loss).

    `more_configs` (path -> JSON content) are written first when the first epoch ends (an ensemble's own status and config).
    """
    set_seed(cfg.seed, reproducible=True)
    dls = rank0_first(_dataloaders, cfg)  # rank 0 builds the decoded-image cache, the others then read it
    cfg.vocab = list(dls.vocab)
    cfg.crop, cfg.box_model = dls.crop, dls.box_model
    cfg.train_digest = file_digest(Path(cfg.data) / "train.csv")
    run_dir = cfg.run_dir
    learn = make_learner(cfg, dls)

    start_epoch, previous, best = 0, None, (float("inf"), -1)
    if resume:
        state = load_saved(run_dir / "last.pth", "resume state")
        unwrap(learn.model).load_state_dict(state["model"])
        start_epoch, best = state["epoch"] + 1, (state["best_loss"], state["best_epoch"])
        if (run_dir / "history.csv").exists():
            previous = pd.read_csv(run_dir / "history.csv")
        console.print(f"resuming {cfg.name} at epoch {start_epoch} of {cfg.epochs}")
    elif cfg.freeze_epochs:
        learn.freeze()
        learn.fit(cfg.freeze_epochs, lr=cfg.lr, cbs=[StopOnNonFiniteLoss(cfg.lr)])
    learn.unfreeze()
    freeze_stages(unwrap(learn.model), cfg.frozen_stages)
    if resume:
        load_optimizer_state(learn.opt, state["opt"])  # after unfreeze, which clears the optimiser's state (momentum, Adam's moments)
        if "rng" in state and not distributed:  # each process has its own generators; only rank 0's are saved
            set_rng_state(learn.dls, state["rng"])

    history = History(run_dir, previous)
    files = {} if resume else {**(more_configs or {}), **run_files(run_dir, asdict(cfg))}
    checkpoints = Checkpoints(run_dir, *best)
    cbs = [StopOnNonFiniteLoss(cfg.lr), StartRunFolder(files), history, checkpoints]
    if start_epoch < cfg.epochs:
        # SyncBatchNorm runs on GPUs only; on CPUs each process keeps its own batch statistics.
        cuda = torch.cuda.is_available()
        context = learn.distrib_ctx(sync_bn=cuda, cpu=not cuda) if distributed else contextlib.nullcontext()
        with context:
            if cfg.schedule == "step":
                learn.fit(
                    cfg.epochs,
                    lr=cfg.lr,
                    cbs=[StepSchedule(cfg.lr, cfg.milestones, cfg.gamma, cfg.head_lr_mult)] + cbs,
                    reset_opt=False,
                    start_epoch=start_epoch,
                )
            else:
                learn.fit_one_cycle(cfg.epochs, lr_max=body_and_head(cfg.lr, cfg.head_lr_mult), cbs=cbs, start_epoch=start_epoch)
        if distributed:
            console.print(f"rank {rank_distrib()}: trained {history.train_batches} batches")

    barrier()
    unwrap(learn.model).load_state_dict(torch.load(run_dir / "model.pth", map_location="cpu", weights_only=True))
    return learn, checkpoints.best_epoch, checkpoints.best_loss


def fit_ensemble(cfg: FitConfig, resume: bool = False) -> dict:
    """Train `cfg.members` networks in turn (seeds seed, seed + 1, ...) on the same split, then calibrate and catalogue them as one model.

    Each member is an ordinary run in RUN/members/I/, so an interrupted ensemble resumes where it
    stopped: finished members are loaded, the interrupted one continues from its last epoch.
    """
    from whalefast.ensemble import Ensemble, member_config

    networks, best_epochs, losses = [], [], []
    for i in range(cfg.members):
        member = member_config(cfg, i)
        console.print(f"member {i + 1} of {cfg.members} (seed {member.seed})")
        own = run_files(cfg.run_dir, asdict(cfg)) if i == 0 and not resume else None
        learn, best_epoch, best_loss = train_network(member, resume and is_member_resumable(member), more_configs=own)
        mark_finished(member.run_dir)
        networks.append(unwrap(learn.model))
        best_epochs.append(best_epoch)
        losses.append(best_loss)
        dls = learn.dls
        cfg.vocab, cfg.crop, cfg.box_model, cfg.train_digest = member.vocab, member.crop, member.box_model, member.train_digest
    model = Ensemble(networks, cfg.method)  # one process only: fit refuses --members with --distributed
    history = pd.concat([pd.read_csv(member_config(cfg, i).run_dir / "history.csv").assign(member=i) for i in range(cfg.members)])
    write_csv(history, cfg.run_dir / "history.csv")
    plot_curves(history, cfg.run_dir / "curves.png")
    write_json(asdict(cfg), cfg.run_dir / "config.json")
    save_torch(model.state_dict(), cfg.run_dir / "model.pth")
    return finish(cfg, model, dls, best_epochs, sum(losses) / len(losses))


def is_member_resumable(member: FitConfig) -> bool:
    """Whether an ensemble member's folder holds an interrupted or finished run of exactly these settings (not one left by an earlier run)."""
    if not (member.run_dir / "last.pth").is_file():
        return False
    try:
        saved = load_config(member.run_dir, finished=False)
    except WhalefastError:
        return False
    # Filled in by training, free to change on resume, spelt another way, or used only after the members are trained.
    learnt = {"vocab", "crop", "box_model", "train_digest", "num_workers", "models_dir", "tta_scales"}
    return all(getattr(saved, k) == getattr(member, k) for k in FitConfig.__dataclass_fields__ if k not in learnt)


def finish(cfg: FitConfig, model: nn.Module, dls, best_epoch: int | list[int], valid_loss: float) -> dict:
    """Calibrate the new_whale threshold on validation with the best weights; save it (and the catalogue); report the figures."""
    from whalefast.ensemble import with_test_scales
    from whalefast.methods import embed_known_photos, final_catalogue, validation_scores

    model = with_test_scales(model, cfg)
    known = embed_known_photos(cfg, model, dls) if cfg.method == "arcface" else None
    scores, targets = validation_scores(cfg, model, dls, known)
    new_whale_class = _new_whale_class(cfg.vocab)
    if new_whale_class is None:
        threshold, score = calibrate_threshold(scores, targets)
        top1 = float((rank_with_new_whale(scores, threshold)[:, 0] == targets).float().mean())
    else:
        threshold = None
        ranked = scores.topk(min(5, scores.shape[1]), 1).indices
        score, top1 = map5(ranked, targets), float((ranked[:, 0] == targets).float().mean())
    calibration = {"threshold": threshold, "valid_map5": score, "valid_top1": top1, "best_epoch": best_epoch, "valid_loss": valid_loss}
    if is_main_process():
        if cfg.method == "arcface":
            from whalefast.catalogue import catalogue_path, save_catalogue

            save_catalogue(final_catalogue(cfg, known), catalogue_path(cfg.run_dir))
        write_json(calibration, cfg.run_dir / "calibration.json")
        mark_finished(cfg.run_dir)
        epochs = f"best epochs {', '.join(map(str, best_epoch))}" if isinstance(best_epoch, list) else f"best epoch {best_epoch}"
        results.print(
            f"{epochs} (valid loss {valid_loss:.4f}); validation MAP@5 {score:.4f}, top-1 {top1:.4f}, "
            f"new_whale threshold {threshold if threshold is None else round(threshold, 4)}",
            highlight=False,
        )
    return {"run_dir": str(cfg.run_dir), **calibration}


def lr_find(cfg: FitConfig) -> dict:
    """fastai's learning-rate finder on `cfg`'s data and model; saves lr_find.png; the weights are left as they were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastai.callback.schedule import minimum, slide, steep, valley

    check_config(cfg)
    reuse_freed_memory()
    set_seed(cfg.seed, reproducible=True)
    dls = _dataloaders(cfg)
    cfg.vocab = list(dls.vocab)
    learn = make_learner(cfg, dls)
    learn.unfreeze()
    freeze_stages(unwrap(learn.model), cfg.frozen_stages)
    before = {k: v.clone() for k, v in unwrap(learn.model).state_dict().items()}
    suggestions = learn.lr_find(suggest_funcs=(minimum, steep, valley, slide), show_plot=True)
    unchanged = all(torch.equal(before[k], v) for k, v in unwrap(learn.model).state_dict().items())
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "lr_find.png"
    with atomic_path(path) as tmp:
        plt.gcf().savefig(tmp, format="png", dpi=90)
    plt.close("all")
    return {"suggestions": {k: float(v) for k, v in suggestions._asdict().items()}, "plot": str(path), "weights_unchanged": unchanged}
