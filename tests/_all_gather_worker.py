"""torchrun worker of ``tests/test_fsdp_all_gather.py``.

``equal``: :class:`pgdpo.train.distributed.InPlaceAllGather` gathers what gloo's ``all_gather_into_tensor``
gathers, bitwise, over the world and over a subgroup, for float and byte buffers, with the input in its
slot of the output (as FSDP2 passes it) or apart.

``memory``: a 4-block model (each block a frozen 2048x2048 fp32 weight, 16.8 MB, and a small trained
adapter), FSDP2 over the processes, a forward and a backward with activation checkpointing; the peak
resident memory of each above the resident memory before the forward, in blocks. ``--default-all-gather``
uses FSDP2's own all-gather (gloo's) instead of pgdpo's. Every tensor >= 64 KB gets its own mapping
(``MALLOC_MMAP_THRESHOLD_`` from the test), returned to the OS when freed: resident memory is live memory.
"""

import argparse
import json

import torch
import torch.distributed as dist
from _proc import reset_peak, status_bytes  # tests/, on a worker's path
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from pgdpo.train.config import DistributedConfig
from pgdpo.train.distributed import InPlaceAllGather, init_distributed, leave_finished_worker, wrap_model

DIM = 2048


def equal(report: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    gather = InPlaceAllGather()
    groups = [dist.group.WORLD, dist.new_group([0, world - 1])]  # a subgroup: group-relative ranks
    results = []
    for group in groups:
        if rank not in dist.get_process_group_ranks(group):
            continue
        size, me = group.size(), group.rank()
        for dtype in (torch.float32, torch.uint8):
            for in_slot in (True, False):
                n = 1003  # every rank's slot the same size (FSDP2 pads the shards); odd on purpose
                gen = torch.Generator().manual_seed(rank)
                mine = (torch.randn(n, generator=gen) * 100).to(dtype)
                want = torch.empty(n * size, dtype=dtype)
                dist.all_gather_into_tensor(want, mine, group=group)
                out = gather.allocate((n * size,), dtype=dtype, device=torch.device("cpu"))
                if in_slot:
                    out.narrow(0, me * n, n).copy_(mine)
                    inp = out.narrow(0, me * n, n)
                else:
                    inp = mine.clone()
                work = gather(out, inp, group)
                work.wait()
                results.append({"group": size, "dtype": str(dtype), "in_slot": in_slot,
                                "equal": bool(torch.equal(out, want))})
    with open(report, "a") as f:
        f.write(json.dumps({"rank": rank, "results": results}) + "\n")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Linear(DIM, DIM, bias=False).requires_grad_(False)
        self.down, self.up = nn.Linear(DIM, 4, bias=False), nn.Linear(4, DIM, bias=False)

    def forward(self, x):
        return x + torch.tanh(self.weight(x)) + self.up(self.down(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def memory(report: str, default_all_gather: bool, state) -> None:
    torch.manual_seed(0)
    model = Net()
    if default_all_gather:  # FSDP2's own (gloo's) all-gather, for comparison
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    else:
        wrap_model(model, list(model.blocks), state, precision="fp32")
    x = torch.randn(8, DIM, requires_grad=True)
    model(x).sum().backward()  # first step: lazy initialisation, gradients allocated
    dist.barrier()
    before = reset_peak()
    y = model(x)
    forward = status_bytes("VmHWM") - before
    reset_peak()
    y.sum().backward()
    backward = status_bytes("VmHWM") - before
    block = DIM * DIM * 4
    with open(report, "a") as f:
        f.write(json.dumps({"rank": dist.get_rank(), "forward_blocks": forward / block,
                            "backward_blocks": backward / block}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["equal", "memory"])
    p.add_argument("--report", required=True)
    p.add_argument("--default-all-gather", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    state = init_distributed(DistributedConfig(strategy="fsdp"), "cpu")
    if args.mode == "equal":
        equal(args.report)
    else:
        memory(args.report, args.default_all_gather, state)
    dist.barrier()
    dist.destroy_process_group()
    leave_finished_worker()


if __name__ == "__main__":
    main()
