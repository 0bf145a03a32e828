"""torch.distributed plumbing for `torchrun`: one process per device, nccl on CUDA, gloo on the CPU.

A plain process (no torchrun) gets a `Dist` with world 1 whose collectives are no-ops, so the
training and crop code has one path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from preprocess.runtime import dist_env, resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def max(self, flag: torch.Tensor) -> float:
        """The largest of `flag` (a scalar tensor on this rank's device) over every rank; one host sync.
        Every rank reaches the same answer, so all stop together instead of leaving DDP hanging."""
        if self.world > 1:
            flag = flag.clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag.item())

    def average_grads(self, params) -> None:
        """All-reduce (mean) the gradients of parameters that DDP does not manage (the loss's task weights)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def abort(self) -> None:
        """Leave the job after an error on this rank, at once: no collective, no wait for rank 0. This
        process then exits with its error, and torchrun ends the job's other processes, which may be
        waiting for this one in a collective (waiting for them here would hang until a timeout).
        The process group is left to the process's exit: destroying it could wait on those peers."""
        return None

    def close(self) -> None:
        """Leave the job. Rank 0 leaves last: the other ranks wait (on the rendezvous store, not on a
        gloo collective) until rank 0 says it is done. With gloo, a peer that exits right after the last
        collective can cut off messages still in flight ("Connection closed by peer")."""
        if self.world == 1 or not dist.is_initialized():
            return
        store = _store()
        key = f"maskcls/done/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if store is not None:
            if self.rank == 0:
                store.set(key, "1")
            else:
                store.wait([key])
        dist.destroy_process_group()


def _store():
    """A client of torchrun's rendezvous store (MASTER_ADDR:MASTER_PORT), or None outside torchrun."""
    from datetime import timedelta

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(hours=2))


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    rank, world, local = dist_env()
    dev = resolve_device(device)
    if world == 1:
        return Dist(0, 1, 0, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)
