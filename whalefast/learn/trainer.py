"""The fit and lr-find stages: a fastai Learner for a run's settings, trained with checkpoints, history and resume, then calibrated.

A run's folder is a whalefast.runs.folder.Run; its input spec is resolved once, when the run starts
(whalefast.runs.config.resolve_input_spec), and saved with its first weights.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401 - adds Learner.to_channelslast
import fastai.callback.schedule  # noqa: F401 - adds Learner.fit_one_cycle and Learner.lr_find
import pandas as pd
import torch
from fastai.learner import Learner
from fastai.optimizer import SGD, Adam
from fastai.torch_core import rank_distrib, set_seed
from fastai.vision.learner import create_head, vision_learner
from torch import nn

from whalefast.core.allocator import reuse_freed_memory
from whalefast.core.console import console
from whalefast.core.errors import WhalefastError
from whalefast.core.files import atomic_path, file_digest, load_saved, save_torch, write_csv, write_json
from whalefast.core.spec import InputSpec
from whalefast.data.loaders import TrainingData, whale_dataloaders
from whalefast.learn.calibration import finish
from whalefast.learn.callbacks import (
    Checkpoints,
    EndAfterEpoch,
    History,
    StartRunFolder,
    StepSchedule,
    StopOnNonFiniteLoss,
    UndecayedPoolingExponents,
    ValidationMAP,
    body_and_head,
)
from whalefast.learn.curves import plot_curves
from whalefast.learn.distributed import barrier, init_distributed, rank0_first
from whalefast.learn.state import load_optimizer_state, set_rng_state
from whalefast.nets.forward import unwrap
from whalefast.nets.registry import freeze_stages, get_arch
from whalefast.nets.views import Ensemble
from whalefast.runs.config import RESUMABLE_CHANGES, FitConfig, Learnt, check_config, check_resume, member_config, resolve_input_spec, validation_config
from whalefast.runs.folder import Run
from whalefast.runs.methods import Embedded, get_method


def sgd_like_torch(params, lr, mom=0.9, wd=1e-4):
    """fastai's SGD with L2 weight decay added to the gradient, i.e. exactly torch.optim.SGD(momentum, weight_decay)."""
    return SGD(params, lr=lr, mom=mom, wd=wd, decouple_wd=False)


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


def build_learner(dls, arch: str, n_out: int, pretrained: bool, head: nn.Module | None = None, **learner_kwargs) -> Learner:
    """A fastai Learner for `arch` that trains channels-last: vision_learner for the registered backbones, a plain Learner for whale-resnet."""
    spec = get_arch(arch)
    if spec.vision_learner:
        learn = vision_learner(dls, spec.build, n_out=n_out, pretrained=pretrained, normalize=False, custom_head=head, **learner_kwargs)
    elif pretrained:
        raise WhalefastError(f"{arch} has no pretrained weights; pass --no-pretrained")
    else:
        head = head if head is not None else create_head(spec.features, n_out, concat_pool=True)
        learn = Learner(dls, nn.Sequential(spec.build(False), head), **learner_kwargs)
    # Channels-last convolutions train efficientnet-lite0 1.2-1.4x faster on a CPU too (bench/backbone_speed.py).
    learn.to_channelslast(use_amp=False)
    return learn


