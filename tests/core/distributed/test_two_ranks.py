"""Two CPU processes (gloo) against one: ranks draw identical channels and end identical; FSDP2 and
DeepSpeed ZeRO runs match one process across periods, save and resume; a bank sharded by FSDP2
without the helper is refused on every rank."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.processes import run_processes


def run_two_ranks(worker: str, *args: str) -> None:
    """`run_processes` with two ranks."""
    run_processes(worker, 2, *args)


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("strategy", ["trady", "medyate"])
def test_two_ranks_agree_on_every_selection_and_end_identical(strategy, tmp_path):
    run_two_ranks("tests.core.distributed.distributed_worker", strategy, str(tmp_path))
    sel = [json.loads((tmp_path / f"selections{r}.json").read_text()) for r in range(2)]
    assert sel[0] == sel[1]
    assert sel[0][0] != sel[0][1]  # channels really were redrawn between epochs
    a, b = (torch.load(tmp_path / f"adapter{r}.pt") for r in range(2))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # two processes, and one
@pytest.mark.parametrize(
    "mode",
    [
        "fsdp2",
        "ddp",
        *(
            pytest.param(m, marks=pytest.mark.skipif(not importlib.util.find_spec("deepspeed"), reason="no DeepSpeed"))
            for m in ("zero2", "zero3")
        ),
    ],
)
def test_det_rgn_scores_on_two_ranks_are_the_mean_of_each_ranks_scores(mode, tmp_path):
    """Each rank scores its own batches (FSDP2: through the sharded root, no weight gradient); both
    draw from the mean of the two ranks' scores, which one process computes batch set by batch set."""
    run_two_ranks("tests.core.distributed.scoring_worker", mode, str(tmp_path))
    run_processes("tests.core.distributed.scoring_worker", 1, "single", str(tmp_path))
    ranks = [json.loads((tmp_path / f"{mode}{r}.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "single.json").read_text())
    assert ranks[0] == ranks[1]
    for name, norms in ranks[0].items():
        mean = (torch.tensor(single["0"][name]) + torch.tensor(single["1"][name])) / 2
        torch.testing.assert_close(torch.tensor(norms), mean, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ FSDP2
def run_ranks(mode: str, phase: str, out: Path) -> None:
    """Run the two ranks of tests/core/distributed/fsdp_worker.py and fail with their stderr if one fails."""
    run_two_ranks("tests.core.distributed.fsdp_worker", mode, phase, str(out))


def adapter_values(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    # Not `trady_state`: it holds the probe's prices, measured on 4 rows per rank against 8 in one process.
    tensors = load_file(directory / "adapter_model.safetensors")
    return {k: v for k, v in tensors.items() if k.endswith(("trady_indices", "trady_values"))}


@pytest.mark.slow  # two processes, twice (about 30 s per launch on a busy 2-core machine)
@pytest.mark.parametrize("mode", ["fsdp2", "accelerate"])
def test_fsdp2_matches_one_process_across_periods_save_and_resume(mode, tmp_path):
    """FSDP2 (fully_shard, or accelerate's FSDP2 plugin) on 2 gloo ranks, each on half of every batch:
    three periods with a mid-period save_pretrained, then a reload in fresh processes that finishes
    the period and trains one more. Every rank draws the same channels and the adapters equal a
    one-process run on the whole batches (the worker asserts FSDP sharded the model, not the bank)."""
    from tests.core.distributed import fsdp_worker

    distributed, single = tmp_path / "fsdp", tmp_path / "single"
    distributed.mkdir(), single.mkdir()
    run_ranks(mode, "train", distributed)
    run_ranks(mode, "resume", distributed)  # fresh processes, from the mid-period adapter
    for phase in ("train", "resume"):
        fsdp_worker.main(0, 1, "single", phase, str(single), 0)
    for phase in ("train", "resume"):
        ranks = [json.loads((distributed / f"{phase}_selections{r}.json").read_text()) for r in range(2)]
        reference = json.loads((single / f"{phase}_selections0.json").read_text())
        assert ranks[0] == ranks[1] == reference, phase
    train = json.loads((single / "train_selections0.json").read_text())
    assert train[0] != train[1] != train[2]  # channels really were redrawn
    resumed = json.loads((single / "resume_selections0.json").read_text())
    assert resumed[0] == train[2]  # the reload restored the mid-period selection
    for saved, expected in [("mid", "mid"), ("final0", "final0"), ("final1", "final0")]:
        got, want = adapter_values(distributed / saved), adapter_values(single / expected)
        assert got.keys() == want.keys()
        for key in got:
            if key.endswith("trady_indices"):
                assert torch.equal(got[key], want[key]), key
            else:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        assert any(v.abs().max() > 1e-3 for k, v in want.items() if "values" in k)  # something trained
    # The placement (docs/distributed.md): the frozen weights are sharded, the bank is whole on each rank
    # (parameter + AdamW's two moments, 12 bytes a value between steps).
    for rank in range(2):
        held = json.loads((distributed / f"train_memory{rank}.json").read_text())
        assert held["bank"] == 12 * held["bank_values"] > 0
        assert held["frozen_local"] <= held["frozen_full"] // 2 + 4096  # a half, give or take dim-0 padding


@pytest.mark.slow  # two processes
def test_fsdp2_without_the_helper_is_refused_on_every_rank(tmp_path):
    run_ranks("fsdp2", "unignored", tmp_path)
    for rank in range(2):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert "trady_peft.fsdp_ignored_params(model)" in message
        assert "every rank would train its own adapter" in message


# -------------------------------------------------------------------------------- DeepSpeed ZeRO
@pytest.mark.slow  # two processes, twice
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process_across_periods_save_and_resume(stage, tmp_path):
    """DeepSpeed ZeRO-2/ZeRO-3 (``deepspeed.initialize``, gloo on CPU; ZeRO-3 partitions the bank) on
    2 ranks against a one-process run: the period change zeroes the bank's fp32 master copy and its
    momentum, a mid-period save gathers the bank, a reload in fresh processes trains on.

    DeepSpeed is not a dependency; it runs on CPU (its CPU accelerator, gloo) when installed, e.g.
    ``pip install --no-deps --target DIR deepspeed hjson ninja py-cpuinfo msgpack einops`` then
    ``PYTHONPATH=DIR pytest -m slow tests/core/distributed/test_two_ranks.py``.
    """
    from tests.core.distributed import fsdp_worker

    distributed, single = tmp_path / "zero", tmp_path / "single"
    distributed.mkdir(), single.mkdir()
    run_ranks(f"zero{stage}", "train", distributed)
    run_ranks(f"zero{stage}", "resume", distributed)
    for phase in ("train", "resume"):
        fsdp_worker.main(0, 1, "single_sgd", phase, str(single), 0)
    for phase in ("train", "resume"):
        ranks = [json.loads((distributed / f"{phase}_selections{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1] == json.loads((single / f"{phase}_selections0.json").read_text()), phase
    for saved, expected in [("mid", "mid"), ("final0", "final0"), ("final1", "final0")]:
        got, want = adapter_values(distributed / saved), adapter_values(single / expected)
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
