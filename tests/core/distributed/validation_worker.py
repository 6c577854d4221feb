"""One rank of tests/test_distributed_validation.py: DDP training under a byte budget in which rank 0
alone runs a grad-enabled validation forward on a larger batch."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

import trady_peft
from tests.tiny_models import tiny_cnn


def main(rank: int, world: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a collective that only one rank runs fails the test instead of blocking for 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    config = trady_peft.TraDyConfig(
        memory_budget="12KiB", strategy="d-full-random", modules_to_save=["classifier"], seed=11
    )
    model = get_peft_model(tiny_cnn(), config)
    model.train()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1000 + rank)
    tuner = model.base_model
    selections = []
    for epoch in range(2):
        if epoch:
            trady_peft.next_period(ddp, optimizer)
        for step in range(3):
            images = torch.randn(4, 3, 16, 16, generator=g)
            ddp(pixel_values=images, labels=torch.randint(0, 4, (4,), generator=g))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            if rank == 0 and (epoch, step) == (0, 0):
                model.eval()  # validation without torch.no_grad, on this rank only, with a larger batch
                model(pixel_values=torch.randn(8, 3, 16, 16), labels=torch.zeros(8, dtype=torch.long))
                model.train()
            selections.append({n: m.trady_idx["default"].tolist() for n, m in tuner.trady_layers("default")})
    batch_sizes = sorted({c.batch_size for c in tuner.layer_costs.values()})
    with open(os.path.join(out_dir, f"validation{rank}.json"), "w") as f:
        json.dump({"selections": selections, "batch_sizes": batch_sizes, "cost": tuner.selected_cost()}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can stall it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
