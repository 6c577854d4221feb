"""A merged or disabled TraDy adapter on a causal LM cannot be trained, and says so as LoRA does: the
frozen-path twins (recomputed attention, fused LM-head loss) no longer connect the loss to the bank."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import trady_peft
from tests.tiny_models import CountingText, tiny_llama

NO_GRAD = "does not require grad"


def adapters():
    trady = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(channels_per_layer=2))
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    return {"trady": trady.train(), "lora": lora.train()}


def loss_of(model):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("method", ["trady", "lora"])
def test_a_merged_adapter_refuses_backward(method):
    model = adapters()[method]
    loss_of(model).backward()  # unmerged: trains
    model.base_model.merge_adapter()
    with pytest.raises(RuntimeError, match=NO_GRAD):
        loss_of(model).backward()


@pytest.mark.parametrize("method", ["trady", "lora"])
def test_a_disabled_adapter_refuses_backward(method):
    model = adapters()[method]
    with model.disable_adapter(), pytest.raises(RuntimeError, match=NO_GRAD):
        loss_of(model).backward()
    loss_of(model).backward()  # enabled again: trains


def test_the_trainer_does_not_report_a_merged_run_as_a_success(tmp_path):
    model = adapters()["trady"]
    model.base_model.merge_adapter()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=CountingText(8), callbacks=[trady_peft.TraDyCallback()])
    with pytest.raises(RuntimeError, match=NO_GRAD):
        trainer.train()
