"""DeepSpeed ZeRO-2/ZeRO-3 through the Hugging Face Trainer (``TrainingArguments(deepspeed=...)``
with ``TraDyCallback``), against the same Trainer without DeepSpeed
(tests/core/distributed/trainer_deepspeed_worker.py).

* CPU (``use_cpu=True``, gloo, DeepSpeed's CPU accelerator): one process and two.
* CUDA (nccl): one rank and two ranks (one GPU each); skipped without the GPUs.

DeepSpeed is not a dependency: every test here is skipped when it is not importable (install it
beside the project, e.g. ``pip install --no-deps --target DIR deepspeed hjson ninja py-cpuinfo
msgpack einops``, then ``PYTHONPATH=DIR pytest -m slow tests/core/distributed/test_deepspeed_trainer.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests.processes import run_processes
from tests.tiny_models import tiny_llama

WORKER = "tests.core.distributed.trainer_deepspeed_worker"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (not a dependency)"
)


def cuda_env() -> dict[str, str]:
    """What a CUDA rank needs from the caller's environment (run_processes starts from a bare one)."""
    keys = ("PATH", "HOME", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_VISIBLE_DEVICES", "TMPDIR")
    return {k: os.environ[k] for k in keys if k in os.environ}


def train(mode: str, device: str, world: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # DeepSpeed picks its accelerator when first imported: CPU runs say it, also on a machine with a GPU.
    env = cuda_env() if device == "cuda" else {"DS_ACCELERATOR": "cpu"}
    run_processes(WORKER, world, mode, device, str(out), env=env)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The plain Trainer run (no DeepSpeed) per device, trained once per module."""
    cache = {}

    def get(device: str) -> Path:
        if device not in cache:
            cache[device] = train("plain", device, 1, tmp_path_factory.mktemp(f"plain_{device}"))
        return cache[device]

    return get


def folded(model) -> dict[str, list[torch.Tensor]]:
    tuner = model.base_model
    return {n: [t.detach().cpu() for t in m.fold("default")] for n, m in tuner.trady_layers("default")}


def assert_same_adapter(got: dict, want: dict, rtol: float, atol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert torch.equal(got[name][0].long(), want[name][0].long()), f"{what}: {name} indices"
        torch.testing.assert_close(got[name][1], want[name][1], rtol=rtol, atol=atol, msg=f"{what}: {name}")


def check(out: Path, reference: Path, stage: int, world: int, rtol: float, atol: float) -> None:
    """What every Trainer + DeepSpeed run must show (see the module docstring)."""
    run, plain = torch.load(out / "trained.pt"), torch.load(reference / "trained.pt")
    info = run["info"]
    # DeepSpeed really ran, on every rank, with the global batch of the reference.
    assert (info["engine"], info["stage"], info["world"], info["train_batch_size"]) == (
        "DeepSpeedEngine",
        stage,
        world,
        8,
    )
    if stage == 3:  # the bank itself is partitioned: numel() is 0, each rank holds a 1/world share
        assert info["zero3_param"] and info["bank_local_numel"] == 0, info
        assert info["bank_partition_numel"] == -(-info["bank_numel"] // world), info
    assert info["period"] == plain["info"]["period"] == 1
    # Every rank drew the reference's channels, and epoch 1 redrew them.
    wanted = json.loads((reference / "selections0.json").read_text())
    assert wanted[0] != wanted[1]
    for rank in range(world):
        assert json.loads((out / f"selections{rank}.json").read_text()) == wanted, rank
    # Training with DeepSpeed equals training without it.
    assert_same_adapter(run["folded"], plain["folded"], rtol, atol, "DeepSpeed vs plain Trainer")
    torch.testing.assert_close(run["logits"], plain["logits"], rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(plain["losses"]), rtol=rtol, atol=atol)
    # Period 1's delta is large enough for a save that dropped it (or the bank) to be caught below.
    assert plain["info"]["current_delta_max"] > 1e-2
    base_logits = tiny_llama()(input_ids=_probe()).logits.detach()
    assert (base_logits - run["logits"]).abs().max() > 1e-2
    # The Trainer's save and save_pretrained (ZeRO-3: the bank gathered) reload with stock peft.
    for saved in ("adapter", "direct"):
        reloaded = PeftModel.from_pretrained(tiny_llama(), out / saved).eval()
        assert_same_adapter(folded(reloaded), run["folded"], 0, 0, saved)
        with torch.no_grad():
            logits = reloaded(input_ids=_probe()).logits
        torch.testing.assert_close(logits, run["logits"], rtol=rtol, atol=atol, msg=saved)


def _probe() -> torch.Tensor:
    from tests.core.distributed.trainer_deepspeed_worker import PROBE

    return PROBE


@pytest.mark.slow  # DeepSpeed processes and a plain one, about 10 s each
@needs_deepspeed
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_on_cpu_matches_plain_trainer_and_saves(stage, world, references, tmp_path):
    """TrainingArguments(deepspeed=...) with ZeRO-2/3 on 1 or 2 CPU processes (each on 8/world rows
    of every batch): two epochs with a redraw, every rank on the channels of the Trainer without
    DeepSpeed and the same adapter, and ``trainer.save_model`` / ``save_pretrained`` under ZeRO-3
    (bank partitioned) write an adapter that reloads to the trained model."""
    out = train(f"zero{stage}", "cpu", world, tmp_path / "run")
    check(out, references("cpu"), stage, world, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_one_gpu(stage, references, tmp_path):
    """The same Trainer + DeepSpeed run on one GPU (world size 1, nccl)."""
    out = train(f"zero{stage}", "cuda", 1, tmp_path / "run")
    check(out, references("cuda"), stage, 1, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_two_gpus(stage, references, tmp_path):
    """Two ranks (nccl), each on half of every batch: both draw the reference's channels and the
    adapter equals the one-GPU plain Trainer on the whole batches; ZeRO-3's save gathers the bank."""
    out = train(f"zero{stage}", "cuda", 2, tmp_path / "run")
    check(out, references("cuda"), stage, 2, rtol=1e-4, atol=1e-5)
