"""One rank of tests/integration/test_fsdp_mesh.py: DTensors on a 2 x 2 gloo mesh, marked by producers/shards.py.

argv[1] is the output folder. Each rank writes, per placement case, its shard mark and its local
shard's values, for the test to combine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: Placement cases on the (replicate, shard) mesh: name -> placements, as strings for the test.
CASES = {
    "hsdp": ("Replicate", "Shard(0)"),  # HSDP: shards along dim 0, replicated across the first mesh dim
    "two_dims": ("Shard(0)", "Shard(1)"),  # 2-D sharding: 4 blocks, none contiguous in the whole
    "columns": ("Replicate", "Shard(1)"),  # sharded along dim 1: not contiguous
    "replicated": ("Replicate", "Replicate"),  # the whole tensor on every rank: not a shard
}
SHAPE = (9, 6)


def main(out: Path) -> int:
    """Build each case's DTensor from the same tensor on every rank and record this rank's view."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from tensorpulse.producers.shards import local_tensors, shard_mark

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = int(os.environ["RANK"])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    whole = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    placements = {"Replicate": Replicate(), "Shard(0)": Shard(0), "Shard(1)": Shard(1)}
    seen = {}
    for name, kinds in CASES.items():
        d = distribute_tensor(whole, mesh, [placements[k] for k in kinds])
        [local] = local_tensors([d])
        seen[name] = {"mark": shard_mark(d), "values": local.reshape(-1).tolist()}
    seen["coordinate"] = mesh.get_coordinate()
    seen["whole"] = whole.reshape(-1).tolist()
    dist.destroy_process_group()
    (out / f"mesh-{rank}.json").write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
