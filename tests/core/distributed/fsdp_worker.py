"""One rank of the FSDP2 runs of tests/core/distributed/test_two_ranks.py (gloo, CPU), or the single-process reference.

``python -m tests.core.distributed.fsdp_worker RANK WORLD MODE PHASE OUT_DIR PORT``

* MODE ``fsdp2``: ``fully_shard`` on each decoder layer and on the root, with
  ``ignored_params=trady_peft.fsdp_ignored_params(model)``; ``accelerate``: accelerate's
  FSDP2 plugin with ``ignored_modules=trady_peft.fsdp_ignored_modules(model)``; ``zero2`` /
  ``zero3``: ``deepspeed.initialize`` with that ZeRO stage (SGD with momentum); ``single`` /
  ``single_sgd``: one process, no wrapper (WORLD must be 1), AdamW / SGD.
* PHASE ``train``: periods 0 and 1, then half of period 2, and ``save_pretrained`` mid-period;
  ``resume`` (fresh processes): load that adapter, finish period 2, train period 3, save.
  ``unignored``: shard without the helper and expect TraDy's error.

Every step draws one global batch of 8 sequences; rank r trains on rows ``[4r, 4r + 4)``, the
reference on all 8, so the mean-reduced gradients agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model

import trady_peft
from tests.tiny_models import tiny_llama

GLOBAL_BATCH, SEQ, STEPS = 8, 12, 3
CONFIG = dict(memory_budget=600, strategy="d-full-random", seed=7)


def make_optimizer(model, mode: str):
    """AdamW; SGD with momentum for the DeepSpeed runs and their reference (``*sgd``), whose optimizer
    reset is exact under DeepSpeed too (Adam's bias-correction fix is not applied there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if mode.startswith("zero") or mode.endswith("sgd"):
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2)


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    ids = torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    share = GLOBAL_BATCH // world
    return ids[rank * share : (rank + 1) * share]


def shard(model, mode: str, ignore: bool = True):
    """Apply FSDP2 as the mode says; return (the model to call, the optimizer)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if mode.startswith("zero"):
        os.environ["DS_ACCELERATOR"] = "cpu"  # also on a machine with a GPU (DeepSpeed would pick CUDA)
        import deepspeed

        config = {
            "train_batch_size": GLOBAL_BATCH,
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
            "zero_allow_untested_optimizer": True,
            # 0: ZeRO-3 partitions even this tiny bank (by default, parameters under 1e5 values stay whole).
            "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0},
        }
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, mode), config=config
        )
        return engine, optimizer
    if mode == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            ignored_modules=trady_peft.fsdp_ignored_modules(model),
        )
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        # accelerate 1.15 (state.py) only turns a *GPU-type* multi-process run into FSDP; on CPU
        # (MULTI_CPU) it ignores the plugin and prepare() wraps in DDP. Force the FSDP state so
        # that prepare() runs its real FSDP2 path (fsdp2_prepare_model + optimizer re-binding).
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        model, optimizer = accelerator.prepare(model, make_optimizer(model, mode))
    else:
        kwargs = {"ignored_params": trady_peft.fsdp_ignored_params(model)} if ignore else {}
        for block in model.base_model.model.model.layers:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        optimizer = make_optimizer(model, mode)
    # FSDP2 really runs: the frozen weights are sharded DTensors, the bank is a whole tensor.
    assert any(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 did not shard the model"
    if ignore:
        bank = trady_peft.find_tuner(model).trady_bank["default"].weight
        assert not isinstance(bank, DTensor), "the bank was sharded"
    return model, optimizer


def train_steps(model, optimizer, first_step: int, steps: int, rank: int, world: int) -> None:
    for step in range(first_step, first_step + steps):
        ids = batch(step, rank, world)
        loss = model(input_ids=ids, labels=ids).loss
        if hasattr(model, "backward"):  # a DeepSpeed engine
            model.backward(loss)
            model.step()
            continue
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def selection(model) -> dict:
    tuner = trady_peft.find_tuner(model)
    return {n: m.trady_idx["default"].tolist() for n, m in tuner.trady_layers("default")}


def run(rank: int, world: int, mode: str, phase: str, out: str) -> None:
    if phase == "unignored":
        model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**CONFIG))
        model.train()
        model, _ = shard(model, mode, ignore=False)
        try:
            ids = batch(0, rank, world)
            model(input_ids=ids, labels=ids)
        except RuntimeError as err:
            with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
                f.write(str(err))
        return
    selections = []
    if phase == "train":
        model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**CONFIG))
        model.train()
        if not mode.startswith("single"):
            model, optimizer = shard(model, mode)
        else:
            optimizer = make_optimizer(model, mode)
        step = 0
        for period in range(3):
            if period:
                trady_peft.next_period(model, optimizer)
            steps = STEPS if period < 2 else 1  # period 2: saved mid-period
            train_steps(model, optimizer, step, steps, rank, world)
            step += steps
            selections.append(selection(model))
        save_dir = os.path.join(out, "mid")
    else:
        model = PeftModel.from_pretrained(tiny_llama(), os.path.join(out, "mid"), is_trainable=True)
        model.train()
        selections.append(selection(model))  # the mid-period selection, restored
        if not mode.startswith("single"):
            model, optimizer = shard(model, mode)
        else:
            optimizer = make_optimizer(model, mode)
        step = 2 * STEPS + 1
        train_steps(model, optimizer, step, STEPS - 1, rank, world)  # the rest of period 2
        step += STEPS - 1
        trady_peft.next_period(model, optimizer)
        train_steps(model, optimizer, step, STEPS, rank, world)
        selections.append(selection(model))
        save_dir = os.path.join(out, f"final{rank}")
    unwrapped = model if isinstance(model, PeftModel) else model.module
    if mode.startswith("zero"):  # ZeRO-3 gathers the bank to save: every rank takes part, rank 0 writes
        unwrapped.save_pretrained(save_dir, is_main_process=rank == 0 or phase == "resume")
    elif rank == 0 or phase == "resume":  # FSDP: the bank is whole on every rank, rank 0 saves alone
        unwrapped.save_pretrained(save_dir)
    with open(os.path.join(out, f"{phase}_selections{rank}.json"), "w") as f:
        json.dump(selections, f)
    if mode in ("fsdp2", "accelerate"):
        with open(os.path.join(out, f"{phase}_memory{rank}.json"), "w") as f:
            json.dump(held_bytes(model, optimizer), f)


def held_bytes(model, optimizer) -> dict:
    """Bytes this rank holds: the bank with its optimizer state, and the frozen weights (local shards)."""
    from torch.distributed.tensor import DTensor

    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    bank = trady_peft.find_tuner(model).trady_bank["default"].weight
    state = [v for v in optimizer.state[bank].values() if torch.is_tensor(v) and v.shape == bank.shape]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "bank": sum(size(t) for t in [bank, *state]),
        "bank_values": bank.numel(),
        "frozen_local": sum(size(p) for p in frozen),
        "frozen_full": sum(p.numel() * p.element_size() for p in frozen),
    }


def main(rank: int, world: int, mode: str, phase: str, out: str, port: int) -> None:
    torch.manual_seed(0)
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        dist.init_process_group("gloo", rank=rank, world_size=world)
        run(rank, world, mode, phase, out)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: gloo's threads can stall it
    run(rank, world, mode, phase, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
