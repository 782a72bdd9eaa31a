"""Multi-process training under `torchrun`: process groups, DDP and FSDP2 wrapping, collectives.

The model code knows nothing of this: parallelism is applied from outside (as torchtitan does).
gloo on CPU, NCCL on GPU. Checkpoints hold full (unsharded) tensors gathered to rank 0, so a run
can resume on any world size, with or without FSDP.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DynaformerError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise DynaformerError("distributed: WORLD_SIZE is set but RANK/MASTER_ADDR are not (launch with torchrun)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(int(os.environ["RANK"]), world, local,
                    torch.device("cuda", local) if device.type == "cuda" else torch.device("cpu"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return info


def wrap_model(model: nn.Module, mode: str, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP: replicate and all-reduce gradients. FSDP2: shard every block, then the root."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise DynaformerError(f"train.parallel: unknown mode {mode!r} (ddp or fsdp)")


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any (e.g. a stop signal seen by one rank)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # Free what still holds the group (DCP and DDP state) while every rank is here: tearing gloo down
        # with such objects alive, after the other rank has gone, hung the process at exit now and then.
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
