"""Training speed of the flukes recipe's backbone: memory order, frozen stages and efficientnet-lite size, side by side.

Each setting trains the backbone with the recipe's embedding head shape (a linear map to 512) on
random tensors: forward, backward and an Adam step per batch, no data loading. The box model (96x96,
batch norm frozen) is timed in the same turns, in both memory orders. Settings take turns for
`--rounds` rounds and the median of each is reported, so a slow moment of the machine hits all of
them alike. `yardstick()` is one row of it, the machine's speed that bench/real_flukes.py records.

    python bench/backbone_speed.py                      # CPU, about 2 minutes on 2 cores
    python bench/backbone_speed.py --size 112x224 --bs 32 --steps 4 --rounds 3
"""

from __future__ import annotations

import torch
from interleaved import median_rates, timing_arguments, training_step
from torch import nn

from whalefast.core.allocator import reuse_freed_memory
from whalefast.core.images import as_size
from whalefast.nets.registry import build_model, freeze_stages, get_arch
from whalefast.runs.config import BoxConfig

SETTINGS = [
    # (arch, frozen stages, channels last)
    ("efficientnet-lite0", 0, False),
    ("efficientnet-lite0", 0, True),
    ("efficientnet-lite0", 1, True),
    ("efficientnet-lite0", 2, False),
    ("efficientnet-lite0", 2, True),
    ("efficientnet-lite0", 3, True),
    ("efficientnet-lite1", 2, True),
    ("efficientnet-lite2", 2, True),
]
BOX_SIZE = BoxConfig.size  # the box model's square input


def make_step(arch: str, frozen: int, channels_last: bool, x: torch.Tensor, outputs: int = 512, frozen_batch_norm: bool = False):
    """One training step of `arch` with `frozen` stages frozen and a linear map to `outputs`, as a function of nothing.

    `frozen_batch_norm` keeps batch norm in eval mode, as fit_boxes trains the box model.
    """
    model = build_model(arch, 1, head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(get_arch(arch).features, outputs)))
    freeze_stages(model, frozen)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    step = training_step(model, lambda out: out.pow(2).mean(), x)
    if frozen_batch_norm:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    return step


def yardstick(rounds: int = 3) -> float:
    """This machine's speed now: training images/s of the flukes recipe's backbone (lite0, channels last, 112x224, batch 32)."""
    reuse_freed_memory()  # as fit does: without it a process that has not fitted yet trains up to 1.25x slower
    torch.manual_seed(0)
    step = make_step("efficientnet-lite0", 0, True, torch.randn(32, 3, 112, 224))
    return median_rates({"yardstick": step}, 32, 2, rounds)["yardstick"]


def main() -> None:
    args = timing_arguments(__doc__.splitlines()[0]).parse_args()
    h, w = as_size(args.size)
    torch.manual_seed(0)
    x = torch.randn(args.bs, 3, h, w)
    box_x = torch.randn(args.bs, 3, BOX_SIZE, BOX_SIZE)
    box_steps = {("box", cl): make_step("efficientnet-lite0", 0, cl, box_x, outputs=4, frozen_batch_norm=True) for cl in (False, True)}
    steps = {**{s: make_step(*s, x) for s in SETTINGS}, **box_steps}
    rates = median_rates(steps, args.bs, args.steps, args.rounds)
    box_rates = {cl: rates.pop(("box", cl)) for cl in (False, True)}
    base = rates[SETTINGS[0]]
    print(f"training images/s at {h}x{w}, batch {args.bs}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'arch':<20}{'frozen stages':>14}{'channels last':>15}{'img/s':>9}{'ratio':>8}")
    for (arch, frozen, cl), rate in rates.items():
        print(f"{arch:<20}{frozen:>14}{'yes' if cl else 'no':>15}{rate:>9.1f}{rate / base:>8.2f}")
    print(f"the box model (efficientnet-lite0, {BOX_SIZE}x{BOX_SIZE}, batch norm frozen as fit_boxes trains it), in the same turns")
    print(f"{'channels last':>15}{'img/s':>9}{'ratio':>8}")
    for cl, rate in box_rates.items():
        print(f"{'yes' if cl else 'no':>15}{rate:>9.1f}{rate / box_rates[False]:>8.2f}")


if __name__ == "__main__":
    main()
