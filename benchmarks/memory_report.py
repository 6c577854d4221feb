"""Measured memory of one training step: TraDy vs peft LoRA vs full fine-tuning.

Writes ``docs/memory/<case>.png`` and ``docs/memory/results.json``, prints the tables, and rewrites
the generated blocks of README.md and docs/memory.md (between ``<!-- memory_report.py -->`` and
``<!-- /memory_report.py -->``) from what it measured. Cases:

* ``mbv2``: exactly the README's ``trady-peft memory`` command (:data:`MBV2_COMMAND`: MobileNetV2-w0.35
  with a 10-class head, 128x128, batch 32, the paper's smallest budget, 27,946 units), run through the
  CLI, with the analytic floor of the TraDy selection (its channels' inputs + 1 bit per ReLU6 element);
* ``bert``: a BERT-style encoder (4 layers, hidden 256), sequence 128, batch 8;
* ``llama``: a Llama-style decoder (4 layers, hidden 256), sequence 128, batch 8;
* ``transformers``: TraDy against its targets on transformers, `transformer_frozen_path.run` (Llama-, GPT-2- and
  BERT-style models, hidden 512, 6 layers, vocabulary 8,000, batch 8 x sequence 512; TraDy vs LoRA r=8,
  fp32, bf16 autocast, reentrant gradient checkpointing, ``max_depth``; the split by module type
  before/after the frozen-path twins; the step-time ratio), written to ``docs/memory/transformers.json``
  and the ``<!-- transformer_frozen_path.py -->`` block of docs/memory.md.

Run: ``python benchmarks/memory_report.py`` (``make memory-report``): a minute on 2 CPU cores for the
first three cases, about half an hour for ``transformers`` (``--cases transformers`` runs it alone;
``--transformer-seq 128`` for a quicker, smaller run, whose shape the block then states).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transformer_frozen_path as tfp  # noqa: E402
from paper_models import bert_like, llama_like  # noqa: E402

import trady_peft  # noqa: E402
from trady_peft import cli  # noqa: E402
from trady_peft.report import compare_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "memory"
# The README's command, word for word (run from the repository root). MobileNetV2-w0.35 has no
# importance table (no checkpoint offline), so the strategy is passed: the draw `trady` falls back to.
MBV2_COMMAND = [
    "memory",
    "--model",
    "benchmarks/paper_models.py:mobilenet_v2_w035_10",
    "--input-shape",
    "3,128,128",
    "--batch-size",
    "32",
    "--budget",
    "27946",
    "--strategy",
    "d-full-random",
    "--modules-to-save",
    "classifier",
    "--png",
    "docs/memory/mbv2.png",
]
BEGIN, END = "<!-- memory_report.py -->", "<!-- /memory_report.py -->"
TBEGIN, TEND = "<!-- transformer_frozen_path.py -->", "<!-- /transformer_frozen_path.py -->"
CASES = ("mbv2", "bert", "llama", "transformers")


def analytic_floor(trady_model: nn.Module, inputs: torch.Tensor | Mapping) -> dict[str, int]:
    """What a perfect implementation of the current selection must keep for backward, in bytes:
    the selected channels' input values (their `trady_peft.memory.budget.LayerCost` from the shape probe), plus
    one bit per element of every ReLU-family output between the lowest selected layer and the loss.
    ``inputs``: one batch, a tensor or a mapping of keyword arguments."""
    # The memory-saving twins subclass these, so they are covered too (ReLU6 is a Hardtanh).
    relu_types = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU)
    tuner = trady_peft.find_tuner(trady_model)
    name = tuner.active_adapters[0]
    order: list[tuple[nn.Module, int]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: order.append((mod, out.numel() if torch.is_tensor(out) else 0)))
        for m in trady_model.modules()
        if isinstance(m, (trady_peft.TraDyLayer, *relu_types))
    ]
    try:
        with torch.no_grad():
            trady_model(**inputs) if isinstance(inputs, Mapping) else trady_model(inputs)
    finally:
        for h in handles:
            h.remove()
    selected = 0
    for layer_name, layer in tuner.trady_layers(name):
        k = layer.trady_delta[name].count
        if k:
            cost = tuner.layer_costs[layer_name]
            selected += k * cost.activations * cost.batch_size * cost.activation_bytes
    first = next(
        i for i, (m, _) in enumerate(order) if isinstance(m, trady_peft.TraDyLayer) and m.trady_delta[name].count
    )
    masks = sum((n + 7) // 8 for m, n in order[first + 1 :] if isinstance(m, relu_types))
    return {"selected_activations": selected, "relu_masks": masks, "total": selected + masks}


def text_batch(batch: int, seq: int, causal: bool) -> dict:
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids if causal else torch.zeros(batch, dtype=torch.long)}


def run_mbv2(out: Path) -> dict:
    """Run :data:`MBV2_COMMAND` through the CLI (from the repository root) and keep what it printed."""
    args = cli.build_parser().parse_args(MBV2_COMMAND)
    args.png = os.path.relpath(out / "mbv2.png", ROOT)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        report = cli.memory_report(args)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print(report.table())
            print(f"bar chart: {report.plot(args.png)}")
    finally:
        os.chdir(cwd)
    x = cli.example_inputs(report.trady_model, args.input_shape, args.batch_size)
    floor = analytic_floor(report.trady_model, x)
    return {"report": report, "floor": floor, "printed": printed.getvalue(), "plotted": True}


def run_text(name: str) -> dict:
    causal = name == "llama"
    build = llama_like if causal else bert_like
    batch = text_batch(8, 128, causal)
    config = trady_peft.TraDyConfig(
        memory_budget=200_000,
        modules_to_save=None if causal else ["classifier"],
    )
    title = "Llama-style decoder" if causal else "BERT-style encoder"
    report = compare_memory(
        build, batch, config, description=f"{title} (4 layers, hidden 256), seq 128, batch 8, budget 200,000 units"
    )
    groups = report.row("TraDy").saved_by_group
    total = report.row("TraDy").memory.saved_activations
    fixed = sum(groups.get(g, 0) for g in ("attention", "normalization", "activations"))
    report.extra["TraDy's remaining saved activations"] = (
        f"{fixed / total:.0%} are the attention, normalization and GELU/SiLU path that gradients must cross "
        "whatever channels are chosen"
    )
    return {"report": report, "fixed_share": fixed / total}


def kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


def markdown(results: dict, reports: dict) -> str:
    """The generated block of README.md and docs/memory.md."""
    lines = ["```bash", "trady-peft " + " \\\n    ".join(_command_lines()), "```", ""]
    mbv2 = reports.get("mbv2")
    if mbv2 is not None:
        lines += [
            "prints (AdamW, 2-core CPU; `python benchmarks/memory_report.py` reruns it and regenerates this block "
            "and the chart):",
            "",
            "```",
            results["mbv2"]["printed"].rstrip(),
            "```",
            "",
        ]
    lines += ["| one training step | TraDy | LoRA r=8 | full FT |", "|---|---:|---:|---:|"]
    titles = {
        "mbv2": "**MobileNetV2-w0.35**, 128×128, batch 32, budget 27,946 units",
        "bert": "**BERT-style encoder** (4×256), seq 128, batch 8, budget 200,000 units",
        "llama": "**Llama-style decoder** (4×256), seq 128, batch 8, budget 200,000 units",
    }
    for case, report in reports.items():
        cells = [kib(report.row(m).memory.saved_activations) for m in ("TraDy", "LoRA", "full fine-tuning")]
        lines.append(f"| {titles[case]}: saved activations | **{cells[0]}** | {cells[1]} | {cells[2]} |")
        if case == "mbv2":
            state = [
                kib(r.memory.trainable_parameters + r.memory.gradients + r.memory.optimizer_state)
                for r in (report.row(m) for m in ("TraDy", "LoRA", "full fine-tuning"))
            ]
            lines.append(f"| trainable + gradients + AdamW state | {state[0]} | {state[1]} | {state[2]} |")
    lines.append("")
    if mbv2 is not None:
        floor = results["mbv2"]["floor"]
        trady = mbv2.row("TraDy").memory.saved_activations
        full = mbv2.row("full fine-tuning").memory.saved_activations
        selected = mbv2.trady_model.base_model.selection_summary()["selected_channels"]
        lines += [
            f"On MobileNetV2, TraDy keeps {trady / full:.1%} of full fine-tuning's activations, "
            f"{trady / floor['total'] - 1:.1%} above the analytic floor of its selection ({floor['total']:,} B: "
            f"the {selected} selected channels' inputs, {floor['selected_activations']:,} B, plus one bit per "
            f"ReLU6 element above the lowest selected layer, {floor['relu_masks']:,} B).",
            "Figures that look wrong at first sight, each explained by the command itself:",
            "",
            *[f"* {sentence}" for sentence in mbv2.explanations()],
            "",
        ]
    shares = [
        f"{results[c]['fixed_share']:.0%} ({n})" for c, n in (("bert", "BERT"), ("llama", "Llama")) if c in results
    ]
    if shares:
        lines.append(
            f"On the transformers, {' and '.join(shares)} of what TraDy still keeps is the attention, normalization "
            "and GELU/SiLU path that gradients must cross whatever channels are chosen; channel selection removes "
            "the rest."
        )
    return "\n".join(lines).rstrip() + "\n"


def _command_lines() -> list[str]:
    words = [shlex.quote(w) for w in MBV2_COMMAND]
    pairs, line = [], []
    for w in words:
        if w.startswith("--") and len(" ".join(line)) > 60:
            pairs.append(" ".join(line))
            line = []
        line.append(w)
    return [*pairs, " ".join(line)]


def run_transformers(out: Path, seq: int, time_seq: int) -> dict:
    """The transformers' table (`transformer_frozen_path.run`): results JSON and the markdown block."""
    shape = tfp.Shape(seq=seq)
    results = tfp.run(shape, time_shape=tfp.Shape(seq=time_seq))
    (out / "transformers.json").write_text(json.dumps(results, indent=2))
    command = "python benchmarks/memory_report.py --cases transformers" + (
        f" --transformer-seq {seq}" if seq != 512 else ""
    )
    note = f"Measured by `{command}` (`benchmarks/transformer_frozen_path.py`; 2-core CPU).\n\n"
    return {"results": results, "block": note + tfp.markdown(results)}


