"""A run killed mid-epoch (or between epochs) and resumed draws what the uninterrupted run drew,
for every strategy: the selection state travels with the Trainer checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import trady_peft
from tests.tiny_models import ColourImages, tiny_cnn

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["trady", "s-top-k-random", "d-full-random", "s-full-random", "d-det-rgn", "s-det-rgn", "medyate"]


class Crash(Exception):
    pass


class Record(TrainerCallback):
    """Records each period's selection; crashes (or kills the process) after a checkpoint."""

    def __init__(self, crash_after_save: int | None, hard: bool):
        self.selections: dict[int, dict] = {}
        self.crash_after_save, self.hard = crash_after_save, hard

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        tuner = trady_peft.find_tuner(model)
        selection = tuner.selection_states["default"].selection or {}
        self.selections[tuner.period()] = {n: c.tolist() for n, c in sorted(selection.items())}

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.crash_after_save:
            if self.hard:
                os._exit(17)  # a real kill: no clean-up, no atexit
            raise Crash


def run(strategy: str, out: str, crash_after_save: int | None = None, resume: bool = False, hard=False) -> dict:
    """Three epochs of 4 steps with a checkpoint every 2 steps; returns selections and the adapter."""
    config = trady_peft.TraDyConfig(
        memory_budget=300, strategy=strategy, modules_to_save=["classifier"], gradient_batches=2
    )
    model = get_peft_model(tiny_cnn(), config)
    record = Record(crash_after_save, hard)
    args = TrainingArguments(
        output_dir=out,
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=ColourImages(n=32), callbacks=[trady_peft.TraDyCallback(), record]
    )
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except Crash:
        return {"crashed": True}
    folded = {n: m.fold("default") for n, m in model.base_model.trady_layers("default")}
    return {
        "selections": {str(k): v for k, v in record.selections.items()},
        "indices": {n: i.tolist() for n, (i, _) in folded.items()},
        "values": {n: v.flatten().tolist() for n, (_, v) in folded.items()},
    }


def assert_same_run(resumed: dict, full: dict, from_period: int) -> None:
    for period, selection in resumed["selections"].items():
        if int(period) >= from_period:
            assert selection == full["selections"][period], period
    assert resumed["indices"] == full["indices"]
    for name, values in full["values"].items():
        torch.testing.assert_close(torch.tensor(resumed["values"][name]), torch.tensor(values), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_run_crashed_mid_epoch_and_resumed_draws_what_the_uninterrupted_run_drew(strategy, tmp_path):
    full = run(strategy, str(tmp_path / "full"))
    assert len(full["selections"]) == 3
    # Step 6 is the middle of epoch 2 (4 steps per epoch): period 1, with its channels and statistics.
    assert run(strategy, str(tmp_path / "cut"), crash_after_save=6)["crashed"]
    resumed = run(strategy, str(tmp_path / "cut"), resume=True)
    assert_same_run(resumed, full, from_period=1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["trady", "d-det-rgn", "medyate"])
@pytest.mark.parametrize("kill_at", [4, 6])  # between epochs 1 and 2, and mid-epoch 2
def test_a_killed_process_resumes_exactly(strategy, kill_at, tmp_path):
    def python(code: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)

    out = tmp_path / "run"
    killed = python(
        f"from tests.periods.test_resume import run; run({strategy!r}, {str(out)!r}, {kill_at}, hard=True)"
    )
    assert killed.returncode == 17, killed.stderr[-2000:]
    code = (
        "import json; from tests.periods.test_resume import run; "
        f"print(json.dumps(run({strategy!r}, {str(out)!r}, resume=True)))"
    )
    resumed = python(code)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = run(strategy, str(tmp_path / "full"))
    assert_same_run(json.loads(resumed.stdout.strip().splitlines()[-1]), full, from_period=kill_at // 4)
