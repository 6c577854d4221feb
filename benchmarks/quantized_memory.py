"""Memory of one training step on a quantized base: TraDy vs QLoRA-style LoRA r=8.

The model is the memory report's Llama-style decoder (`paper_models.llama_like`: 4 layers,
hidden 256, built from config), sequence 128, batch 8, AdamW. Its linear layers (all but the LM
head) are quantized with each backend -- bitsandbytes NF4, FP4 and 8-bit, torchao int8 weight-only
-- or left in fp32, and the same quantized base is trained by

* TraDy, ``memory_budget=200_000`` (values, as in the memory report), ``strategy="d-full-random"``;
* LoRA r=8, alpha 16, no dropout, on the same layers (peft dispatches its bitsandbytes and torchao
  LoRA layers, as QLoRA does).

Every figure is measured: the base bytes by trady-peft's `storage_bytes` (parameters,
buffers and quantization statistics of the quantized model before the adapter is added), the
adapter footprint by `trady_peft.measure_training_step` (trainable parameters, gradients, AdamW
state, and the storages autograd saved for backward).

Run: ``python benchmarks/quantized_memory.py`` (under a minute on 2 CPU cores). It prints the
table, writes ``docs/quantized/results.json`` and rewrites the block of ``docs/distributed.md``
between ``<!-- quantized_memory.py -->`` and ``<!-- /quantized_memory.py -->``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from paper_models import llama_like  # noqa: E402

import trady_peft  # noqa: E402
from trady_peft.core.quantized import storage_bytes  # noqa: E402

OUT = ROOT / "docs" / "quantized"
PAGE = ROOT / "docs" / "distributed.md"
BEGIN, END = "<!-- quantized_memory.py -->", "<!-- /quantized_memory.py -->"
BACKENDS = {
    "fp32 (no quantization)": None,
    "bitsandbytes NF4": "bnb-nf4",
    "bitsandbytes FP4": "bnb-fp4",
    "bitsandbytes 8-bit": "bnb-int8",
    "torchao int8 weight-only": "torchao-int8",
}


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def quantize_linear(linear: nn.Linear, backend: str) -> nn.Module:
    """A quantized copy of ``linear`` (weights and bias) on the CPU."""
    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        holder = _Holder(nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None))
        holder.layer.load_state_dict(linear.state_dict())
        quantize_(holder, Int8WeightOnlyConfig())
        return holder.layer.requires_grad_(False)
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if backend == "bnb-int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        kind = backend.removeprefix("bnb-")
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32, quant_type=kind
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=kind)
    if bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # moving a bitsandbytes parameter to its device quantizes it


def build(backend: str | None) -> nn.Module:
    """The Llama-style decoder (same random weights every call), its linear layers quantized."""
    torch.manual_seed(0)
    model = llama_like().eval()
    if backend is not None:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear and name != "lm_head":
                    setattr(module, name, quantize_linear(child, backend))
        # What transformers sets on a bitsandbytes model; peft then uses its bitsandbytes LoRA layers.
        model.is_loaded_in_4bit = backend in ("bnb-nf4", "bnb-fp4")
        model.is_loaded_in_8bit = backend == "bnb-int8"
    return model


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def step(model: nn.Module) -> trady_peft.TrainingStepMemory:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return trady_peft.measure_training_step(model, batch(), optimizer)


def measure(backend: str | None) -> dict:
    base = build(backend)
    base_bytes = storage_bytes(base)
    trady = get_peft_model(base, trady_peft.TraDyConfig(memory_budget=200_000, strategy="d-full-random"))
    targets = sorted({n for n, _ in trady.base_model.trady_layers("default")})
    trady_mem = step(trady)
    lora = get_peft_model(build(backend), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    lora_mem = step(lora)
    rows = {}
    for method, mem in (("TraDy", trady_mem), ("LoRA r=8", lora_mem)):
        rows[method] = {
            "trainable_parameters": mem.trainable_parameters,
            "gradients": mem.gradients,
            "optimizer_state": mem.optimizer_state,
            "saved_activations": mem.saved_activations,
            "adapter_footprint": mem.total,
            "base_plus_adapter": base_bytes + mem.total,
        }
    return {"base_bytes": base_bytes, "layers": len(targets), "methods": rows}


def kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def table(results: dict) -> str:
    lines = [
        "| base | method | base (KiB) | trainable + grads + AdamW (KiB) | saved activations (KiB) "
        "| adapter footprint (KiB) | base + adapter (KiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        for method, m in r["methods"].items():
            weights = m["trainable_parameters"] + m["gradients"] + m["optimizer_state"]
            lines.append(
                f"| {label} | {method} | {kib(r['base_bytes'])} | {kib(weights)} | {kib(m['saved_activations'])} "
                f"| {kib(m['adapter_footprint'])} | {kib(m['base_plus_adapter'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/quantized*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    results, skipped = {}, {}
    for label, backend in BACKENDS.items():
        try:
            results[label] = measure(backend)
        except ImportError as exc:
            skipped[label] = f"{type(exc).__name__}: {exc}"
    text = table(results)
    print(text)
    for label, why in skipped.items():
        print(f"skipped {label}: {why}")
    if args.no_docs:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    page = PAGE.read_text()
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    PAGE.write_text(page[:start] + "\n" + text + "\n" + page[end:])


if __name__ == "__main__":
    main()
