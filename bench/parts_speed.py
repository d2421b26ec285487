"""Training speed of the flukes recipe with and without part embeddings (fit --parts), side by side.

Each setting trains efficientnet-lite0 (channels last) with the recipe's ArcFace head and loss, the
whole feature map alone or with its strips, on random tensors and random ids: forward, backward and
an Adam step per batch, no data loading. Settings take turns for `--rounds` rounds and the median of
each is reported, so a slow moment of the machine hits all of them alike.

    python bench/parts_speed.py                         # CPU, about 2 minutes on 2 cores
"""

from __future__ import annotations

import torch
from interleaved import median_rates, timing_arguments, training_step

from whalefast.core.images import as_size
from whalefast.nets.heads import EmbeddingHead
from whalefast.nets.losses import ArcFaceCriterion
from whalefast.nets.registry import build_model, get_arch

ARCH = "efficientnet-lite0"


def make_step(parts: int, x: torch.Tensor, ids: int):
    """One training step with `parts` strips, as a function of nothing."""
    head = EmbeddingHead(get_arch(ARCH).features, 512, ids, margin=0.4, scale=30.0, parts=parts)
    model = build_model(ARCH, ids, head=head).to(memory_format=torch.channels_last)
    loss = ArcFaceCriterion(head)
    target = torch.randint(0, ids, (len(x),), generator=torch.Generator().manual_seed(0))
    return training_step(model, lambda out: loss(out, target), x.contiguous(memory_format=torch.channels_last))


def main() -> None:
    parser = timing_arguments(__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1305, help="ArcFace classes (the real flukes' training ids)")
    parser.add_argument("--parts", default="0,2", help="comma-separated --parts values to compare; the first is the baseline")
    args = parser.parse_args()
    h, w = as_size(args.size)
    torch.manual_seed(0)
    x = torch.randn(args.bs, 3, h, w)
    settings = [int(p) for p in args.parts.split(",")]
    rates = median_rates({p: make_step(p, x, args.ids) for p in settings}, args.bs, args.steps, args.rounds)
    base = rates[settings[0]]
    print(f"{ARCH} training images/s at {h}x{w}, batch {args.bs}, {args.ids} ids, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'parts':>6}{'branches':>10}{'img/s':>9}{'ratio':>8}")
    for p, rate in rates.items():
        print(f"{p:>6}{1 + 2 * p:>10}{rate:>9.1f}{rate / base:>8.2f}")


if __name__ == "__main__":
    main()
