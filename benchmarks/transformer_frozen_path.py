"""TraDy's saved activations and step time against peft LoRA on transformers, and their targets.

Every figure is measured by `trady_peft.measure_training_step` (saved-tensor hooks: the distinct
storages autograd keeps for backward, parameters and buffers excluded) on a fresh model built from
config, on CPU. At equal batch and sequence, for three shapes of the same size (hidden 512, 6 layers,
8 heads, vocabulary 8,000):

* **Llama-style** ``LlamaForCausalLM`` (SiLU gated MLP, intermediate 1,376), **GPT-2-style**
  ``GPT2LMHeadModel`` (GELU-new, dropout 0.1, intermediate 2,048) and **BERT-style**
  ``BertForSequenceClassification`` (GELU, dropout 0.1, intermediate 2,048, the classifier trained in full
  by both methods through ``modules_to_save``);
* **LoRA**: peft ``LoraConfig(r=8)`` on every layer TraDy wraps (every linear layer but the output head);
* **TraDy**: a byte budget whose trainable bank is 1% of the model's parameters (printed), drawn
  with ``d-full-random`` (no importance table covers these config-built models); also with
  ``max_depth`` (only the blocks nearest the output drawn from: backprop stops higher), and with the
  stock frozen path (``memory_saving_frozen_path=False``), the "before" of the split by module type;
* precision: fp32, and bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``, fp32 weights);
* gradient checkpointing (Llama): ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
  {"use_reentrant": True})`` for **both** methods. The reentrant checkpoint keeps each block's inputs
  through ``save_for_backward``, which the saved-tensor hooks see; what the backward's recomputation
  keeps for a moment is not counted, for either method.

Step time: TraDy (default settings of the table) and LoRA trained in the same process, steps
interleaved (forward, backward, AdamW step), median of ``--steps`` steps after ``--warmup`` steps
each, on the Llama-style model at ``--time-seq`` tokens (a smaller shape than the memory table).

    PYTHONPATH=. python benchmarks/transformer_frozen_path.py                  # all, seq 512, batch 8
    PYTHONPATH=. python benchmarks/transformer_frozen_path.py --seq 64 --families llama --no-time  # quick

`benchmarks/memory_report.py` (``make memory-report``) calls `run` and writes the tables into
docs/memory.md. Twins installed by ``trady_peft`` (``apply_memory_saving``) are picked up as they come.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model

import trady_peft
from trady_peft.core.targets import default_targets
from trady_peft.memory.budget import bytes_per_trained_value
from trady_peft.report import stock_type_name

FAMILIES = ("llama", "gpt2", "bert")
TITLES = {"llama": "Llama-style", "gpt2": "GPT-2-style", "bert": "BERT-style"}
#: The targets: TraDy's saved activations over LoRA's must not exceed these.
TARGETS = {
    ("llama", "fp32", False): 0.5,
    ("llama", "bf16 autocast", False): 0.5,
    ("llama", "fp32", True): 0.6,
    ("llama", "bf16 autocast", True): 0.6,
    ("gpt2", "fp32", False): 0.6,
    ("bert", "fp32", False): 0.6,
}
STEP_TIME_TARGET = 1.3
BUDGET_SHARE = 0.01  # TraDy's trainable bank: 1% of the model's parameters
BANK_SHARE = 0.5  # TraDyConfig's default


@dataclass
class Shape:
    hidden: int = 512
    layers: int = 6
    heads: int = 8
    vocab: int = 8000
    batch: int = 8
    seq: int = 512

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads, vocab {self.vocab:,}, "
            f"batch {self.batch} x seq {self.seq}"
        )


def build(family: str, shape: Shape) -> torch.nn.Module:
    """A fresh model of ``family`` built from config (seeded, fp32, training mode)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    positions = max(shape.seq, 64)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=round(shape.hidden * 2.6875),  # 1,376 at hidden 512
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=positions,
            use_cache=False,  # a training cache would hold k and v outside autograd's saved tensors
        )
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=shape.vocab,
            n_embd=shape.hidden,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_positions=positions,
            use_cache=False,  # a training cache would hold k and v outside autograd's saved tensors
        )
        model = GPT2LMHeadModel(config)
    elif family == "bert":
        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=4 * shape.hidden,
            max_position_embeddings=positions,
            num_labels=2,
        )
        model = BertForSequenceClassification(config)
    else:
        raise ValueError(f"family={family!r}: choose one of {FAMILIES}")
    return model.train()


def batch_of(family: str, shape: Shape) -> dict:
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    if family == "bert":
        return {"input_ids": ids, "labels": torch.arange(shape.batch) % 2}
    return {"input_ids": ids, "labels": ids}


