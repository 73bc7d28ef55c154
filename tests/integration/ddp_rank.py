"""One rank of the DDP integration test (tests/integration/test_ddp.py), run as its own process.

argv[1] is a JSON object: job, bootstrap, out (a folder), bad_rank, stop_wait (seconds). Rank and
world come from RANK / WORLD_SIZE (torch.distributed's env:// rendezvous and TorchHook both read them).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

STEPS = 30
BAD_FROM = 12


def _rank_main(cfg: dict[str, Any]) -> int:
    """One DDP rank: train STEPS steps with a TorchHook, then wait for a stop action; write what it saw."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from tensorpulse.producers.torch import TorchHook

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out = Path(cfg["out"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    teacher = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    hook = TorchHook(cfg["job"], cfg["bootstrap"], quantile_steps=0).attach(model, opt)
    stopped = threading.Event()
    hook.on_action(lambda action: action["action"] == "stop" and stopped.set())
    for step in range(STEPS):
        x = torch.randn(64, 10, generator=data)
        y = (x @ teacher).argmax(dim=1)
        if rank == cfg["bad_rank"] and step >= BAD_FROM:
            x = x * 1000.0  # a corrupted shard: wrong input scaling on this rank only
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        hook.step(step, loss=loss)
        opt.step()
    undelivered = hook.flush(30)
    (out / f"ready-{rank}").write_text(str(undelivered))
    stopped.wait(cfg["stop_wait"])  # set by the hook's listener when the stop action arrives
    seen = {"rank": hook.rank, "world": hook.world_size, "should_stop": hook.should_stop, **hook.stats()}
    hook.close(10)
    dist.destroy_process_group()
    (out / f"result-{rank}.json").write_text(json.dumps(seen))
    return 0 if seen["should_stop"] else 3


if __name__ == "__main__":
    sys.exit(_rank_main(json.loads(sys.argv[1])))