def make_learner(cfg: FitConfig, spec: InputSpec, data: TrainingData, metrics: bool = True, until: int | None = None) -> Learner:
    """The Learner for `cfg`: registry backbone, SGD as torch applies it, the method's head and loss, and (with `metrics`) validation MAP@5, scored at the last epoch it trains (`until`, if it stops early)."""
    method = get_method(cfg.method)
    head = method.head(cfg, len(data.vocab), counts=data.class_counts())
    scoring = ValidationMAP(method, spec, data, cfg.bs, cfg.map_every, cfg.catalogue_dims, last=until) if metrics else None
    learn = build_learner(
        data.dls,
        cfg.arch,
        n_out=len(data.vocab),
        pretrained=cfg.pretrained,
        head=head,
        loss_func=method.loss(head),
        opt_func=partial(sgd_like_torch, mom=cfg.momentum, wd=cfg.wd) if cfg.opt == "sgd" else Adam,
        lr=cfg.lr,
        metrics=scoring.metrics() if scoring else [],
        wd=cfg.wd,
        wd_bn_bias=True,
        path=cfg.run_dir,
        model_dir=".",
        cbs=[UndecayedPoolingExponents(), *([scoring] if scoring else [])],
    )
    quiet_progress(learn)
    if torch.cuda.is_available():
        learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    if cfg.compile:
        learn.model = torch.compile(learn.model)
    return learn


def training_data(cfg: FitConfig, spec: InputSpec, every_photo: bool = False) -> TrainingData:
    return whale_dataloaders(
        cfg.data,
        cfg.prepared_dir,
        spec,
        bs=cfg.bs,
        min_samples=cfg.min_samples,
        train_new_whale=cfg.train_new_whale,
        augment=cfg.augment,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        every_photo=every_photo,
    )


def fit(cfg: FitConfig, resume: bool = False, distributed: bool = False, typed: dict | None = None) -> dict:
    """Train a model as `cfg` says; write config, weights, history, curves and calibration to models/NAME/.

    With `resume`, continue the run in cfg.run_dir with its saved settings (`typed`: the options the
    user gave, refused where they differ from the run's). With `distributed` (in processes started by
    accelerate launch or torchrun), train data-parallel through fastai's distrib_ctx; only rank 0
    writes files. With `cfg.members` above 1, train an ensemble (see `fit_ensemble`).
    """
    spec = None
    if resume:
        run = Run.open(cfg.run_dir, finished=False)
        check_resume(run.settings, typed or {})
        where = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}  # where it is now, if moved
        cfg, spec = replace(run.settings, **where), run.spec if (run / Run.INPUT).is_file() else None
        first = Run(validation_config(cfg).run_dir) / Run.RESUME  # a refit interrupted in its first run
        if cfg.members == 1 and not (run / Run.RESUME).is_file() and not (cfg.refits and first.is_file()):
            raise WhalefastError(f"{run / Run.RESUME}: nothing to resume")
    check_config(cfg)
    spec = spec or resolve_input_spec(cfg)
    reuse_freed_memory()
    if cfg.members > 1:
        if distributed:
            raise WhalefastError("--members trains its networks one after another; it does not run with --distributed")
        return fit_ensemble(cfg, spec, resume)
    if cfg.refits:
        if distributed:
            raise WhalefastError(cfg.refit_refusal("trains its two runs in one process; it does not run with --distributed"))
        return fit_refit(cfg, spec, resume)
    if distributed:
        init_distributed()
    t = train_network(cfg, spec, resume, distributed)
    return finish(Run(cfg.run_dir), cfg, spec, t.learnt, unwrap(t.learn.model), t.data, t.best_epoch, t.best_loss, t.scored)


@dataclass
class Trained:
    """A network trained by train_network: the learner with the best weights loaded, and what calibration needs of it."""

    learn: Learner
    best_epoch: int
    best_loss: float
    data: TrainingData
    learnt: Learnt
    scored: Embedded | None  # the outputs of the last epoch the training-time MAP@5 scored


