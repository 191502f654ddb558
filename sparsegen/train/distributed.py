"""Data-parallel training across processes (``torchrun``) with DistributedDataParallel.

Launch: ``torchrun --nproc_per_node=K -m sparsegen train ...`` (add ``--nnodes``/``--rdzv-*`` for several
machines). Each process (rank) owns the training examples ``rank, rank + K, rank + 2K, ...`` and the
matching shard of the persistent latent bank; it runs the Langevin inference of Algorithm 1 on its own
examples only. The critic and generator gradients are averaged across ranks by DDP. Checkpoints hold the
whole bank (gathered from every rank), so a run can resume with any number of processes.
Backend: NCCL on CUDA devices, gloo on CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``; a single process by default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None  # None: not distributed

    @property
    def enabled(self) -> bool:
        """True when running under an initialised process group."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> Tensor:
        """Indices (``int64``) of the ``n`` examples this rank owns: ``rank, rank + world_size, ...``."""
        return torch.arange(self.rank, n, self.world_size, dtype=torch.long)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when distributed, else ``module`` itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def mean(self, t: Tensor) -> Tensor:
        """Average of ``t`` over ranks (a copy; ``t`` unchanged)."""
        if not self.enabled:
            return t.clone()
        x = t.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(x)
        return (x / self.world_size).to(t.device)

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (pickled), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: str = "cpu", backend: Optional[str] = None) -> DistContext:
    """Join the process group that torchrun set up (if any) and return this process's :class:`DistContext`.

    ``device``: ``"cpu"`` or ``"cuda"``; under torchrun a CUDA run uses ``cuda:<LOCAL_RANK>``. Without
    torchrun's environment this is a single process on ``device``.
    """
    if not launched_by_torchrun():
        return DistContext(device=torch.device(device))
    cuda = device.startswith("cuda")
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                       backend=backend)


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
