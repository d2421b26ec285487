"""The reference's step learning-rate schedule as a fastai callback."""

from __future__ import annotations

from fastai.callback.core import Callback
from fastcore.basics import store_attr


def body_and_head(lr: float, head_lr_mult: float = 1.0):
    """fastai's per-group learning rates: `lr` for the body, `lr * head_lr_mult` for the head."""
    return lr if head_lr_mult == 1 else slice(lr, lr * head_lr_mult)


class StepSchedule(Callback):
    """Set lr = base_lr * gamma ** (milestones passed) at the start of every epoch (torch's MultiStepLR).

    With `head_lr_mult`, the head's parameter group gets that many times the body's lr.
    """

    order = 5

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
