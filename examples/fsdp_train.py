"""A sharded data-parallel (FSDP2) training run with a TorchHook on every rank (docs/distributed.md).

    torchrun --nproc-per-node 2 examples/fsdp_train.py --job fsdp-demo --bootstrap 127.0.0.1:9092

Every Linear is sharded with `fully_shard`: each rank holds a shard of each parameter and reports
the statistics of its own shards; the worker combines them per parameter. `--nan-step S` puts a
NaN into rank `--nan-rank`'s shard of `--nan-param` before step S's forward pass, to see
ExplodingTensor name that rank and parameter. CPU and gloo by default (`--device cuda`: NCCL,
one GPU per rank). A stop action is agreed on across ranks as in examples/ddp_train.py.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from tensorpulse.producers.torch import TorchHook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", default=None, help="job id (default $TENSORPULSE_JOB)")
    parser.add_argument("--bootstrap", default=None, help="Kafka (default $TENSORPULSE_BOOTSTRAP)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nan-step", type=int, default=-1, help="step of the NaN (default: none)")
    parser.add_argument("--nan-rank", type=int, default=1, help="the rank whose shard gets it")
    parser.add_argument("--nan-param", default="2.weight", help="the parameter whose shard gets it")
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    model = model.to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = TorchHook(args.job, args.bootstrap).attach(model, optimizer)  # the sharded model itself
    params = dict(model.named_parameters())
    data = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own batches
    teacher = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    for step in range(args.steps):
        if step == args.nan_step and dist.get_rank() == args.nan_rank:
            with torch.no_grad():
                params[args.nan_param].to_local().view(-1)[0] = float("nan")  # this rank's shard only
        x = torch.randn(64, 10, generator=data)
        y = (x @ teacher).argmax(dim=1)
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        hook.step(step, loss=loss)
        optimizer.step()
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
