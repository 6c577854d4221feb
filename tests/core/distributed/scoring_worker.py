"""One rank of the Det-RGN scoring runs of tests/core/distributed/test_two_ranks.py (gloo, CPU), or one process.

``python -m tests.core.distributed.scoring_worker RANK WORLD MODE OUT_DIR PORT``

* MODE ``fsdp2``: ``fully_shard`` on each decoder layer and on the root (the bank left out);
  ``ddp``: ``DistributedDataParallel``; ``zero2`` / ``zero3``: ``deepspeed.initialize`` at that
  ZeRO stage (ZeRO-3 partitions the base weights and the bank). Each rank scores its own batches through
  ``trady_peft.next_period`` and writes the scores it drew from (``{MODE}{RANK}.json``).
* MODE ``single`` (WORLD 1): one process scores each rank's batches alone and writes them all
  (``single.json``); the distributed scores are their mean.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_llama

CONFIG = dict(memory_budget="32KiB", strategy="d-det-rgn")


def rank_batches(rank: int) -> list[dict]:
    """Two batches of 2 sequences, different on every rank."""
    g = torch.Generator().manual_seed(200 + rank)
    ids = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(2)]
    return [{"input_ids": i, "labels": i} for i in ids]


@contextlib.contextmanager
def raises_value_error(part: str):
    """A ValueError whose message holds ``part`` must leave the block (pytest is not imported in workers)."""
    try:
        yield
    except ValueError as error:
        assert part in str(error), error
        return
    raise AssertionError(f"no ValueError saying {part!r}")


def listed(scores: dict) -> dict:
    return {name: norms.tolist() for name, norms in scores.items()}


def run(rank: int, world: int, mode: str, out: str) -> None:
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**CONFIG))
    tuner = model.base_model
    if mode == "single":
        model(**rank_batches(0)[0])  # the first forward prices the budget
        scores = {r: listed(tuner.score_channels(rank_batches(r))) for r in range(2)}
        with open(os.path.join(out, "single.json"), "w") as f:
            json.dump(scores, f)
        return
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        ignored = trady_peft.fsdp_ignored_params(model)
        for block in model.base_model.model.model.layers:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        assert any(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 did not shard the model"
        wrapped = model
    elif mode.startswith("zero"):
        os.environ["DS_ACCELERATOR"] = "cpu"  # also on a machine with a GPU (DeepSpeed would pick CUDA)
        import deepspeed

        config = {
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": 2,
            "zero_allow_untested_optimizer": True,
            # 0: ZeRO-3 partitions every parameter, the bank and the frozen base weights alike.
            "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0},
        }
        params = [p for p in model.parameters() if p.requires_grad]
        wrapped, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.1), config=config)
    else:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    batches = rank_batches(rank)
    if mode == "fsdp2":
        with raises_value_error("under FSDP2 it cannot score inside the sharded model's forward"):
            wrapped(**batches[0])  # a Det-RGN adapter scores its first batch, which FSDP2's forward cannot hold
        trady_peft.next_period(wrapped, batches=batches, period=0)  # the fix the refusal gives
    elif mode == "zero3":  # the refusal's fix, before any forward (a refused forward leaves ZeRO-3's hooks mid-way)
        trady_peft.next_period(wrapped, batches=batches, period=0)
    else:
        wrapped(**batches[0])  # the first forward prices the budget and scores its batch
        trady_peft.next_period(wrapped, batches=batches)
    assert tuner.selection_summary()["selected_channels"] > 0
    with open(os.path.join(out, f"{mode}{rank}.json"), "w") as f:
        json.dump(listed(tuner.selection_states["default"].scores), f)


def main(rank: int, world: int, mode: str, out: str, port: int) -> None:
    torch.manual_seed(0)
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        dist.init_process_group("gloo", rank=rank, world_size=world)
        run(rank, world, mode, out)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: gloo's threads can stall it
    run(rank, world, mode, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
