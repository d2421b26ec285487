"""Side-by-side timing for the speed benches: settings take turns, so a slow moment of the machine hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable


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
