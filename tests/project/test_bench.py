"""The benchmark harness (benchmarks/bench.py, the trady_bench package) end to end on a tiny model,
and the win/tie/loss rule that the docs' statements come from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import tiny_cnn  # noqa: E402
from trady_bench import resources  # noqa: E402
from trady_bench.accuracy import run_grid  # noqa: E402
from trady_bench.aggregate import diverged, picks, verdict  # noqa: E402
from trady_bench.environment import environment, quiet  # noqa: E402
from trady_bench.flops import flop_counter_without_module_tracking  # noqa: E402
from trady_bench.methods import BASELINES, Method, grid, task_budgets  # noqa: E402
from trady_bench.outputs import OUT, default_output, update_docs_page, write_outputs  # noqa: E402
from trady_bench.report import markdown_tables, recommendations, statements  # noqa: E402
from trady_bench.run import recount_flops, run_task  # noqa: E402
from trady_bench.tasks import Task, image_task  # noqa: E402


def tiny_image_task() -> Task:
    g = torch.Generator().manual_seed(0)

    def data(n):
        labels = torch.randint(0, 4, (n,), generator=g)
        images = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        images[torch.arange(n), labels % 3] += 1.0
        return {"pixel_values": images, "labels": labels}

    return Task(
        "image",
        "tiny CNN -> coloured noise",
        lambda: tiny_cnn(0),
        data(8),
        data(8),
        head="classifier",
        head_only=("classifier.",),
        metric="accuracy",
        budget_fractions=(0.2, 0.5),
        epochs=2,
        batch_size=8,
        lr=0.125,
        gradient_batches=1,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    resources.COLLECT_BETWEEN_RUNS = False
    task = tiny_image_task()
    preset = {"speed_steps": 2, "artifact_epochs": 3}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    try:
        result = run_task(task, preset, log=lambda s: None, seeds=(0, 1))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("bench")
    env = environment("pytest tiny", torch.get_num_threads())
    write_outputs({"image": result}, env, out)
    return task, result, out


def test_every_method_of_the_grid_has_a_record_per_seed(tiny_run):
    task, result, _ = tiny_run
    expected = {(m.name, m.budget) for m in grid(result["budgets"])}
    assert len(expected) == 2 * 7 + 3
    got = {}
    for r in result["records"]:
        got.setdefault((r["method"], r["budget_bytes"]), set()).add(r["seed"])
    assert set(got) == expected
    assert all(seeds == {0, 1} for seeds in got.values())


def test_records_hold_the_metric_memory_and_speed_fields(tiny_run):
    _, result, out = tiny_run
    saved = json.loads((out / "accuracy.json").read_text())
    assert {"command", "date", "versions", "machine"} <= set(saved)
    assert saved["machine"]["cpu_count"] and saved["versions"]["torch"]
    for r in saved["records"]:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["saved_activation_bytes"] > 0 and r["trainable_state_bytes"] > 0
        assert r["step_time_ratio_to_lora"] > 0
        assert r["task"] == "image" and r["seed"] in (0, 1)
    lora = [r for r in saved["records"] if r["method"] == "lora"]
    assert all(r["step_time_ratio_to_lora"] == 1.0 for r in lora)
    # Budget-free baselines carry no budget; every strategy row carries one of the two budgets.
    assert {r["budget_bytes"] for r in saved["records"] if r["method"] in BASELINES} == {None}
    assert {r["budget_bytes"] for r in saved["records"] if r["method"] == "trady"} == set(result["budgets"])


def test_memory_rows_measure_the_adapter_against_its_budget(tiny_run):
    _, result, _ = tiny_run
    rows = {(r["method"], r["budget_bytes"]): r for r in result["memory"]}
    full, head = rows[("full", None)], rows[("head", None)]
    # Full fine-tuning trains every parameter: more trainable state than the head alone.
    assert full["trainable_state_bytes"] > head["trainable_state_bytes"]
    for (method, budget), r in rows.items():
        if budget is not None:
            assert r["adapter_footprint_within_budget"], (method, budget, r["adapter_footprint_bytes"])
            assert r["adapter_footprint_bytes"] == r["adapter_bank_bytes"] + r["adapter_saved_input_bytes"]


def test_speed_flops_and_artifact_are_measured(tiny_run):
    _, result, out = tiny_run
    speed = {(r["method"], r["budget_bytes"]): r for r in result["speed"]}
    assert speed[("full", None)]["weight_gradient_flops_vs_full"] == 0.0
    assert speed[("head", None)]["weight_gradient_flops"] < speed[("full", None)]["weight_gradient_flops"]
    assert all(r["timed_steps"] == 2 for r in result["speed"])
    assert "redraw_to_step_ratio" in speed[("trady", result["budgets"][0])]
    epochs = result["artifact"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    touched = [e["touched_channels"] for e in epochs]
    assert touched == sorted(touched) and touched[0] == epochs[0]["selected_channels"]
    for name in ("pareto.png", "artifact.png", "table.md", "memory.json", "speed.json", "artifact.json"):
        assert (out / name).stat().st_size > 0
    assert "TraDy at" in (out / "table.md").read_text()


def test_flop_counter_without_module_tracking_counts_the_same_totals():
    """FlopCounterMode keeps a ``mod_tracker`` whose ``parents`` name where counts go; totals are "Global"."""
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with FlopCounterMode(display=False) as reference:
        layer(x).sum().backward()
    with flop_counter_without_module_tracking() as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == reference.get_total_flops() == 2 * (2 * 3 * 8 * 4)  # forward + weight gradient


def test_a_difference_within_one_std_is_a_tie():
    assert verdict((0.80, 0.02), (0.79, 0.01)) == "tie"
    assert verdict((0.80, 0.0), (0.81, 0.015)) == "tie"
    assert verdict((0.80, 0.0), (0.80, 0.0)) == "tie"


def test_a_difference_beyond_one_std_is_a_win_or_a_loss():
    assert verdict((0.85, 0.01), (0.80, 0.02)) == "win"
    assert verdict((0.75, 0.01), (0.80, 0.02)) == "loss"
    # Perplexity: lower is better.
    assert verdict((40.0, 1.0), (50.0, 2.0), higher_is_better=False) == "win"
    assert verdict((60.0, 1.0), (50.0, 2.0), higher_is_better=False) == "loss"


def test_statements_follow_the_results():
    def rec(method, budget, values):
        return [
            {"task": "image", "method": method, "budget_bytes": budget, "seed": s, "accuracy": v}
            for s, v in zip((0, 42, 100), values)
        ]

    records = (
        rec("trady", 100, [0.90, 0.91, 0.92])
        + rec("s-full-random", 100, [0.80, 0.81, 0.82])  # clearly worse: a win
        + rec("d-det-rgn", 100, [0.905, 0.915, 0.925])  # within one std: a tie
        + rec("s-det-rgn", 200, [0.10, 0.10, 0.10])  # another budget: not compared
        + rec("full", None, [0.95, 0.96, 0.97])  # clearly better: a loss
    )
    (line,) = statements(records)["image"]
    assert "wins against s-full-random" in line
    assert "ties with d-det-rgn" in line
    assert "loses to full fine-tuning" in line
    assert "s-det-rgn" not in line


def test_a_row_that_diverged_loses_whatever_its_std():
    # A diverged row's huge std would make the one-std rule call it a tie: it loses instead.
    assert verdict((300.0, 10.0), (1e9, 1e9), higher_is_better=False, diverged=(False, True)) == "win"
    assert verdict((1e9, 1e9), (300.0, 10.0), higher_is_better=False, diverged=(True, False)) == "loss"
    assert verdict((1e9, 1e9), (1e8, 1e8), higher_is_better=False, diverged=(True, True)) == "tie"


def test_divergence_is_a_non_finite_value_or_a_perplexity_far_above_the_untrained_model():
    def rec(**kw):
        return {"final_train_loss": 2.0, **kw}

    assert not diverged(rec(perplexity=400.0), untrained=318.0)  # worse, but not diverged
    assert diverged(rec(perplexity=3.7e7), untrained=318.0)
    assert diverged(rec(perplexity=float("inf")), untrained=318.0)
    assert diverged({"final_train_loss": float("nan"), "accuracy": 0.1}, untrained=0.1)
    assert not diverged(rec(accuracy=0.05), untrained=0.1)  # a low accuracy is just low


def test_statements_table_and_picks_mark_a_diverged_row():
    def rec(method, values, bad=()):
        return [
            {
                "task": "lm",
                "method": method,
                "budget_bytes": None if method == "head" else 100,
                "seed": s,
                "perplexity": v,
                "diverged": s in bad,
            }
            for s, v in zip((0, 42, 100), values)
        ]

    records = rec("trady", [300.0, 310.0, 320.0]) + rec("head", [250.0, 3.7e7, 260.0], bad=(42,))
    (line,) = statements(records)["lm"]
    assert "wins against head only" in line
    memory = [
        {"task": "lm", "method": "trady", "budget_bytes": 100, "step_total_bytes": 2000},
        {"task": "lm", "method": "head", "budget_bytes": None, "step_total_bytes": 1000},
    ]
    assert picks(records, memory)["lm"] == [("lm", "trady", 100)]  # the cheaper head diverged
    table = markdown_tables(records, memory, [], {})
    assert "(diverged: 1/3 seeds)" in table


def test_each_preset_fills_its_own_block_of_the_docs_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "intro\n<!-- bench.py -->\nold quick\n<!-- /bench.py -->\nmid\n<!-- bench.py full -->\nold full\n"
        "<!-- /bench.py full -->\nend\n"
    )
    update_docs_page(page, "new full ![p](pareto.png)\n", "full", tmp_path / "benchmarks" / "full")
    text = page.read_text()
    assert "old quick" in text and "old full" not in text
    assert "![p](benchmarks/full/pareto.png)" in text  # the plot next to the full preset's table
    assert default_output("full") == OUT / "full" and default_output("quick") == OUT
    with pytest.raises(SystemExit, match="bench.py nightly"):
        update_docs_page(page, "x", "nightly", tmp_path)


@pytest.mark.slow
def test_worker_processes_reproduce_the_in_process_runs():
    """--jobs 2: the spawned workers rebuild the task from its preset sizes and give the same records."""
    sizes = {"train": 8, "test": 16, "size": 32, "epochs": 2, "batch": 8}
    quiet()
    task = image_task(sizes)
    budget = task_budgets(task)[0]
    runs = [(Method("trady", budget), 0), (Method("head"), 42)]
    here = run_grid(task, runs, [], jobs=1, spec=None)
    there = run_grid(task, runs, [], jobs=2, spec=("image", sizes))
    for a, b in zip(here, there):
        assert (a["method"], a["seed"]) == (b["method"], b["seed"])
        assert a["accuracy"] == b["accuracy"] and a["final_train_loss"] == pytest.approx(
            b["final_train_loss"], rel=1e-5
        )
        assert a.get("touched_channels") == b.get("touched_channels")


def test_picks_climb_only_for_a_real_improvement_and_skip_the_oracles():
    def rec(method, budget, values):
        return [
            {"task": "image", "method": method, "budget_bytes": budget, "seed": s, "accuracy": v}
            for s, v in zip((0, 42, 100), values)
        ]

    records = (
        rec("head", None, [0.50, 0.51, 0.52])
        + rec("trady", 100, [0.60, 0.61, 0.62])  # beats the head: a pick
        + rec("medyate", 100, [0.60, 0.62, 0.61])  # more memory, a tie with TraDy: not a pick
        + rec("d-det-rgn", 100, [0.90, 0.90, 0.90])  # best, but an oracle
        + rec("full", None, [0.70, 0.71, 0.72])  # much more memory, clearly better: a pick
    )
    memory = [
        {"task": "image", "method": m, "budget_bytes": b, "step_total_bytes": n}
        for m, b, n in (
            ("head", None, 10),
            ("trady", 100, 20),
            ("medyate", 100, 25),
            ("d-det-rgn", 100, 20),
            ("full", None, 1000),
        )
    ]
    assert [k[1] for k in picks(records, memory)["image"]] == ["head", "trady", "full"]
    (line,) = recommendations(records, memory)
    assert line.startswith("image: head only") and "then full fine-tuning" in line and "det-rgn" not in line


def test_flops_are_recounted_into_finished_results(tiny_run, tmp_path):
    """--recount-flops: the FLOP columns of a finished run are counted again, the command recorded."""
    task, result, _ = tiny_run
    raw = tmp_path / "image.json"
    stale = json.loads(json.dumps(result, default=float))
    for row in stale["speed"]:
        row["weight_gradient_flops"] = row["weight_gradient_flops_vs_full"] = -1  # not what a count gives
    raw.write_text(json.dumps(stale))
    recount_flops(raw, task, "pytest recount")
    again = json.loads(raw.read_text())
    assert again["flops_recounted"]["command"] == "pytest recount"
    counted = {(r["method"], r["budget_bytes"]): r for r in again["speed"]}
    assert counted[("full", None)]["weight_gradient_flops_vs_full"] == 0.0
    assert all(r["weight_gradient_flops"] >= 0 for r in again["speed"])
    assert again["records"] == stale["records"]  # only the FLOP columns change