def train_network(
    cfg: FitConfig,
    spec: InputSpec,
    resume: bool = False,
    distributed: bool = False,
    more_files: dict | None = None,
    every_photo: bool = False,
    start_from: Trained | None = None,
    settings: FitConfig | None = None,
    epochs: range | None = None,
) -> Trained:
    """Train one network as `cfg` says, checkpointing to its run folder.

    `more_files` (path -> JSON content) are written first when the first epoch ends (an ensemble's own
    status and config). With `every_photo`, the held-out photos train too and no validation MAP@5 is
    scored (there is nothing held out to score). `start_from`: a trained network to go on from (fit
    --fold-in), its class centres following their ids. `settings`: what the run folder records, where
    `cfg` is only how this stage trains. `epochs`: the epochs of cfg.epochs' schedule this stage trains
    (fit --fold-in-within trains them in two stages), by default all.
    """
    epochs = epochs or range(cfg.epochs)
    set_seed(cfg.seed, reproducible=True)
    data = rank0_first(training_data, cfg, spec, every_photo)  # rank 0 builds the decoded-image cache, the others then read it
    learnt = Learnt(vocab=list(data.vocab), train_digest=file_digest(Path(cfg.data) / "train.csv"))
    run = Run(cfg.run_dir)
    learn = make_learner(cfg, spec, data, metrics=not every_photo, until=epochs.stop)
    if start_from is not None:
        carry_over(unwrap(learn.model), start_from, data, cfg, spec)

    start_epoch, previous, best = epochs.start, None, (float("inf"), -1)
    if resume:
        state = load_saved(run / Run.RESUME, "resume state")
        unwrap(learn.model).load_state_dict(state["model"])
        start_epoch, best = state["epoch"] + 1, (state["best_loss"], state["best_epoch"])
        if (run / Run.HISTORY).exists():
            previous = pd.read_csv(run / Run.HISTORY)
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

    history = History(run / Run.HISTORY, run / Run.CURVES, previous)
    files = {} if resume else {**(more_files or {}), **run.start_files(asdict(settings or cfg), learnt, spec)}
    checkpoints = Checkpoints(run / Run.WEIGHTS, run / Run.RESUME, *best)
    cbs = [StopOnNonFiniteLoss(cfg.lr), StartRunFolder(files), history, checkpoints]
    if epochs.stop < cfg.epochs:
        cbs.append(EndAfterEpoch(epochs.stop))
    if start_epoch < epochs.stop:
        # SyncBatchNorm runs on GPUs only; on CPUs each process keeps its own batch statistics.
        cuda = torch.cuda.is_available()
        context = learn.distrib_ctx(sync_bn=cuda, cpu=not cuda) if distributed else contextlib.nullcontext()
        with context:
            if cfg.schedule == "step":
                schedule = StepSchedule(cfg.lr, cfg.milestones, cfg.gamma, cfg.head_lr_mult)
                learn.fit(cfg.epochs, lr=cfg.lr, cbs=[schedule, *cbs], reset_opt=False, start_epoch=start_epoch)
            else:
                learn.fit_one_cycle(cfg.epochs, lr_max=body_and_head(cfg.lr, cfg.head_lr_mult), cbs=cbs, start_epoch=start_epoch)
        if distributed:
            console.print(f"rank {rank_distrib()}: trained {history.train_batches} batches")

    barrier()
    unwrap(learn.model).load_state_dict(load_saved(run / Run.WEIGHTS, "model"))
    scoring = next((cb for cb in learn.cbs if isinstance(cb, ValidationMAP)), None)
    return Trained(learn, checkpoints.best_epoch, checkpoints.best_loss, data, learnt, scoring.embedded if scoring else None)


