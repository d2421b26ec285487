"""Data-parallel training through fastai's distrib_ctx (Hugging Face Accelerate): one process per device."""

from __future__ import annotations

import os

import torch
from fastai.distributed import DistributedDL
from fastai.torch_core import num_distrib, rank_distrib
from fastcore.basics import patch
from torch import LongTensor

from whalefast.core.errors import WhalefastError


@patch
def _broadcast(self: DistributedDL, t, rank):
    """Broadcast the sample order from `rank`; on the CPU (gloo) it stays on the CPU, fastai assumes CUDA (nccl)."""
    t = LongTensor(t)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def is_main_process() -> bool:
    """Whether this is rank 0, the process that writes files."""
    return rank_distrib() == 0


def launched_distributed() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started several processes."""
    return num_distrib() > 1


def init_distributed() -> None:
    """Join the process group the launcher set up (nccl on GPUs, gloo on CPUs)."""
    if not launched_distributed():
        raise WhalefastError("--distributed needs several processes: start with `accelerate launch -m whalefast fit ...` or torchrun")
    if not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # joins the launcher's process group; gloo on CPUs
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank_distrib())))


def barrier() -> None:
    """Wait for every process (rank 0 writes what the others read)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank0_first(fn, *args, **kwargs):
    """Run `fn` on rank 0 first (it builds caches and folders), then on the other ranks."""
    if rank_distrib() == 0:
        result = fn(*args, **kwargs)
        barrier()
    else:
        barrier()
        result = fn(*args, **kwargs)
    return result
