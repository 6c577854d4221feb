"""One process of the Hugging Face ``Trainer`` + DeepSpeed runs of tests/core/distributed/test_deepspeed_trainer.py.

``python -m tests.core.distributed.trainer_deepspeed_worker RANK WORLD MODE DEVICE OUT_DIR PORT``

* MODE ``zero2`` / ``zero3``: ``TrainingArguments(deepspeed=<dict>)`` at that ZeRO stage (ZeRO-3
  partitions even this tiny bank: ``stage3_param_persistence_threshold=0``); ``plain``: the same
  Trainer without DeepSpeed, the reference.
* DEVICE ``cpu`` (``use_cpu=True``: gloo, DeepSpeed's CPU accelerator) or ``cuda`` (nccl, one GPU
  per rank). The distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``)
  is set before ``TrainingArguments`` is built, as ``torchrun`` would.

Every run sees the same 8 sequences per optimizer step (rank r the rows ``[8r/W, 8(r+1)/W)`` of
each, ``train_sampling_strategy="sequential"``), for 2 epochs with ``TraDyCallback`` (a redraw at
epoch 1), SGD with momentum (whose reset at a period change is exact under DeepSpeed too). After
training, rank 0 writes ``trained.pt``: the adapter folded from the live model (bank gathered),
the logits of the trained model on a probe batch, the per-epoch selections and what DeepSpeed
ran; every rank takes part in ``trainer.save_model(OUT/adapter)`` and in
``model.save_pretrained(OUT/direct)`` (ZeRO-3 gathers the bank for both).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import trady_peft
from tests.tiny_models import CountingText, tiny_llama
from trady_peft.compat import is_zero3_param
from trady_peft.core.distributed import bank_numel, gathered

GLOBAL_BATCH, SAMPLES, EPOCHS = 8, 32, 2
CONFIG = dict(memory_budget=600, strategy="d-full-random", seed=7)
PROBE = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def deepspeed_config(mode: str) -> dict:
    """The DeepSpeed config the Trainer is given ("auto": filled in from the TrainingArguments)."""
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
        "zero_optimization": {
            "stage": int(mode[-1]),
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,  # what peft's docs ask for the Trainer's save
        },
    }


class Selections(TrainerCallback):
    """Records each epoch's channel selection."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        tuner = trady_peft.find_tuner(model)
        self.epochs.append({n: m.trady_idx["default"].tolist() for n, m in tuner.trady_layers("default")})


def run(rank: int, world: int, mode: str, device: str, out: str) -> None:
    model = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**CONFIG))
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=0.5,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        seed=0,
        deepspeed=None if mode == "plain" else deepspeed_config(mode),
    )
    selections = Selections()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=CountingText(SAMPLES, length=12),
        callbacks=[trady_peft.TraDyCallback(), selections],
    )
    trainer.train()
    tuner = trady_peft.find_tuner(model)
    bank = tuner.trady_bank["default"].weight
    info = {
        "engine": type(trainer.model_wrapped).__name__,
        "stage": trainer.deepspeed.zero_optimization_stage() if trainer.deepspeed is not None else None,
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "train_batch_size": trainer.deepspeed.train_batch_size() if trainer.deepspeed is not None else None,
        "zero3_param": is_zero3_param(bank),
        "bank_local_numel": bank.numel(),
        "bank_partition_numel": getattr(bank, "ds_tensor", bank).numel(),  # ZeRO-3: this rank's share
        "bank_numel": bank_numel(bank),
        "period": tuner.period("default"),
    }
    with gathered(bank):  # every rank: ZeRO-3 gathers the partitioned bank
        folded = {n: [t.detach().cpu() for t in m.fold("default")] for n, m in tuner.trady_layers("default")}
        info["current_delta_max"] = float(bank.detach().abs().max())
    model.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=PROBE.to(args.device)).logits.float().cpu()
    trainer.save_model(os.path.join(out, "adapter"))  # ZeRO-3: from the consolidated state dict
    model.save_pretrained(os.path.join(out, "direct"), is_main_process=rank == 0)  # ZeRO-3: gathers the bank
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(out, f"selections{rank}.json"), "w") as f:
        json.dump(selections.epochs, f)
    if rank == 0:
        torch.save(
            {"info": info, "folded": folded, "logits": logits, "losses": losses}, os.path.join(out, "trained.pt")
        )


def main(rank: int, world: int, mode: str, device: str, out: str, port: int) -> None:
    torch.manual_seed(0)
    if device == "cpu":  # DeepSpeed's CPU accelerator, also on a machine with a GPU (else it picks CUDA)
        os.environ["DS_ACCELERATOR"] = "cpu"
    if mode != "plain":  # DeepSpeed (through accelerate) starts the process group from these
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
    run(rank, world, mode, device, out)
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can stall it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
