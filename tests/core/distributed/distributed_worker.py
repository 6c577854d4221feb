"""One rank of the two-process CPU (gloo) training run of tests/core/distributed/test_two_ranks.py."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

import trady_peft
from tests.tiny_models import tiny_cnn


def main(rank: int, world: int, strategy: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial model on every rank
    model = get_peft_model(
        tiny_cnn(),
        trady_peft.TraDyConfig(memory_budget=400, strategy=strategy, modules_to_save=["classifier"], seed=11),
    )
    model.train()
    # broadcast_buffers=False: the index buffers are NOT copied from rank 0, so agreement below
    # comes from the deterministic draw (and all-reduced statistics), not from DDP.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data
    selections = []
    for epoch in range(3):
        if epoch:
            trady_peft.next_period(ddp, optimizer)
        for _ in range(4):
            images = torch.randn(8, 3, 16, 16, generator=g)
            labels = torch.randint(0, 4, (8,), generator=g)
            loss = ddp(pixel_values=images, labels=labels)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        tuner = model.base_model
        selections.append({n: m.trady_idx["default"].tolist() for n, m in tuner.trady_layers("default")})
    folded = {n: m.fold("default") for n, m in model.base_model.trady_layers("default")}
    torch.save(folded, os.path.join(out_dir, f"adapter{rank}.pt"))
    with open(os.path.join(out_dir, f"selections{rank}.json"), "w") as f:
        json.dump(selections, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can stall it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
