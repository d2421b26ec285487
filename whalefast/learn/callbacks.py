"""The trainer's callbacks, each with one job: stop a diverging run, start the run folder, write history, keep checkpoints, end a fit early, step the lr.

They read the epoch's figures by name from fastai's Recorder, and run after it (Recorder.order) in the
order listed here, each placed after the one it follows (`run_after`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.learner import Recorder
from fastai.metrics import ValueMetric
from fastcore.basics import store_attr

from whalefast.core.console import console
from whalefast.core.errors import WhalefastError
from whalefast.core.files import save_torch, write_csv, write_json
from whalefast.core.spec import InputSpec
from whalefast.data.loaders import TrainingData
from whalefast.learn.curves import plot_curves
from whalefast.learn.distributed import is_main_process
from whalefast.learn.state import optimizer_state, rng_state
from whalefast.nets.forward import unwrap
from whalefast.nets.heads import pooling_exponents
from whalefast.runs.methods import Embedded, Method


def logged(recorder: Recorder) -> dict:
    """The figures the Recorder logged for this epoch, by name (train_loss, valid_loss, map5, top1, ...)."""
    return dict(zip(recorder.metric_names, recorder.log))


def body_and_head(lr: float, head_lr_mult: float = 1.0):
    """fastai's per-group learning rates: `lr` for the body, `lr * head_lr_mult` for the head."""
    return lr if head_lr_mult == 1 else slice(lr, lr * head_lr_mult)


class StepSchedule(Callback):
    """Set lr = base_lr * gamma ** (milestones passed) at the start of every epoch (torch's MultiStepLR).

    With `head_lr_mult`, the head's parameter group gets that many times the body's lr.
    """

    order = Recorder.order - 45

    def __init__(self, base_lr: float = 0.01, milestones: tuple[int, ...] = (16, 19), gamma: float = 0.1, head_lr_mult: float = 1.0):
        store_attr()
        self.lrs: list[float] = []

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def before_fit(self):
        self.lrs = []

    def before_epoch(self):
        lr = self.lr_at(self.epoch)
        self.opt.set_hyper("lr", body_and_head(lr, self.head_lr_mult))
        self.lrs.append(lr)


class UndecayedPoolingExponents(Callback):
    """Leave GeM's exponents out of weight decay, as fastai leaves out norm and bias parameters when wd_bn_bias is False.

    Decay pulls a parameter towards 0; for a pooling exponent that is not a simpler model but another
    pooling: the flukes recipe's fits (decoupled wd 1.0) ended with exponents of 0.53-0.68, from 3.
    """

    def before_fit(self):
        for p in pooling_exponents(self.learn.model):
            self.learn.opt.state[p]["do_wd"] = False


class AfterEachEpoch(Callback):
    """A callback that acts once an epoch has run (not one that resuming skipped): it defines `epoch_done`."""

    def before_epoch(self):
        self.skipped = False

    def after_cancel_epoch(self):
        self.skipped = True

    def after_epoch(self):
        if not self.skipped:
            self.epoch_done()

    def epoch_done(self):
        raise NotImplementedError


class StopOnNonFiniteLoss(AfterEachEpoch):
    """Stop with a one-line error naming the epoch when the loss stops being a finite number (a diverging run)."""

    run_after, order = Recorder, Recorder.order + 5  # once the epoch is logged, before anything is saved

    def __init__(self, lr: float):
        self.lr = lr

    def before_epoch(self):
        super().before_epoch()
        self.bad = None

    def after_loss(self):
        # Accumulated on the device and read once per epoch: no host sync per batch.
        bad = ~torch.isfinite(self.learn.loss.detach()).all()
        self.bad = bad if self.bad is None else self.bad | bad

    def epoch_done(self):
        if self.bad is not None and bool(self.bad):
            raise WhalefastError(
                f"training diverged in epoch {self.epoch}: the loss is no longer a finite number; try a lower --lr (this run used {self.lr:g})"
            )


