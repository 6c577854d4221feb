"""Adapter files written by trady-peft 0.1.0 load unchanged, with the outputs they gave then.

The files in data/v0.1.0/ were written by ``data/v0.1.0/make_files.py`` run on version 0.1.0: a
tiny CNN (byte budget, two periods) and a tiny Llama (MeDyate, three periods) trained with AdamW,
then saved; ``expected.json`` holds their inputs and the logits of the saved models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import trady_peft  # noqa: F401  (registers the method)
from tests.tiny_models import tiny_cnn, tiny_llama

DATA = Path(__file__).parent / "data" / "v0.1.0"
EXPECTED = json.loads((DATA / "expected.json").read_text())


@pytest.mark.parametrize("trainable", [False, True])
def test_a_cnn_adapter_saved_by_0_1_0_gives_its_saved_outputs(trainable):
    model = PeftModel.from_pretrained(tiny_cnn(), DATA / "cnn", is_trainable=trainable).eval()
    images = torch.tensor(EXPECTED["cnn"]["inputs"])
    with torch.no_grad():
        logits = model(pixel_values=images)["logits"]
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["cnn"]["logits"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainable", [False, True])
def test_a_llama_adapter_saved_by_0_1_0_gives_its_saved_outputs_and_period(trainable):
    model = PeftModel.from_pretrained(tiny_llama(), DATA / "llama", is_trainable=trainable).eval()
    ids = torch.tensor(EXPECTED["llama"]["inputs"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["llama"]["logits"]), rtol=1e-5, atol=1e-5)
    assert model.base_model.period() == 3  # the selection state the file carried