def heads(family: str) -> list[str] | None:
    return ["classifier"] if family == "bert" else None


def parameter_count(family: str, shape: Shape) -> int:
    return sum(p.numel() for p in build(family, shape).parameters())


def budget_bytes(parameters: int) -> int:
    """The byte budget whose bank (``bank_share`` of it) holds 1% of ``parameters`` trainable values."""
    return int(BUDGET_SHARE * parameters) * bytes_per_trained_value(8) * 2


@dataclass
class Method:
    name: str
    kind: str  # "lora" or "trady"
    options: dict = field(default_factory=dict)


def make(family: str, shape: Shape, method: Method, budget: int) -> torch.nn.Module:
    base = build(family, shape)
    if method.kind == "lora":
        targets = default_targets(base, trady_peft.TraDyConfig(modules_to_save=heads(family)))
        config = LoraConfig(r=8, target_modules=targets, modules_to_save=heads(family))
    else:
        config = trady_peft.TraDyConfig(
            memory_budget=f"{budget}B",
            strategy="d-full-random",
            modules_to_save=heads(family),
            **method.options,
        )
    return get_peft_model(base, config).train()


def _precision(precision: str):
    if precision == "bf16 autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _checkpointing(model, on: bool) -> None:
    if on:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gradient_checkpointing_enable's deprecation notice
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def measure(family, shape, method, budget, precision="fp32", checkpointing=False) -> dict:
    """One measured training step (forward + backward) of ``method``: saved bytes, by module type."""
    model = make(family, shape, method, budget)
    _checkpointing(model, checkpointing)
    inputs = batch_of(family, shape)
    with _precision(precision), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True" below TraDy's layers
        start = time.perf_counter()
        mem = trady_peft.measure_training_step(model, inputs)
        seconds = time.perf_counter() - start
    out = {
        "saved_activations": mem.saved_activations,
        "saved_by_module_type": dict(mem.saved_by_module_type),
        "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss": mem.loss,
        "seconds": seconds,
    }
    if method.kind == "trady":
        tuner = model.base_model
        layers = [n for n, layer in tuner.trady_layers("default") if layer.trady_delta["default"].count]
        out["lowest_selected_layer"] = layers[0] if layers else None
        out["selected_channels"] = tuner.selection_summary()["selected_channels"]
        out["bank_values"] = tuner.trady_bank["default"].weight.numel()
    print(
        f"# {family} {precision}{' +checkpointing' if checkpointing else ''} {method.name}: "
        f"{mem.saved_activations / 2**20:,.1f} MiB saved, step {seconds:.1f} s",
        file=sys.stderr,
    )
    return out


def step_times(shape: Shape, budget: int, steps: int, warmup: int, family: str = "llama") -> dict:
    """Median seconds of a training step (forward, backward, AdamW), TraDy and LoRA interleaved."""
    inputs = batch_of(family, shape)
    models = {
        "TraDy": make(family, shape, Method("TraDy", "trady"), budget),
        "LoRA": make(family, shape, Method("LoRA", "lora"), budget),
    }
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + steps):
        for name in ("TraDy", "LoRA") if i % 2 == 0 else ("LoRA", "TraDy"):
            model, optimizer = models[name], optimizers[name]
            start = time.perf_counter()
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": shape.describe(),
        "steps": steps,
        "warmup": warmup,
        "median_seconds": medians,
        "ratio": medians["TraDy"] / medians["LoRA"],
    }


def run(
    shape: Shape | None = None,
    families=FAMILIES,
    max_depth: int = 2,
    time_shape: Shape | None = None,
    steps: int = 15,
    warmup: int = 3,
) -> dict:
    """Measure every case of the table; returns a JSON-able dict (see `markdown`)."""
    shape = shape or Shape()
    results: dict = {"shape": shape.describe(), "max_depth": max_depth, "families": {}}
    default = Method("TraDy", "trady")
    deep_stock = Method("TraDy, stock frozen path", "trady", {"memory_saving_frozen_path": False})
    shallow = Method(f"TraDy, max_depth={max_depth}", "trady", {"max_depth": max_depth})
    lora = Method("LoRA r=8", "lora")
    for family in families:
        params = parameter_count(family, shape)
        budget = budget_bytes(params)
        cases = [("fp32", False)]
        if family == "llama":
            cases += [("bf16 autocast", False), ("fp32", True), ("bf16 autocast", True)]
        rows = {}
        for precision, checkpointing in cases:
            methods = [lora, default, shallow] + (
                [deep_stock] if (precision, checkpointing) == ("fp32", False) else []
            )
            key = f"{precision}{', checkpointing' if checkpointing else ''}"
            rows[key] = {
                "precision": precision,
                "checkpointing": checkpointing,
                "target": TARGETS.get((family, precision, checkpointing)),
                "methods": {m.name: measure(family, shape, m, budget, precision, checkpointing) for m in methods},
            }
        results["families"][family] = {"parameters": params, "budget_bytes": budget, "cases": rows}
    if time_shape is not None:
        budget = budget_bytes(parameter_count("llama", time_shape))
        results["step_time"] = step_times(time_shape, budget, steps, warmup)
    return results


