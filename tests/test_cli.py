"""The `trady-peft` command line: the budget table, rank-layers and the memory command."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from trady_peft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_budget_command_prints_the_table(capsys):
    spec = f"{ROOT / 'benchmarks' / 'paper_models.py'}:mobilenet_v2_w035"
    assert main(["budget", "--model", spec, "--input-shape", "3,128,128", "--convs-only"]) == 0
    out = capsys.readouterr().out
    assert "288,864" in out and "963,456" in out and "1,252,320" in out
    assert out.count("\n") > 52  # one row per convolution
    with pytest.raises(SystemExit):
        main(["budget", "--model", spec, "--input-shape", "3,a,128"])  # not a shape
    with pytest.raises(SystemExit, match="Check --input-shape"):
        main(["budget", "--model", spec, "--input-shape", "128,128"])  # not this model's input


def test_rank_layers_command_writes_an_entry(tmp_path, capsys):
    out = tmp_path / "cnn.json"
    code = main(
        [
            "rank-layers",
            "--model",
            f"{ROOT / 'tests' / 'tiny_models.py'}:tiny_cnn",
            "--data",
            f"{ROOT / 'tests' / 'tiny_models.py'}:colour_images_loader",
            "--steps",
            "3",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and "top-K" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["scores"]) == {"stem", "dw", "pw"}


def test_rank_layers_command_with_an_xy_dataloader(tmp_path, capsys):
    factories = tmp_path / "factories.py"
    factories.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torch.utils.data import DataLoader, TensorDataset

            def model():
                return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

            def data():
                g = torch.Generator().manual_seed(0)
                x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
                return DataLoader(TensorDataset(x, y), batch_size=4)
            """
        )
    )
    out_json = tmp_path / "seq.json"
    code = main(
        ["rank-layers", "--model", f"{factories}:model", "--data", f"{factories}:data", "--steps", "4"]
        + ["--output", str(out_json)]
    )
    assert code == 0 and out_json.exists()
    assert "layers ranked" in capsys.readouterr().out


def test_budget_table_in_bytes_names_the_unit_of_every_column(capsys):
    from pathlib import Path

    spec = f"{Path(__file__).resolve().parent / 'tiny_models.py'}:tiny_cnn"
    assert main(["budget", "--model", spec, "--input-shape", "3,16,16", "--unit", "bytes", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    units = lines[1].split()
    assert units == ["(values)", "(values)", "(bytes)", "(bytes)"], lines[:2]
    assert any(line.startswith("weights + activations (bytes)") for line in lines)


def test_memory_command_titles_with_the_model_name_and_budget_and_explains_odd_figures(tmp_path, capsys):
    from pathlib import Path

    spec = f"{Path(__file__).resolve().parent / 'tiny_models.py'}:tiny_cnn"
    argv = ["memory", "--model", spec, "--input-shape", "3,16,16", "--batch-size", "4", "--budget", "300"]
    assert main([*argv, "--strategy", "d-full-random", "--modules-to-save", "classifier"]) == 0
    out = capsys.readouterr().out
    title = out.splitlines()[0]
    assert title.startswith("tiny_cnn: ") and "budget 300 units" in title and str(Path(spec).parent) not in title
    assert "LoRA's weights exceed full fine-tuning's" in out and "modules_to_save" in out
