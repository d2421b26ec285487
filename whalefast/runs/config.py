"""A run's settings (what the user chose), what it learnt from the data, and the input spec both resolve to.

`FitConfig.from_options` is the one merge of a recipe and typed options (the CLI, the demo and the
benches use it); `resolve_input_spec` the one place the input spec is made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from whalefast.core.errors import WhalefastError
from whalefast.core.images import MAX_SIDE, as_scales, as_size, size_text
from whalefast.core.spec import InputSpec
from whalefast.data.prepared import BOXES, prepare_settings
from whalefast.nets.registry import get_arch, stage_count
from whalefast.runs.recipes import recipe

METHODS = ("softmax", "arcface")
MEMBERS_DIR = "members"
# Settings of ArcFace's embeddings and catalogue: a softmax fit has neither, so typing them for one is refused.
ARCFACE_ONLY = ("embed_dim", "margin", "margin_power", "margin_floor", "scale", "sub_centers", "parts", "catalogue_dims", "mirror_view")
VALIDATION_RUN = "validation"  # fit --refit: the run on the training photos alone that chose the threshold, inside the model's folder


@dataclass
class FitConfig:
    """Everything the user chose for a training run (a recipe and options); saved as config.json beside its weights."""

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
    margin: float = 0.3  # radians; with margin_power, the margin of an id with one training photo
    margin_power: float = 0.0  # arcface: margins fall with an id's photos n as n^-margin_power towards margin_floor (0: one margin for all)
    margin_floor: float = 0.05
    scale: float = 30.0
    sub_centers: int = 1
    parts: int = 0  # arcface: the feature map also cut into this many vertical and horizontal strips, each embedded on its own (EmbeddingHead)
    augment: str = "reference"  # or "fluke": see whalefast.data.augment.FlukeAugment
    head_lr_mult: float = 1.0  # the head (and ArcFace's class centres) learns this many times faster than the body
    grey: bool = False  # train and match on greyscale: colour and greyscale photos then look alike
    num_workers: int | None = None
    compile: bool = False
    map_every: int = 1  # validation MAP@5 every N epochs and at the last
    members: int = 1  # an ensemble of this many networks, seeds seed, seed + 1, ...
    tta_scales: tuple[float, ...] = (1.0,)  # inference sees each photo resized by each factor, the views combined
    mirror_view: bool = False  # arcface: inference also sees each photo's mirror image as a view of its own
    catalogue_dims: int = 0  # arcface: store embeddings in the catalogue projected to this many dimensions (0: as they are)
    new_whale_share: float = 0.0  # submit moves new_whale's threshold halfway to the quantile of this share of test photos' best scores
    refit: bool = False  # after a run on the training photos has calibrated the threshold, train again on every labelled photo
    fold_in: int = 0  # after a run on the training photos has calibrated the threshold, train its network this many epochs more on every labelled photo
    fold_in_within: bool = False  # the fold-in epochs are the last fold_in of `epochs`, on its schedule, not more after them

    def __post_init__(self):
        self.size = as_size(self.size)
        self.milestones = tuple(int(m) for m in self.milestones)
        self.tta_scales = as_scales(self.tta_scales)

    @property
    def refits(self) -> bool:
        """Whether the model is trained again on every labelled photo once a run on the training photos has calibrated it (--refit or --fold-in)."""
        return self.refit or self.fold_in > 0

    def refit_refusal(self, why: str) -> str:
        """One line refusing this run's --refit or --fold-in N because of `why`, with how to do without it."""
        flag, fix = ("--refit", "drop --refit") if self.refit else (f"--fold-in {self.fold_in}", "add --fold-in 0")
        return f"{flag} {why} ({fix})"

    @property
    def run_dir(self) -> Path:
        return Path(self.models_dir) / self.name

    @property
    def prepared_dir(self) -> Path:
        return Path(self.prepared) if self.prepared else Path(self.data) / "prepared"

    @classmethod
    def from_options(cls, options: dict, typed=None) -> FitConfig:
        """The settings for `options`, the values of their --recipe filled in wherever the user typed nothing.

        `typed` names the options the user gave (the CLI's others hold defaults, which the recipe
        beats); by default all of `options`. Text is parsed as the CLI takes it ("16,19", "128x256",
        "6/7,1,8/7"); the name defaults to the recipe's (the arch's for the reference), min_samples to
        prepare's --min-samples. Where `typed` is given, an ArcFace setting typed for another method is
        refused (a recipe's are harmless there).
        """
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise WhalefastError(f"unknown fit settings: {', '.join(unknown)}")
        person_typed = typed is not None
        typed = set(options) if typed is None else set(typed)
        chosen = recipe(options.get("recipe", "reference"))
        merged = {**{k: v for k, v in options.items() if k not in typed}, **chosen, **{k: v for k, v in options.items() if k in typed}}
        method = merged.get("method", cls.method)
        if person_typed and method != "arcface":
            unused = [f"--{k.replace('_', '-')}" for k in ARCFACE_ONLY if k in typed and merged[k] != getattr(cls, k)]
            if unused:
                raise WhalefastError(f"{', '.join(unused)}: ArcFace settings, unused by --method {method}; drop them or use --method arcface")
        if isinstance(merged.get("milestones"), str):
            text = merged["milestones"].strip()
            try:
                merged["milestones"] = tuple(int(m) for m in text.split(",")) if text else ()
            except ValueError:
                raise WhalefastError(f"--milestones must be comma-separated epoch numbers (e.g. 16,19), got {text!r}") from None
        name_from = merged.get("arch", cls.arch) if merged.get("recipe", "reference") == "reference" else merged["recipe"]
        merged["name"] = merged.get("name") or name_from
        for key in ("data", "models_dir", "prepared"):
            if merged.get(key) is not None:
                merged[key] = str(merged[key])
        if merged.get("min_samples") is None:
            prepared = Path(merged["prepared"]) if merged.get("prepared") else Path(merged.get("data", cls.data)) / "prepared"
            merged["min_samples"] = prepare_settings(prepared).get("min_samples", cls.min_samples)
        return cls(**merged)


