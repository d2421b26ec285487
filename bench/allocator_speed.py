"""Training speed with glibc's default allocator settings and with whalefast's `reuse_freed_memory`, side by side.

malloc settings hold for a whole process, so each setting trains in its own child process:
efficientnet-lite0 as the flukes recipe trains it (112x224, batch 32, 2 frozen stages, channels
last, Adam) on random tensors. The two settings take turns for `--rounds` rounds; the median of
each is reported, with page faults per step and peak memory.

    python bench/allocator_speed.py                   # CPU, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import torch
from torch import nn
from whalefast.core.allocator import reuse_freed_memory
from whalefast.nets.registry import build_model, freeze_stages

reuse, steps, h, w, bs = sys.argv[1] == "reuse", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
applied = reuse_freed_memory() if reuse else False
torch.manual_seed(0)
model = build_model("efficientnet-lite0", 1, head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 512)))
freeze_stages(model, 2)
model = model.to(memory_format=torch.channels_last).train()
x = torch.randn(bs, 3, h, w).contiguous(memory_format=torch.channels_last)
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

def step():
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()

for _ in range(2):
    step()
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "img_s": steps * bs / seconds, "faults": (after.ru_minflt - before.ru_minflt) / steps, "rss_gb": after.ru_maxrss / 1e6}))
"""


def measure(setting: str, steps: int, h: int, w: int, bs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, setting, str(steps), str(h), str(w), str(bs)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="112x224", help="HEIGHTxWIDTH (the flukes recipe's)")
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per process")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    runs = {"default": [], "reuse": []}
    for _ in range(args.rounds):
        for setting in runs:
            runs[setting].append(measure(setting, args.steps, h, w, args.bs))
    print(f"efficientnet-lite0 training at {h}x{w}, batch {args.bs}, 2 frozen stages, channels last; median of {args.rounds} processes each")
    print(f"{'allocator':<12}{'img/s':>8}{'page faults/step':>18}{'peak RSS (GB)':>15}")
    medians = {}
    for setting, results in runs.items():
        medians[setting] = statistics.median(r["img_s"] for r in results)
        faults = statistics.median(r["faults"] for r in results)
        rss = statistics.median(r["rss_gb"] for r in results)
        print(f"{setting:<12}{medians[setting]:>8.1f}{faults:>18.0f}{rss:>15.2f}")
    if not all(r["applied"] for r in runs["reuse"]):
        print("reuse_freed_memory did not apply here (not glibc): both rows ran with the default allocator")
    print(f"ratio reuse/default: {medians['reuse'] / medians['default']:.2f}")


if __name__ == "__main__":
    main()