# ----------------------------------------------------------------------------- tables
row_key = stock_type_name  # a twin counts with the stock class it replaces


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(results: dict) -> str:
    """The ratio table and, per family, the split of saved activations by module type."""
    lines = [
        f"Shapes: {results['shape']}; CPU; one training step, saved activations in MiB (saved-tensor hooks). "
        f"TraDy's bank is 1% of the model's parameters (byte budget printed per model); "
        f"`max_depth={results['max_depth']}` draws only from the {results['max_depth']} blocks nearest the output.",
        "",
        "| model | precision | LoRA r=8 | TraDy | TraDy / LoRA | "
        f"TraDy, max_depth={results['max_depth']} | its / LoRA | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family, fam in results["families"].items():
        for key, case in fam["cases"].items():
            m = case["methods"]
            lora = m["LoRA r=8"]["saved_activations"]
            trady = m["TraDy"]["saved_activations"]
            shallow = m[f"TraDy, max_depth={results['max_depth']}"]["saved_activations"]
            target = f"≤ {case['target']}" if case["target"] is not None else ""
            lines.append(
                f"| {TITLES[family]} | {key} | {_mib(lora)} | {_mib(trady)} | **{trady / lora:.2f}** | "
                f"{_mib(shallow)} | **{shallow / lora:.2f}** | {target} |"
            )
    lines.append("")
    for family, fam in results["families"].items():
        trady = fam["cases"]["fp32"]["methods"]["TraDy"]
        lora = fam["cases"]["fp32"]["methods"]["LoRA r=8"]
        lines.append(
            f"* {TITLES[family]}: {fam['parameters']:,} parameters; TraDy budget {fam['budget_bytes']:,} B, bank "
            f"{trady['bank_values']:,} trainable values ({trady['bank_values'] / fam['parameters']:.2%}), "
            f"{trady['selected_channels']:,} channels, lowest selected layer `{trady['lowest_selected_layer']}`; "
            f"LoRA {lora['trainable_values']:,} trainable values."
        )
    timing = results.get("step_time")
    if timing:
        med = timing["median_seconds"]
        lines += [
            f"* Step time (forward, backward, AdamW; Llama-style at {timing['shape']}; TraDy and LoRA interleaved in "
            f"one process, median of {timing['steps']} steps after {timing['warmup']} warm-up steps each): TraDy "
            f"{med['TraDy']:.3f} s, LoRA {med['LoRA']:.3f} s, ratio **{timing['ratio']:.2f}** "
            f"(target ≤ {STEP_TIME_TARGET}).",
        ]
    for family, fam in results["families"].items():
        methods = fam["cases"]["fp32"]["methods"]
        order = ["TraDy, stock frozen path", "TraDy", f"TraDy, max_depth={results['max_depth']}", "LoRA r=8"]
        order = [o for o in order if o in methods]
        kinds = sorted({row_key(k) for o in order for k in methods[o]["saved_by_module_type"]})
        lines += [
            "",
            f"**{TITLES[family]}, fp32: saved activations by module type (MiB)**. Stock frozen path = before the "
            "twins; a twin's bytes count in the row of the class it replaces.",
            "",
            "| module type | " + " | ".join(order) + " |",
            "|---|" + "---:|" * len(order),
        ]
        for kind in kinds:
            cells = [
                _mib(sum(v for k, v in methods[o]["saved_by_module_type"].items() if row_key(k) == kind))
                for o in order
            ]
            if any(c != "0.0" for c in cells):
                lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append(
            "| **total** | " + " | ".join(f"**{_mib(methods[o]['saved_activations'])}**" for o in order) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--max-depth", type=int, default=2)
    parser.add_argument("--time-seq", type=int, default=128, help="sequence of the step-time comparison")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-time", action="store_true", help="skip the step-time comparison")
    args = parser.parse_args(argv)
    shape = Shape(args.hidden, args.layers, args.heads, args.vocab, args.batch, args.seq)
    time_shape = (
        None if args.no_time else Shape(args.hidden, args.layers, args.heads, args.vocab, args.batch, args.time_seq)
    )
    results = run(shape, args.families.split(","), args.max_depth, time_shape, args.steps, args.warmup)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