@dataclass
class Learnt:
    """What a run learnt from its data rather than from the user: its class vocabulary and the train.csv it came from."""

    vocab: list[str] = field(default_factory=list)
    train_digest: str | None = None  # SHA-256 of the train.csv it learnt from: submit refuses other data


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
    kind: str = "boxes"
    prepared: str | None = None  # where the decoded-image cache goes: PREPARED/cache (DATA/prepared by default)

    @property
    def run_dir(self) -> Path:
        return Path(self.models_dir) / self.name

    @property
    def cache_dir(self) -> Path:
        return Path(self.prepared or Path(self.data) / "prepared") / "cache"

    @property
    def spec(self) -> InputSpec:
        """What a box model sees: the whole photo squashed to a square, in colour."""
        return InputSpec(size=(self.size, self.size))


def resolve_input_spec(cfg: FitConfig) -> InputSpec:
    """The input spec of a new run of `cfg` on its prepared data: the one place it is decided.

    Crops follow prepare (its boxes, and the box model that made them); a network trained on mirrored
    photos is shown the mirror image at inference too (the fluke augmentation never mirrors: a
    mirrored fluke shows another whale's pattern).
    """
    box_model = prepare_settings(cfg.prepared_dir).get("box_model")
    crop = "box-model" if box_model else "boxes" if (cfg.prepared_dir / BOXES).is_file() else "none"
    return InputSpec(
        size=cfg.size, grey=cfg.grey, crop=crop, box_model=box_model, mirror=cfg.augment != "fluke", scales=cfg.tta_scales, mirror_view=cfg.mirror_view
    )


def legacy_input_spec(raw: dict) -> InputSpec:
    """The input spec of a run saved before input.json, from its config.json."""
    crop = "box-model" if raw.get("box_model") else "boxes" if raw.get("crop") else "none"
    return InputSpec(
        size=raw.get("size", FitConfig.size),
        grey=raw.get("grey", False),
        crop=crop,
        box_model=raw.get("box_model"),
        mirror=raw.get("augment", "reference") != "fluke",
        scales=raw.get("tta_scales", (1.0,)),
    )


# Upper bounds that keep a typo from asking for terabytes: an embedding of 100 million numbers, a thousand networks.
AUGMENTS = ("reference", "fluke")  # the training pipelines of whalefast.data.loaders (flips; whalefast.data.augment.FlukeAugment)
LIMITS = {"fold_in": 10_000, "embed_dim": 8192, "sub_centers": 64, "members": 64, "epochs": 10_000, "bs": 65_536, "catalogue_dims": 8192}


def check_new_whale_share(share: float) -> float:
    """`share` if it is one (0 to below 1), else a one-line error."""
    if not (math.isfinite(share) and 0 <= share < 1):
        raise WhalefastError(f"--new-whale-share must be at least 0 and below 1, got {share}")
    return share


