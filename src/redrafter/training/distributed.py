"""Data-parallel training over torch.distributed (gloo on CPU, nccl on CUDA), set up from the
environment ``torchrun`` provides (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Every process holds the whole drafter; each global batch is split across processes by example, the
loss of each drafter step is normalised by the *global* number of positions of that step, and the
gradients are summed across processes. So N processes take exactly the steps one process takes on the
same global batches (up to floating-point summation order).
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        import torch.distributed as dist

        if torch.device(device).type == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            # Long first collectives: ranks reach them after target passes of different sizes.
            dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=3))
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's part of a global batch."""
        return items[self.rank:: self.world]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes (a no-op for one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over processes, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(parameters, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