def fit_ensemble(cfg: FitConfig, spec: InputSpec, resume: bool = False) -> dict:
    """Train `cfg.members` networks in turn (seeds seed, seed + 1, ...) on the same split, then calibrate and catalogue them as one model.

    Each member is an ordinary run in RUN/members/I/, so an interrupted ensemble resumes where it
    stopped: finished members are loaded, the interrupted one continues from its last epoch.
    """
    run = Run(cfg.run_dir)
    networks, best_epochs, losses = [], [], []
    for i in range(cfg.members):
        member = member_config(cfg, i)
        console.print(f"member {i + 1} of {cfg.members} (seed {member.seed})")
        own = run.start_files(asdict(cfg)) if i == 0 and not resume else None
        t = train_network(member, spec, resume and is_member_resumable(member), more_files=own)
        Run(member.run_dir).mark_finished()
        networks.append(unwrap(t.learn.model))
        best_epochs.append(t.best_epoch)
        losses.append(t.best_loss)
    model = Ensemble(networks, get_method(cfg.method).combine)  # one process only: fit refuses --members with --distributed
    history = pd.concat([pd.read_csv(run.member(i) / Run.HISTORY).assign(member=i) for i in range(cfg.members)])
    write_csv(history, run / Run.HISTORY)
    plot_curves(history, run / Run.CURVES)
    for path, content in run.start_files(asdict(cfg), t.learnt, spec).items():
        write_json(content, path)
    save_torch(model.state_dict(), run / Run.WEIGHTS)
    return finish(run, cfg, spec, t.learnt, model, t.data, best_epochs, sum(losses) / len(losses))


# fit --fold-in: the first network goes on at this fraction of its peak learning rate, in a one-cycle
# of its own; from the start at the full rate it would first forget much of what it learnt.
FOLD_IN_LR = 0.1


def fit_refit(cfg: FitConfig, spec: InputSpec, resume: bool = False) -> dict:
    """Train on the training photos (RUN/validation/, an ordinary calibrated run), then on every labelled photo: a new network with the same settings (--refit), or the first one for cfg.fold_in epochs more (--fold-in) or for the last cfg.fold_in of its schedule's epochs (--fold-in-within, where the first run stops that many early).

    The second network is the model: it learns from the held-out photos too (most whales have one or
    two), and keeps the first one's new_whale threshold and validation figures, the only honest ones.
    With `resume`, each run continues where it stopped (a finished first run is loaded as it is).
    """
    first = validation_config(cfg)
    # --fold-in-within: the last fold_in epochs of the one schedule train on every photo, the first ones calibrate
    within = cfg.fold_in_within and cfg.fold_in > 0
    held_out = range(cfg.epochs - cfg.fold_in) if within else range(cfg.epochs)
    console.print(f"refit 1 of 2: {len(held_out)} epochs on the training photos, to calibrate the new_whale threshold")
    own = None if resume else Run(cfg.run_dir).start_files(asdict(cfg))
    t = train_network(first, spec, resume and is_member_resumable(first), more_files=own, epochs=held_out)
    calibrated = finish(Run(first.run_dir), first, spec, t.learnt, unwrap(t.learn.model), t.data, t.best_epoch, t.best_loss, t.scored, catalogue=False)
    calibrated.pop("run_dir")
    second = (Run(cfg.run_dir) / Run.RESUME).is_file()  # the second run had begun
    if within:
        console.print(f"refit 2 of 2: the same network on every labelled photo, the schedule's last {cfg.fold_in} epoch{'s' if cfg.fold_in > 1 else ''}")
        stage = replace(cfg, freeze_epochs=0)
        t = train_network(stage, spec, resume and second, every_photo=True, start_from=t, settings=cfg, epochs=range(held_out.stop, cfg.epochs))
    elif cfg.fold_in:
        console.print(f"refit 2 of 2: the same network on every labelled photo, {cfg.fold_in} epoch{'s' if cfg.fold_in > 1 else ''} more")
        stage = replace(cfg, epochs=cfg.fold_in, lr=cfg.lr * FOLD_IN_LR, freeze_epochs=0)
        t = train_network(stage, spec, resume and second, every_photo=True, start_from=t, settings=cfg)
    else:
        console.print(f"refit 2 of 2: {cfg.epochs} epochs on every labelled photo")
        t = train_network(cfg, spec, resume and second, every_photo=True)
    return finish(Run(cfg.run_dir), cfg, spec, t.learnt, unwrap(t.learn.model), t.data, t.best_epoch, t.best_loss, calibrated=calibrated)


