"""reuse_freed_memory: freed large tensors are reused instead of being mapped and faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ROUNDS = 30
CHILD = """
import json, resource, sys
import torch
from whalefast.core.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()  # 64 MB allocated, written, freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def faults_per_round(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, setting, str(ROUNDS)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_page_faults():
    default, reuse = faults_per_round("default"), faults_per_round("reuse")
    assert not default["applied"] and reuse["applied"]
    assert min(default["faults"]) > 16_000  # every 64 MB tensor mapped afresh: 16 384 pages each
    # The heap grows over the first few rounds (2-8 here, varying with address-space layout), then is reused.
    fault_free = sum(f < 100 for f in reuse["faults"])
    assert fault_free >= 20, reuse["faults"]