def update_docs(
    block: str, files=(ROOT / "README.md", ROOT / "docs" / "memory.md"), begin: str = BEGIN, end: str = END
) -> None:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    generated = f"{begin}\n{block}{end}"
    for path in files:
        text = path.read_text()
        if not pattern.search(text):
            raise SystemExit(f"{path}: no {begin} ... {end} block to regenerate")
        path.write_text(pattern.sub(lambda _: generated, text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--transformer-seq", type=int, default=512, help="sequence of the transformers case")
    parser.add_argument("--transformer-time-seq", type=int, default=128, help="sequence of its step-time ratio")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite README.md and docs/memory.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, reports = {}, {}
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases {args.cases!r}: unknown {unknown}; choose among {','.join(CASES)}")
    if "transformers" in cases:
        cases.remove("transformers")
        generated = run_transformers(out, args.transformer_seq, args.transformer_time_seq)
        print(generated["block"])
        if not args.no_docs:
            update_docs(generated["block"], files=(ROOT / "docs" / "memory.md",), begin=TBEGIN, end=TEND)
            print("regenerated the transformers block of docs/memory.md")
        results["transformers"] = generated["results"]
    for case in cases:
        result = run_mbv2(out) if case == "mbv2" else run_text(case)
        report = reports[case] = result["report"]
        print(result.get("printed") or report.table(), "\n")
        if not result.get("plotted"):
            report.plot(str(out / f"{case}.png"))
        results[case] = {
            "rows": {
                r.method: {
                    "saved_activations": r.memory.saved_activations,
                    "trainable_parameters": r.memory.trainable_parameters,
                    "gradients": r.memory.gradients,
                    "optimizer_state": r.memory.optimizer_state,
                    "weights": r.weights,
                    "saved_by_group": r.saved_by_group,
                }
                for r in report.rows
            },
            **{k: v for k, v in result.items() if k not in ("report", "plotted")},
        }
    if reports:
        saved = {k: v for k, v in results.items() if k != "transformers"}
        (out / "results.json").write_text(json.dumps(saved, indent=2))
        print(f"wrote {out}/results.json and one PNG per case")
    if not args.no_docs and set(reports) == {"mbv2", "bert", "llama"}:
        update_docs(markdown(results, reports))
        print("regenerated the memory blocks of README.md and docs/memory.md")
    return results


if __name__ == "__main__":
    main()
