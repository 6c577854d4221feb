"""Whole-network saving on MobileNetV2-w0.35 against its analytic floor, and the memory command."""

from __future__ import annotations

from pathlib import Path

import torch
from memory_report import analytic_floor  # benchmarks/, on pytest's pythonpath
from paper_models import mobilenet_v2_w035

import trady_peft
from trady_peft.cli import main
from trady_peft.report import compare_memory

ROOT = Path(__file__).resolve().parents[2]


def test_mobilenet_v2_saves_over_90_percent_and_sits_near_the_analytic_floor():
    x = torch.randn(32, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    config = trady_peft.TraDyConfig(memory_budget=27_946, modules_to_save=["classifier"])
    report = compare_memory(lambda: mobilenet_v2_w035(num_classes=10), x, config)
    trady = report.row("TraDy").memory.saved_activations
    full = report.row("full fine-tuning").memory.saved_activations
    lora = report.row("LoRA").memory.saved_activations
    floor = analytic_floor(report.trady_model, x)["total"]
    assert trady <= 0.10 * full and trady <= 0.10 * lora, (trady, full, lora)
    assert floor <= trady <= 2 * floor, (trady, floor)


def test_memory_command_prints_the_table_and_saves_a_png(tmp_path, capsys):
    png = tmp_path / "memory.png"
    spec = f"{ROOT / 'tests' / 'tiny_models.py'}:tiny_cnn"
    code = main(
        [
            "memory",
            "--model",
            spec,
            "--input-shape",
            "3,16,16",
            "--batch-size",
            "4",
            "--modules-to-save",
            "classifier",
            "--png",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for method in ("TraDy", "LoRA", "full fine-tuning"):
        assert method in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_command_documents_itself(capsys):
    try:
        main(["memory", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert "TraDy" in out and "--budget" in out and "--png" in out


def test_memory_command_splits_tradys_saved_activations_by_module_type_before_and_after_the_twins(capsys):
    """Where the remaining bytes live, stock frozen path vs twins, by module type."""
    spec = f"{ROOT / 'tests' / 'tiny_models.py'}:tiny_llama"
    argv = ["memory", "--model", spec, "--input-shape", "16", "--batch-size", "2", "--strategy", "d-full-random"]
    assert main([*argv, "--max-depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "max_depth 1" in out.splitlines()[0]
    section = out.split("saved activations by module type, TraDy before (stock frozen path) and after")[1]
    header, *rows = section.split("\n\n")[0].splitlines()[1:]
    assert header.split() == ["module", "type", "TraDy,", "stock", "path", "TraDy,", "twins", "LoRA"]
    kib = {line.split()[0]: [int(v.replace(",", "")) for v in line.split()[1::2]] for line in rows}
    assert kib["SiLUActivation"][0] > 0 and kib["SiLUActivation"][1] == 0  # the twin keeps nothing of its own
    assert kib["total"][1] < kib["total"][0] < kib["total"][2]
    trady_row = next(line for line in out.splitlines() if line.startswith("TraDy "))
    assert trady_row.split()[-2] == f"{kib['total'][1]:,}"  # the split adds up to the measured total
    assert main([*argv, "--no-frozen-path-split"]) == 0
    assert "TraDy before (stock frozen path)" not in capsys.readouterr().out


def test_the_transformers_memory_block_is_the_output_of_its_benchmark():
    """docs/memory.md's transformers table is `transformer_frozen_path.markdown` of the saved measurement."""
    import json

    import memory_report  # benchmarks/, on pytest's pythonpath
    import transformer_frozen_path

    results = json.loads((ROOT / "docs" / "memory" / "transformers.json").read_text())
    block = (ROOT / "docs" / "memory.md").read_text().split(memory_report.TBEGIN)[1].split(memory_report.TEND)[0]
    assert transformer_frozen_path.markdown(results) in block
    for family in ("llama", "gpt2", "bert"):
        trady = results["families"][family]["cases"]["fp32"]["methods"]["TraDy"]
        assert trady["bank_values"] <= 0.01 * results["families"][family]["parameters"]  # the bank: 1% of them
