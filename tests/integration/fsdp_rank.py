"""One rank of the FSDP2 integration test (tests/integration/test_fsdp.py), run as its own process.

argv[1] is a JSON object: job, bootstrap, out (a folder), bad_rank, stop_wait (seconds). Rank and
world come from RANK / WORLD_SIZE. Every Linear is sharded with `fully_shard` (gloo, CPU), so the
hook sees DTensor parameters and gradients. On `bad_rank`, right after the optimizer's update of
step BAD_STEP - 1 (so before step BAD_STEP's forward pass), one element of that rank's own shard
of BAD_PARAM becomes NaN.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

STEPS = 12
BAD_STEP = 11  # the last step: the whole run before it is healthy, for the combined statistics
BAD_PARAM = "2.weight"
#: Steps whose whole-parameter statistics every rank computes (collectively, full_tensor) for the test.
CHECKED_STEP = BAD_STEP - 1


def _summary(t: Any) -> dict[str, float]:
    """The statistics the worker's combine must reproduce, over the whole tensor (float64)."""
    x = t.detach().double().reshape(-1)
    return {
        "n": x.numel(),
        "mean": x.mean().item(),
        "std": x.std(unbiased=False).item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "l2": x.norm().item(),
    }


def _rank_main(cfg: dict[str, Any]) -> int:
    """One FSDP2 rank: train STEPS steps with a TorchHook, then wait for a stop action; write what it saw."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from tensorpulse.producers.torch import TorchHook

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out = Path(cfg["out"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 33), nn.ReLU(), nn.Linear(33, 3))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    teacher = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    params = dict(model.named_parameters())
    updates = 0

    def fault(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        """After the update of step BAD_STEP - 1, one element of this rank's shard becomes NaN.

        Registered before the hook attaches, so it runs before the hook's own step post-hook,
        which starts reading the weights of the next step in the background: the read sees the
        NaN whatever the timing (a write between steps, outside the optimizer, would race it).
        """
        nonlocal updates
        updates += 1
        if rank == cfg["bad_rank"] and updates == BAD_STEP:
            with torch.no_grad():
                params[BAD_PARAM].to_local()[0, 0] = float("nan")  # this rank's shard only

    opt.register_step_post_hook(fault)
    hook = TorchHook(cfg["job"], cfg["bootstrap"], quantile_steps=0).attach(model, opt)
    stopped = threading.Event()
    hook.on_action(lambda action: action["action"] == "stop" and stopped.set())
    whole: dict[str, dict[str, float]] = {}
    shards: dict[str, list[int]] = {}
    for step in range(STEPS):
        x = torch.randn(64, 10, generator=data)
        y = (x @ teacher).argmax(dim=1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        hook.step(step, loss=loss)
        if step == CHECKED_STEP:  # collectives: every rank takes part
            for name, p in params.items():
                whole[name] = _summary(p.full_tensor())
                whole[f"gradient/{name}"] = _summary(p.grad.full_tensor())
                shards[name] = list(p.to_local().shape)
        opt.step()
    undelivered = hook.flush(30)
    (out / f"ready-{rank}").write_text(str(undelivered))
    stopped.wait(cfg["stop_wait"])  # set by the hook's listener when the stop action arrives
    seen = {"rank": hook.rank, "world": hook.world_size, "should_stop": hook.should_stop, **hook.stats()}
    seen["whole"], seen["shards"] = whole, shards
    hook.close(10)
    dist.destroy_process_group()
    (out / f"result-{rank}.json").write_text(json.dumps(seen))
    return 0 if seen["should_stop"] else 3


if __name__ == "__main__":
    sys.exit(_rank_main(json.loads(sys.argv[1])))