def check_config(cfg: FitConfig) -> None:
    """One-line errors, each naming its option, for settings that cannot work."""
    get_arch(cfg.arch)
    choices = {"method": METHODS, "opt": ("sgd", "adam"), "schedule": ("step", "one-cycle"), "augment": AUGMENTS}
    for option, valid in choices.items():
        if getattr(cfg, option) not in valid:
            raise WhalefastError(f"--{option} must be {' or '.join(valid)}, got {getattr(cfg, option)!r}")
    for option in ("epochs", "bs", "min_samples", "embed_dim", "sub_centers", "map_every", "members"):
        if getattr(cfg, option) < 1:
            raise WhalefastError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(cfg, option)}")
    for option in ("freeze_epochs", "frozen_stages", "catalogue_dims"):
        if getattr(cfg, option) < 0:
            raise WhalefastError(f"--{option.replace('_', '-')} must be 0 or more, got {getattr(cfg, option)}")
    for option in ("lr", "scale", "head_lr_mult"):
        value = getattr(cfg, option)
        if not (math.isfinite(value) and value > 0):
            raise WhalefastError(f"--{option.replace('_', '-')} must be a positive number, got {value}")
    for option in ("gamma", "momentum", "wd", "margin", "margin_power", "margin_floor"):
        value = getattr(cfg, option)
        if not (math.isfinite(value) and value >= 0):
            raise WhalefastError(f"--{option} must be a number of at least 0, got {value}")
    if cfg.margin_power and cfg.margin_floor > cfg.margin:
        raise WhalefastError(f"--margin-floor must be at most --margin ({cfg.margin}), got {cfg.margin_floor}")
    check_new_whale_share(cfg.new_whale_share)
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
    if cfg.refits and cfg.members > 1:
        raise WhalefastError(cfg.refit_refusal("trains one network twice; it does not combine with --members"))
    if cfg.refit and cfg.fold_in:
        raise WhalefastError(
            f"--refit trains a new network on every photo and --fold-in {cfg.fold_in} goes on training the first one: choose one (--refit --fold-in 0)"
        )
    if cfg.fold_in < 0:
        raise WhalefastError(f"--fold-in must be 0 (none) or more epochs, got {cfg.fold_in}")
    if cfg.fold_in_within and cfg.fold_in >= cfg.epochs:
        raise WhalefastError(
            f"--fold-in-within trains the last --fold-in epochs of the --epochs on every photo, so --fold-in must be under --epochs, got {cfg.fold_in} and {cfg.epochs}"
        )
    if cfg.mirror_view and (cfg.method != "arcface" or cfg.augment != "fluke"):
        raise WhalefastError(
            "--mirror-view compares mirror images with mirror images: it needs --method arcface and --augment fluke"
            " (a network trained on mirrored photos averages them in already); add --no-mirror-view"
        )
    for option in ("freeze_epochs", "frozen_stages"):
        if getattr(cfg, option) and not cfg.pretrained:
            flag = f"--{option.replace('_', '-')}"
            raise WhalefastError(f"{flag} needs a pretrained model (drop --no-pretrained or {flag})")


# Settings a resumed run may change: they do not alter what it learns (the last two say where it is).
RESUMABLE_CHANGES = {"num_workers", "name", "models_dir"}


def option_text(value) -> str:
    """An option's value as one would type it: (6/7, 1.0) -> '0.8571,1'; (128, 256) as a size -> '128x256'."""
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def check_resume(saved: FitConfig, typed: dict) -> None:
    """Refuse to resume when an option the user typed differs from the interrupted run's (resuming keeps the run's)."""
    differ = []
    for key, value in typed.items():
        if key in RESUMABLE_CHANGES or key not in FitConfig.__dataclass_fields__:
            continue
        old = getattr(saved, key)
        new = getattr(FitConfig.from_options({**asdict(saved), key: value}), key)  # normalised as the config normalises it
        if new != old:
            text = size_text if key == "size" else option_text
            differ.append(f"--{key.replace('_', '-')} {text(new)} (the run has {text(old)})")
    if differ:
        raise WhalefastError(
            f"--resume continues {saved.name} with its saved settings, but {'; '.join(differ)}: drop those options, or start a new run with another --name"
        )


def validation_config(cfg: FitConfig) -> FitConfig:
    """The settings of a refit's first run, on the training photos alone: the same, in RUN/validation/."""
    return replace(cfg, refit=False, fold_in=0, fold_in_within=False, name=VALIDATION_RUN, models_dir=str(cfg.run_dir))


def member_config(cfg: FitConfig, index: int) -> FitConfig:
    """The settings of member `index` of an ensemble run: the same, seed + index, in RUN/members/INDEX/."""
    return replace(cfg, members=1, seed=cfg.seed + index, name=str(index), models_dir=str(cfg.run_dir / MEMBERS_DIR))