class StartRunFolder(AfterEachEpoch):
    """When the first epoch ends, write the run folder's first files (Run.start_files: status "training" first).

    Until then nothing is written, so a run that fails before its first epoch ends leaves nothing
    behind, and an earlier run of the same name stays whole; from then on the folder says it holds a
    run in training until calibration marks it finished. `files` maps a path to its JSON content.
    """

    run_after, order = StopOnNonFiniteLoss, StopOnNonFiniteLoss.order + 5

    def __init__(self, files: dict[Path, dict]):
        self.files = dict(files)

    def epoch_done(self):
        if is_main_process():
            for path, content in self.files.items():
                write_json(content, path)
        self.files = {}


def _number(value) -> float:
    """A logged figure as a float; NaN where the epoch has none (see fit --map-every)."""
    return float("nan") if value is None else float(value)


class History(AfterEachEpoch):
    """Write history.csv after every epoch (train/valid loss, MAP@5, top-1, lr, seconds) and redraw curves.png."""

    run_after, order = StartRunFolder, StartRunFolder.order + 5

    def __init__(self, history: Path, curves: Path, previous: pd.DataFrame | None = None):
        self.history, self.curves = Path(history), Path(curves)
        self.rows = [] if previous is None else previous.to_dict("records")

    def before_fit(self):
        self.train_batches = 0

    def after_batch(self):
        self.train_batches += int(self.training)

    def before_epoch(self):
        super().before_epoch()
        self.start = time.time()

    def epoch_done(self):
        values = logged(self.recorder)
        if "valid_loss" not in values:
            return
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
            write_csv(history, self.history)
            plot_curves(history, self.curves)


class Checkpoints(AfterEachEpoch):
    """Keep the weights of the epoch with the best validation loss and, every epoch, the state to resume from."""

    run_after, order = History, History.order + 1

    def __init__(self, weights: Path, resume: Path | None = None, best_loss: float = float("inf"), best_epoch: int = -1):
        self.weights, self.resume, self.best_loss, self.best_epoch = Path(weights), resume, best_loss, best_epoch

    def epoch_done(self):
        valid_loss = float(logged(self.recorder).get("valid_loss", float("inf")))
        main = is_main_process()
        if valid_loss < self.best_loss or self.best_epoch < 0:
            self.best_loss, self.best_epoch = valid_loss, self.epoch
            if main:
                save_torch(unwrap(self.model).state_dict(), self.weights)
                console.print(f"better model at epoch {self.epoch}: valid_loss {valid_loss:.4f}")
        if main and self.resume is not None:
            state = {
                "model": unwrap(self.model).state_dict(),
                "opt": optimizer_state(self.opt),
                "epoch": self.epoch,
                "best_loss": self.best_loss,
                "best_epoch": self.best_epoch,
                "rng": rng_state(self.dls),
            }
            save_torch(state, self.resume)


class EndAfterEpoch(Callback):
    """End the fit once `epochs` epochs (counted from 1) are done, its schedule still laid out over all of the fit's epochs."""

    run_after, order = Checkpoints, Checkpoints.order + 1  # once the epoch is logged and saved

    def __init__(self, epochs: int):
        self.epochs = epochs

    def after_epoch(self):
        if self.epoch + 1 >= self.epochs:
            raise CancelFitException


