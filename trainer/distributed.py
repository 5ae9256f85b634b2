"""Process group, device and model wrapping for torchrun / ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
the trainer reads those and needs nothing else from them. NCCL on CUDA, gloo on CPU. A
single process without those variables runs undistributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistEnv:
    """Join the process group the launcher set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA device if there is one, else the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def shutdown(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def wrap(module: nn.Module, mode: str, env: DistEnv, layer_classes: tuple[str, ...]) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard``) per decoder layer and then the whole module.

    The module arrives on the CPU. Single-process and DDP runs move it to the device
    whole; FSDP moves only each rank's shards there, which is what lets a student that
    does not fit one device train. Single-process runs are returned unwrapped. Under
    FSDP the embedding and the output head stay in the root group, which the root's
    forward (where the loss is computed) gathers. DDP's forward broadcasts buffers, a
    collective, so evaluation (where ranks hold different numbers of batches) calls the
    module inside the wrapper instead.
    """
    if env.world == 1:
        return module.to(env.device)
    if mode == "ddp":
        module.to(env.device)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world,))
    layers = [m for m in module.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"FSDP found no decoder layers named {layer_classes} to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The ``DistillStudent`` inside a DDP wrapper (FSDP2 shards in place, no wrapper)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
