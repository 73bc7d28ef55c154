"""A data-parallel training run with a TorchHook on every rank (docs/distributed.md).

    torchrun --nproc-per-node 2 examples/ddp_train.py --job ddp-demo --bootstrap 127.0.0.1:9092

Every rank gives the same job id; rank and world size come from torchrun (RANK, WORLD_SIZE).
CPU and gloo by default (`--device cuda` uses NCCL, one GPU per rank). A stop action reaches
every rank, not necessarily at the same step: the ranks agree on it with one all-reduce per
step before leaving the loop, so that no rank waits alone in the next all-reduce.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tensorpulse.producers.torch import TorchHook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", default=None, help="job id (default $TENSORPULSE_JOB)")
    parser.add_argument("--bootstrap", default=None, help="Kafka (default $TENSORPULSE_BOOTSTRAP)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if args.device == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    hook = TorchHook(args.job, args.bootstrap).attach(model, optimizer)  # the inner module: no "module." prefix
    data = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own shard
    teacher = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    for step in range(args.steps):
        x = torch.randn(64, 10, generator=data)
        y = (x @ teacher).argmax(dim=1)
        loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hook.step(step, loss=loss)
        stop = torch.tensor(float(hook.should_stop), device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            break
    hook.close()
    if dist.get_rank() == 0:
        print(f"job {hook.job}: {dist.get_world_size()} ranks trained {step + 1} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
