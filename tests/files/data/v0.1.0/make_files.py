"""Writes adapter files with trady-peft 0.1.0 (this checkout) for the load-compatibility test."""

import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_cnn, tiny_llama

out = Path(sys.argv[1])
torch.manual_seed(0)
images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


def train(model, batches, periods):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(periods):
        for b in batches:
            loss = model(**b)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
        trady_peft.next_period(model, opt)


cases = {}
cnn = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(memory_budget="4KiB", seed=3))
cnn.train()
labels = torch.tensor([0, 1, 2, 1])
train(cnn, [{"pixel_values": images, "labels": labels}], 2)
cnn.eval()
cnn.save_pretrained(out / "cnn")
with torch.no_grad():
    cases["cnn"] = {"inputs": images.tolist(), "logits": cnn(pixel_values=images)["logits"].tolist()}

llama_cfg = dict(memory_budget="24KiB", strategy="medyate", seed=5)
llama = get_peft_model(tiny_llama(), trady_peft.TraDyConfig(**llama_cfg))
llama.train()
train(llama, [{"input_ids": ids, "labels": ids}], 3)
llama.eval()
llama.save_pretrained(out / "llama")
with torch.no_grad():
    cases["llama"] = {"inputs": ids.tolist(), "logits": llama(input_ids=ids).logits.tolist()}
(out / "expected.json").write_text(json.dumps(cases))
print("touched", cnn.base_model.selection_summary()["touched_channels"], llama.base_model.selection_summary())
