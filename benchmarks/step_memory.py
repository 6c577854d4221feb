"""A training step under ``step_memory``, against the bound: a decoder and a CNN at two batch shapes.

For each model (a Llama-style decoder and MobileNetV2-w0.35, both built from config, random weights)
with a stated ``step_memory``, one fresh TraDy model (``d-full-random``, AdamW) trains at a batch
shape, then at a larger one (which reprices: the rest of the step is measured again and the
adapter's share shrinks). At each shape, after a warm-up step (the probe, the draw, AdamW's state):

* ``counted``: the step as the bound counts it, measured by `trady_peft.measure_training_step`
  (saved-tensor hooks; gradients and AdamW state after the step) plus the model's parameters and
  buffers, each storage once;
* ``peak`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the warm-up and the measured step,
  which also holds what the bound does not count: the output and the loss, gradients in flight
  during backward, AdamW's temporaries and kernel workspaces (cuBLAS). The margin allowed for them on
  top of ``step_memory`` is stated: ``--margin-mib`` (default 64 MiB) plus ``--margin-fraction`` of
  ``step_memory`` (default 0.15); the table shows the peak's excess over ``step_memory`` itself;
* ``share``: the adapter's byte budget, what ``step_memory`` leaves after the rest as priced at the
  probe; ``rest measured``: the counted step less the adapter's own part (its bank with gradient and
  AdamW state, and what the TraDy layers saved), for comparison with the priced rest (a bound over
  every draw).

Exits 1 if a counted step exceeds ``step_memory``, or a CUDA peak exceeds ``step_memory`` plus the
margin; prints a table either way (``--out DIR`` also writes step_memory.json).

    PYTHONPATH=. python benchmarks/step_memory.py --device cuda --out build/gpu
    PYTHONPATH=. python benchmarks/step_memory.py --device cpu --small   # tiny models, seconds

Without CUDA, ``--device cuda`` says what it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_models import MobileNetV2  # noqa: E402

import trady_peft  # noqa: E402
from trady_peft.memory.budget import parse_step_memory  # noqa: E402

MiB = 2**20


class Classifier(nn.Module):
    """A vision model that returns its loss, as a Trainer-ready model does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels):
        logits = self.model(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def decoder(small: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, vocab = (32, 2, 64) if small else (512, 4, 2000)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config)


def cnn(small: bool) -> nn.Module:
    return Classifier(MobileNetV2(width=0.35, num_classes=10))


@dataclass
class Case:
    name: str
    build: object
    heads: list[str] | None
    step_memory: str
    shapes: list[tuple[int, ...]]  # (batch, sequence) or (batch, side)
    small_step_memory: str
    small_shapes: list[tuple[int, ...]]


CASES = (
    Case("llama", decoder, None, "448MiB", [(8, 256), (8, 512)], "600KiB", [(2, 16), (4, 24)]),
    Case("mobilenet_v2_w035", cnn, ["classifier"], "96MiB", [(32, 128), (64, 160)], "3MiB", [(2, 32), (4, 48)]),
)


def batch_of(case: Case, shape: tuple[int, ...], device: str, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if case.name == "llama":
        ids = torch.randint(0, vocab, shape, generator=g)
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    batch, side = shape
    images = torch.randn(batch, 3, side, side, generator=g)
    return {"pixel_values": images.to(device), "labels": torch.randint(0, 10, (batch,), generator=g).to(device)}


def resident_bytes(model: nn.Module) -> int:
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[(str(t.device), t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(storages.values())


def run(case: Case, device: str, small: bool) -> list[dict]:
    torch.manual_seed(0)
    step_memory = case.small_step_memory if small else case.step_memory
    config = trady_peft.TraDyConfig(step_memory=step_memory, strategy="d-full-random", modules_to_save=case.heads)
    model = get_peft_model(case.build(small), config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    rows, cuda = [], device == "cuda"
    for shape in case.small_shapes if small else case.shapes:
        batch = batch_of(case, shape, device, vocab)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        model(**batch)["loss"].backward()  # warm-up: the probe (a reprice at the larger shape), the draw
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        warm_peak = torch.cuda.max_memory_allocated() if cuda else None
        measured = trady_peft.measure_training_step(model, batch, optimizer)
        counted = resident_bytes(model) + measured.saved_activations + measured.gradients + measured.optimizer_state
        adapter = measured.saved_by_module_type.get("TraDyLayer", 0)  # the selected channels' inputs
        for bank in (b.weight for b in model.base_model.trady_bank.values()):
            state = [v for v in optimizer.state.get(bank, {}).values() if torch.is_tensor(v) and v.shape == bank.shape]
            adapter += sum(
                t.numel() * t.element_size() for t in [bank, *state, *[g for g in [bank.grad] if g is not None]]
            )
        optimizer.zero_grad(set_to_none=True)
        summary = model.base_model.selection_summary()
        peak = max(warm_peak, measured.peak_allocated) if cuda else None
        rows.append(
            {
                "model": case.name,
                "input": list(next(iter(batch.values())).shape),
                "step_memory": parse_step_memory(step_memory).amount,
                "counted": counted,
                "saved_activations": measured.saved_activations,
                "peak": peak,
                "share": summary["budget"],
                "rest": summary["step_rest"],
                "rest_measured": counted - adapter,
                "adapter_priced": summary["selected_cost"],
                "channels": f"{summary['selected_channels']}/{summary['total_channels']}",
            }
        )
    return rows


def table(rows: list[dict], margin_mib: float, margin_fraction: float) -> str:
    def mib(n):
        return "-" if n is None else f"{n / MiB:,.2f}"

    lines = [
        "| model | input | step_memory (MiB) | counted step (MiB) | CUDA peak (MiB) | peak - bound (MiB) "
        "| adapter share (B) | adapter priced (B) | rest priced (B) | rest measured (B) | channels |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        over = None if r["peak"] is None else r["peak"] - r["step_memory"]
        lines.append(
            f"| {r['model']} | {r['input']} | {mib(r['step_memory'])} | {mib(r['counted'])} | {mib(r['peak'])} "
            f"| {mib(over)} | {r['share']:,} | {r['adapter_priced']:,} | {r['rest']:,} | {r['rest_measured']:,} "
            f"| {r['channels']} |"
        )
    lines.append(
        f"(a CUDA peak may exceed step_memory by the stated margin for transients: {margin_mib:g} MiB + "
        f"{margin_fraction:g} x step_memory)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny models and batches (a smoke run)")
    parser.add_argument("--margin-mib", type=float, default=64.0, help="transient memory allowed above the bound")
    parser.add_argument("--margin-fraction", type=float, default=0.15, help="and this fraction of the bound")
    parser.add_argument("--out", type=Path, default=None, help="a folder for step_memory.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("step_memory.py: no CUDA device, skipped (pass --device cpu for the counted steps on CPU)")
        return 0
    rows = [row for case in CASES for row in run(case, args.device, args.small)]
    for r in rows:
        r["margin"] = int(args.margin_mib * MiB + args.margin_fraction * r["step_memory"])
    print(table(rows, args.margin_mib, args.margin_fraction))
    failed = [r for r in rows if r["counted"] > r["step_memory"]]
    failed += [r for r in rows if r["peak"] is not None and r["peak"] > r["step_memory"] + r["margin"]]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_memory.json").write_text(json.dumps({"rows": rows}, indent=1))
    for r in failed:
        print(f"EXCEEDED: {r['model']} {r['input']}: counted {r['counted']:,} B, peak {r['peak']} B, bound "
              f"{r['step_memory']:,} B (+ margin {r['margin']:,} B for the peak)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