class ValidationMAP(Callback):
    """Validation MAP@5 and top-1, ranked as submit ranks, every `every` epochs and at the last: the `map5` and `top1` metrics.

    Scored by the method's own validation path with the run's views, as calibration scores it. Between
    those epochs the metrics are empty: embedding every training photo takes 6-12 s of a 50-80 s
    epoch on 2 CPU cores (the flukes recipe).
    """

    order = Recorder.order - 60  # before validation starts, so the Recorder logs the values this epoch

    def __init__(self, method: Method, spec: InputSpec, data: TrainingData, bs: int, every: int = 1, catalogue_dims: int = 0, last: int | None = None):
        self.method, self.spec, self.data, self.bs, self.every, self.catalogue_dims = method, spec, data, bs, every, catalogue_dims
        self.last = last  # the epochs the fit trains, where an EndAfterEpoch ends it before its n_epoch
        self.map5 = self.top1 = None
        self.embedded: Embedded | None = None  # the last scored epoch's outputs: calibration reuses them when that epoch's weights are the best

    def before_validate(self):
        self.map5 = self.top1 = None
        if (self.epoch + 1) % self.every and self.epoch + 1 < (self.last or self.n_epoch):
            return
        self.embedded = Embedded(self.method, unwrap(self.model), self.spec, self.data, self.bs, epoch=self.epoch)
        known = self.method.known(self.embedded, validation_too=False)
        projection = self.method.projection(known, self.catalogue_dims)
        _, self.map5, self.top1 = self.method.score_validation(self.embedded, known, projection)

    def metrics(self) -> list[ValueMetric]:
        return [ValueMetric(lambda: self.map5, "map5"), ValueMetric(lambda: self.top1, "top1")]


STAGES = ("data", "forward", "loss", "backward", "optimiser", "callbacks")


class StageTimes:
    """Seconds of each training batch spent per stage (STAGES), from a pair of callbacks that run first and last at every event.

    data is the wait for the next batch (decoded cache, augmentation, transfer; for an epoch's first
    batch, from the start of its training phase); forward, loss, backward and optimiser (step and
    zero_grad) are fastai's own steps; callbacks is what every other callback spends at those events.
    The first `skip` batches of each fit are left out (they allocate and pick kernels). On CUDA each
    mark synchronises, so the stages add up to the batches' wall time at a small cost to it.
    `callbacks()` goes to Learner.fit(cbs=...).
    """

    MARKS = (
        "before_fit",
        "before_train",
        "before_batch",
        "after_pred",
        "after_loss",
        "before_backward",
        "after_backward",
        "before_step",
        "after_step",
        "after_batch",
    )
    # Between consecutive marks (last callback of one event -> first of the next), the stage that runs; within an event: "callbacks".
    BETWEEN = {
        "after_pred": "forward",
        "after_loss": "loss",
        "before_backward": "callbacks",
        "after_backward": "backward",
        "before_step": "callbacks",
        "after_step": "optimiser",
        "after_batch": "optimiser",
    }

    def __init__(self, skip: int = 1):
        self.skip, self.batches, self.counted, self.in_fit, self.counting = skip, 0, 0, 0, False
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.last = 0.0

    def callbacks(self) -> list[Callback]:
        return [_StageMark(self, first=True), _StageMark(self, first=False)]

    def mark(self, event: str, first: bool) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if event == "before_fit":
            self.in_fit, self.counting = 0, False
        elif event == "before_train":
            self.last = now  # an epoch's data wait starts once its training phase has begun (not during the last validation)
        elif event == "before_batch" and first:
            self.batches, self.in_fit = self.batches + 1, self.in_fit + 1
            self.counting = self.in_fit > self.skip
            if self.counting:
                self.counted += 1
                self.seconds["data"] += now - self.last
        elif self.counting:
            self.seconds["callbacks" if not first else self.BETWEEN[event]] += now - self.last
        self.last = now

    def per_batch(self) -> dict[str, float]:
        """Mean seconds per counted training batch, by stage."""
        return {stage: seconds / max(self.counted, 1) for stage, seconds in self.seconds.items()}


class _StageMark(Callback):
    """One end of StageTimes: marks every training event first (order -1000) or last (order 1000)."""

    def __init__(self, times: StageTimes, first: bool):
        self.times, self.first, self.order = times, first, -1000 if first else 1000
        for event in StageTimes.MARKS:
            setattr(self, event, self._marker(event))

    def _marker(self, event: str):
        def mark():
            if self.training or event == "before_fit":
                self.times.mark(event, self.first)

        return mark