def carry_over(network: nn.Module, trained: Trained, data: TrainingData, cfg: FitConfig, spec: InputSpec) -> None:
    """Start `network` (for `data`'s classes) from `trained`'s weights, each id keeping what it learnt there (see Method.carry_over_classes)."""
    method, trained_network = get_method(cfg.method), unwrap(trained.learn.model)
    old = {name: i for i, name in enumerate(trained.learnt.vocab)}
    index = torch.tensor([old.get(name, -1) for name in data.vocab])

    def new_outputs() -> torch.Tensor:
        rows = data.items[~data.items.is_valid & data.items.label.isin([n for n, i in zip(data.vocab, index.tolist()) if i < 0])]
        # one view, so each branch's block of the output is that branch's: test-time views lay their blocks side by side
        plain = replace(spec, scales=(1.0,), mirror_view=False)
        outputs = Embedded(method, trained_network, plain, trained.data, cfg.bs)(rows.Image).float()
        position = {name: i for i, name in enumerate(data.vocab)}
        return torch.zeros(len(data.vocab), outputs.shape[1]).index_add_(0, torch.tensor([position[label] for label in rows.label]), outputs)

    own = network.state_dict()
    network.load_state_dict({k: v for k, v in trained_network.state_dict().items() if k in own and v.shape == own[k].shape}, strict=False)
    method.carry_over_classes(network, trained_network, index, new_outputs)


# Settings that do not change what a member learns: where it is, how fast it loads, and what inference does after.
MEMBER_NEUTRAL = RESUMABLE_CHANGES | {"tta_scales", "mirror_view", "catalogue_dims", "new_whale_share"}


def is_member_resumable(member: FitConfig) -> bool:
    """Whether an ensemble member's folder holds an interrupted or finished run of exactly these settings (not one left by an earlier run)."""
    run = Run(member.run_dir)
    if not (run / Run.RESUME).is_file():
        return False
    try:
        saved = Run.open(run.path, finished=False).settings
    except WhalefastError:
        return False
    return all(getattr(saved, k) == getattr(member, k) for k in FitConfig.__dataclass_fields__ if k not in MEMBER_NEUTRAL)


def interruption_note(cfg: FitConfig, since: float) -> str:
    """What to tell a user who stopped a fit with Ctrl-C at `since` (a time.time()): how to continue, or that nothing was saved."""
    run = Run(cfg.run_dir)
    saved = [run / Run.RESUME, *run.path.glob(f"members/*/{Run.RESUME}")]
    if any(last.is_file() and last.stat().st_mtime >= since for last in saved):
        return f"interrupted; continue with: whalefast fit --name {cfg.name} --models-dir {cfg.models_dir} --resume"
    return "interrupted before the first epoch ended; nothing was saved"


def lr_find(cfg: FitConfig) -> dict:
    """fastai's learning-rate finder on `cfg`'s data and model; saves lr_find.png; the weights are left as they were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fastai.callback.schedule import minimum, slide, steep, valley

    check_config(cfg)
    reuse_freed_memory()
    set_seed(cfg.seed, reproducible=True)
    spec = resolve_input_spec(cfg)
    learn = make_learner(cfg, spec, training_data(cfg, spec), metrics=False)
    learn.unfreeze()
    freeze_stages(unwrap(learn.model), cfg.frozen_stages)
    before = {k: v.clone() for k, v in unwrap(learn.model).state_dict().items()}
    suggestions = learn.lr_find(suggest_funcs=(minimum, steep, valley, slide), show_plot=True)
    unchanged = all(torch.equal(before[k], v) for k, v in unwrap(learn.model).state_dict().items())
    path = Run(cfg.run_dir) / Run.LR_FIND
    with atomic_path(path) as tmp:
        plt.gcf().savefig(tmp, format="png", dpi=90)
    plt.close("all")
    return {"suggestions": {k: float(v) for k, v in suggestions._asdict().items()}, "plot": str(path), "weights_unchanged": unchanged}
