"""benchmarks/gpu.sh (what a GPU session runs) and benchmarks/cuda_memory.py, exercised on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "OUT": str(tmp_path / "gpu"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_gpu_script_parses_and_its_dry_run_names_real_tests(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    done = run_script(tmp_path, GPU_SH_DRY_RUN="1", GPU_SH_ASSUME_CUDA="1")
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "gpu" / "summary.txt").read_text()
    for name in ("versions", "deepspeed_tests", "cuda_memory", "step_memory"):
        assert f"would run [{name}]" in summary
    # Every test the script names exists (a renamed test would silently run nothing on the GPU).
    targets = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", summary)
    assert targets
    for path, function in targets:
        assert (ROOT / path).is_file(), path
        if function:
            assert f"def {function}(" in (ROOT / path).read_text(), function


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_script_without_cuda_says_what_it_skipped_and_exits_0(tmp_path):
    done = run_script(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "skipped" in done.stdout
    assert not (tmp_path / "gpu" / "cuda_memory.json").exists()
    assert not (tmp_path / "gpu" / "step_memory.json").exists()


def test_cuda_memory_script_runs_its_steps_on_cpu(tmp_path):
    import cuda_memory

    args = ["--device", "cpu", "--out", str(tmp_path), "--seq", "8", "--hidden", "64", "--layers", "1"]
    assert cuda_memory.main([*args, "--vocab", "128", "--batch", "2", "--steps", "1", "--precisions", "bf16"]) == 0
    results = json.loads((tmp_path / "cuda_memory.json").read_text())
    runs = results["runs"]["bf16"]
    assert set(runs) == {"LoRA r=8", "TraDy"}
    for figures in runs.values():
        assert figures["saved_activations"] > 0 and figures["peak_bytes"] is None  # no allocator on CPU
        assert all(torch.isfinite(torch.tensor(figures["losses"])))
    assert "| bf16 | TraDy |" in (tmp_path / "cuda_memory.md").read_text()


def test_step_memory_script_counts_its_steps_within_the_bound_on_cpu(tmp_path, capsys):
    import step_memory

    assert step_memory.main(["--device", "cpu", "--small", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "step_memory.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["llama", "llama", "mobilenet_v2_w035", "mobilenet_v2_w035"]
    for r in rows:
        assert 0 < r["counted"] <= r["step_memory"] and r["peak"] is None  # no allocator on CPU
        assert r["share"] == r["step_memory"] - r["rest"] and r["adapter_priced"] <= r["share"]
        assert 0 < r["rest_measured"] <= r["rest"]  # the priced rest bounds what the step kept beside the adapter
    assert rows[1]["share"] < rows[0]["share"] and rows[3]["share"] < rows[2]["share"]  # repriced, larger batches
    assert "| llama | [2, 16] |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_step_memory_script_without_cuda_skips(capsys):
    import step_memory

    assert step_memory.main(["--device", "cuda"]) == 0
    assert "no CUDA device, skipped" in capsys.readouterr().out
