"""Peak CUDA memory of a training step: TraDy vs peft LoRA on a Llama-style decoder, bf16.

Run by ``benchmarks/gpu.sh`` on a machine with a GPU. The model, the methods and the budget are
those of the CPU tables (`transformer_frozen_path`): ``LlamaForCausalLM`` built from config
(hidden 512, 6 layers, vocabulary 8,000), LoRA ``r=8`` on every layer TraDy wraps, TraDy with the
byte budget whose bank holds 1% of the parameters (``d-full-random``). Precisions: ``bf16`` (the
model's weights cast to bfloat16; both adapters keep fp32 trainable values) and ``autocast``
(fp32 weights, ``torch.autocast("cuda", torch.bfloat16)``).

Measured by the CUDA caching allocator's counters (``torch.cuda.memory_allocated`` and
``max_memory_allocated``), which know nothing of TraDy, per method in a fresh model:

* ``resident_bytes``: allocated after a warm-up step (weights, adapter, AdamW state; gradients
  freed by ``zero_grad(set_to_none=True)``);
* ``peak_bytes``: the most allocated during the next steps (forward, backward, AdamW step);
* ``step_bytes = peak_bytes - resident_bytes``: activations, gradients and transient buffers;
* ``saved_activations``: what autograd keeps for backward (`trady_peft.measure_training_step`,
  saved-tensor hooks), a cross-check of the step's main term;
* ``step_ms``: median wall time of the measured steps (``torch.cuda.synchronize`` around each).

    PYTHONPATH=. python benchmarks/cuda_memory.py --out build/gpu            # writes cuda_memory.json/.md
    PYTHONPATH=. python benchmarks/cuda_memory.py --device cpu --seq 16 --hidden 64 --layers 2 --vocab 256

Without CUDA it prints what it skipped and exits 0; ``--device cpu`` runs the same steps on CPU
(no allocator figures), the smoke test of tests/project/test_gpu_script.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_frozen_path import Method, Shape, budget_bytes, make, parameter_count  # noqa: E402

import trady_peft  # noqa: E402

METHODS = (Method("LoRA r=8", "lora"), Method("TraDy", "trady"))
PRECISIONS = ("bf16", "autocast")


def measure(method: Method, shape: Shape, budget: int, precision: str, device: str, steps: int) -> dict:
    """Train ``method`` for 1 + ``steps`` AdamW steps on ``device``; return its figures."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    model = make("llama", shape, method, budget)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(device), "labels": ids.to(device)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True" below TraDy's layers
        step()  # warm-up: AdamW state, TraDy's draw at the first training forward
        if cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(step())
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        with autocast:
            saved = trady_peft.measure_training_step(model, inputs).saved_activations
        optimizer.zero_grad(set_to_none=True)
    out = {
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "resident_bytes": resident if cuda else None,
        "peak_bytes": peak,
        "step_bytes": peak - resident if cuda else None,
        "saved_activations": saved,
        "step_ms": statistics.median(times),
        "losses": losses,
    }
    return out


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def markdown(results: dict) -> str:
    lines = [
        f"Llama-style decoder, {results['shape']}, on {results['device_name']}; TraDy budget "
        f"{results['budget_bytes']:,} B (bank = 1% of {results['parameters']:,} parameters).",
        "",
        "| precision | method | trainable values | resident MiB | peak MiB | step MiB (peak - resident) "
        "| saved activations MiB | step ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, methods in results["runs"].items():
        for name, r in methods.items():
            lines.append(
                f"| {precision} | {name} | {r['trainable_values']:,} | {mib(r['resident_bytes'])} | "
                f"{mib(r['peak_bytes'])} | {mib(r['step_bytes'])} | {mib(r['saved_activations'])} | "
                f"{r['step_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/gpu"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=5, help="measured steps after the warm-up one")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_memory.py: no CUDA device, skipped (pass --device cpu for the CPU smoke run)")
        return 0
    shape = Shape(hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64), vocab=args.vocab)
    shape.batch, shape.seq = args.batch, args.seq
    parameters = parameter_count("llama", shape)
    budget = budget_bytes(parameters)
    results = {
        "shape": shape.describe(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": parameters,
        "budget_bytes": budget,
        "runs": {
            precision: {m.name: measure(m, shape, budget, precision, args.device, args.steps) for m in METHODS}
            for precision in args.precisions
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "cuda_memory.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
