"""Side-by-side timing for the speed benches: settings take turns, so a slow moment of the machine hits all of them alike."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable

import torch


def median_rates(steps: dict[Hashable, Callable[[], None]], images_per_step: int, steps_per_round: int, rounds: int) -> dict[Hashable, float]:
    """Per setting, the median over `rounds` of images/s for `steps_per_round` calls of its step, after one warm-up call each."""
    for step in steps.values():  # warm up: first calls allocate and pick kernels
        step()
    rates = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            rates[key].append(steps_per_round * images_per_step / (time.perf_counter() - start))
    return {key: statistics.median(r) for key, r in rates.items()}


def training_step(model: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """One training step of `model` on the batch `x` (forward, `loss` of its output, backward, an Adam step), as a function of nothing."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step():
        opt.zero_grad()
        loss(model(x)).backward()
        opt.step()

    return step


def timing_arguments(description: str) -> argparse.ArgumentParser:
    """The options every training-speed bench takes: the recipe's input size and batch, and how long to time each setting."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", default="112x224", help="HEIGHTxWIDTH (the flukes recipe's)")
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed batches per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    return parser
