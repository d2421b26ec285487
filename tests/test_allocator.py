"""reuse_freed_memory: freed large tensors are reused instead of being mapped and faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys
import torch
from whalefast.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
for _ in range(5):  # 64 MB at a time, until the heap has grown to hold it (glibc takes three rounds)
    torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20).sum()  # allocated, written, freed
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_page_faults():
    default, reuse = faults("default"), faults("reuse")
    assert reuse["applied"]
    assert default["faults"] > 10 * 16_000 * 0.9  # every 64 MB tensor mapped afresh: 16 384 pages each
    assert reuse["faults"] < 1_000
