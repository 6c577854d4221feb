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

from tiny_models import tiny_cnn, tiny_llama  # noqa: E402
from trady_bench import front_run, resources  # noqa: E402
from trady_bench.accuracy import run_grid, run_one  # noqa: E402
from trady_bench.aggregate import diverged, picks, summarize, verdict  # noqa: E402
from trady_bench.environment import environment, quiet  # noqa: E402
from trady_bench.flops import flop_counter_without_module_tracking  # noqa: E402
from trady_bench.front import REFERENCE, FrontGrid, front_methods  # noqa: E402
from trady_bench.front_report import front_markdown, verdict_line  # noqa: E402
from trady_bench.front_run import front_memory, run_front, twin_records  # noqa: E402
from trady_bench.front_verdict import answer_lora_points  # noqa: E402
from trady_bench.memory import largest_block, measure_memory  # noqa: E402
from trady_bench.methods import BASELINES, Method, build_method, grid, lora_targets_of, task_budgets  # noqa: E402
from trady_bench.outputs import OUT, default_output, update_docs_page, write_front_outputs, write_outputs  # noqa: E402
from trady_bench.report import label, markdown_tables, recommendations, statements  # noqa: E402
from trady_bench.run import recount_flops, run_task  # noqa: E402
from trady_bench.sweep import LADDER, best_lr, beyond, lr_centre, lr_grid  # noqa: E402
from trady_bench.tasks import Task, image_task  # noqa: E402
from trady_bench.training import HEAD_LR, make_optimizer, starts_period  # noqa: E402


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
    runs = [(Method("trady", budget), 0, None), (Method("head"), 42, None)]
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


# ---------------------------------------------------------------- the accuracy-memory front (--protocol adamw)

TINY_FRONT = FrontGrid(ranks=(1, 8), fractions=(0.05, 0.15, 0.4, 1.0), seeds=(0, 1))


@pytest.fixture(scope="module")
def tiny_front(tmp_path_factory):
    resources.COLLECT_BETWEEN_RUNS = False
    task = tiny_image_task()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_front(task, TINY_FRONT, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("front")
    env = {**environment("pytest tiny front", 1), "preset": {"name": "tiny"}}
    write_front_outputs({"image": result}, env, out)
    return task, result, out


def test_the_front_report_says_which_runs_a_resumed_task_took_from_its_journal(tiny_front):
    _, result, _ = tiny_front
    env = {**environment("pytest report", 1), "preset": {"name": "tiny"}}
    resumed = {**result, "run": {"command": "bench --resume", "date": "today", "resumed_runs": 7}}
    (line,) = [x for x in front_markdown({"image": resumed}, env).splitlines() if x.startswith("* image: `")]
    assert "resuming the 7 training runs an interrupted run had finished" in line and "for the rest" in line
    whole = {**result, "run": {"command": "bench", "date": "today", "resumed_runs": 0}}
    (line,) = [x for x in front_markdown({"image": whole}, env).splitlines() if x.startswith("* image: `")]
    assert "resuming" not in line and "in all" in line


def test_front_budgets_are_the_asked_fractions_of_lora_r8_measured_step_memory(tiny_front):
    _, result, _ = tiny_front
    memory = {(r["method"], r["budget_bytes"]): r for r in result["memory"]}
    lora8 = memory[("lora-r8", None)]["step_total_bytes"]
    assert result["reference_step_bytes"] == lora8 > 0
    assert result["budgets"] == [int(f * lora8) for f in TINY_FRONT.fractions]
    assert result["budgets"][0] < 0.06 * lora8 and result["budgets"][-1] > 0.99 * lora8
    for strategy in TINY_FRONT.strategies:
        for budget in result["budgets"]:
            row = memory.get((strategy, budget))
            if row is None:  # the whole LoRA step's memory buys every channel of the tiny CNN
                assert (
                    f"{strategy} at {budget:,} B left out: the budget covers every candidate channel"
                    in result["notes"]
                )
                continue
            assert row["adapter_footprint_within_budget"], (strategy, budget)
            assert row["optimizer_state_bytes"] >= 2 * row["trainable_bytes"]  # AdamW: two moments per value
    assert sum((s, b) in memory for s in TINY_FRONT.strategies for b in result["budgets"]) >= 4


def test_front_sweeps_three_learning_rates_on_the_first_seed_and_trains_every_seed_at_the_best(tiny_front):
    _, result, out = tiny_front
    sweep = {(s["method"], s["budget_bytes"]): s for s in result["sweep"]}
    points = {(r["method"], r["budget_bytes"]) for r in result["memory"]}
    assert set(sweep) == points  # no checkpointing on the tiny CNN: every point trains
    for key, s in sweep.items():
        tried = [r for r in result["sweep_records"] if (r["method"], r["budget_bytes"]) == key]
        rates = sorted(r["lr"] for r in tried)
        assert set(lr_grid(*key)) <= set(rates) and {r["seed"] for r in tried} == {0}
        # More rates only past an edge the best lay at, one at a time, at most edge_steps of them.
        extra = [lr for lr in rates if lr not in lr_grid(*key)]
        assert len(extra) <= TINY_FRONT.edge_steps
        assert all(lr < min(lr_grid(*key)) for lr in extra) or all(lr > max(lr_grid(*key)) for lr in extra)
        assert beyond(best_lr(tried), lr_grid(*key), TINY_FRONT.edge_steps) is None  # the sweep went far enough
        assert s.items() >= best_lr(tried).items()
        runs = [r for r in result["records"] if (r["method"], r["budget_bytes"]) == key]
        assert sorted(r["seed"] for r in runs) == [0, 1] and {r["lr"] for r in runs} == {s["lr"]}
        assert all(r["optimizer"] == "adamw" for r in runs)
    saved = json.loads((out / "front.json").read_text())
    assert saved["tasks"]["image"]["sweep"] == json.loads(json.dumps(result["sweep"]))
    assert (out / "front_image.png").stat().st_size > 0
    table = (out / "front.md").read_text()
    assert table.count("answered") >= 2 and "LoRA r=1" in table and "What to pick" in table


def test_the_front_trains_a_fresh_head_at_its_own_rate_and_everything_else_at_the_swept_one(tiny_front):
    task, result, _ = tiny_front
    for r in result["sweep_records"] + result["records"]:
        assert r["head_lr"] == (None if r["method"] == "head" else HEAD_LR), r["method"]
    for method in (Method("trady", 1 << 20), Method("lora", rank=1), Method("full")):
        model = build_method(task, method, 0, lora_targets_of(task))
        optimizer, _ = make_optimizer(task, model, 4, "adamw", lr=1e-3, head_lr=HEAD_LR)
        body, head = optimizer.param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        assert head["initial_lr"] == HEAD_LR and body["initial_lr"] == 1e-3, method  # before the warm-up
        assert head["params"] and all("classifier." in names[id(p)] for p in head["params"])
        assert body["params"] and not any("classifier." in names[id(p)] for p in body["params"])
    only = build_method(task, Method("head"), 0, [])  # the head alone: one group, at the swept rate
    assert len(make_optimizer(task, only, 4, "adamw", lr=1e-3, head_lr=HEAD_LR)[0].param_groups) == 1


def test_under_adamw_a_task_can_set_the_period_length_in_steps_and_sgd_keeps_one_per_epoch():
    task = tiny_image_task()  # 8 rows, batch 8: one step per epoch
    task.epochs = 5
    assert run_one(task, Method("trady", 1 << 20), 0, [], 1e-3, "adamw")["periods"] == 5  # one per epoch
    task.resample_every_steps = 2
    assert run_one(task, Method("trady", 1 << 20), 0, [], 1e-3, "adamw")["periods"] == 3  # steps 0, 2, 4
    assert run_one(task, Method("trady", 1 << 20), 0, [], 0.1, "sgd")["periods"] == 5  # the paper's protocol
    assert [starts_period(task, "adamw", s, b) for s, b in ((0, 0), (1, 0), (2, 1), (3, 0))] == [1, 0, 1, 0]


def test_the_sweep_picks_the_best_learning_rate():
    def runs(metric, values, diverged=()):
        return [{"lr": lr, metric: v, "diverged": lr in diverged} for lr, v in zip((1e-3, 3e-3, 1e-2), values)]

    best = best_lr(runs("accuracy", [0.5, 0.7, 0.6]))
    assert best["lr"] == 3e-3 and not best["at_edge"] and best["tried"] == {"0.001": 0.5, "0.003": 0.7, "0.01": 0.6}
    assert best_lr(runs("perplexity", [40.0, 30.0, 35.0]))["lr"] == 3e-3  # lower is better
    assert best_lr(runs("perplexity", [20.0, 30.0, 35.0]))["at_edge"]  # the best may lie below the range
    # A diverged run is never picked, whatever its metric; all diverged: the smallest rate.
    assert best_lr(runs("accuracy", [0.5, 0.7, 0.9], diverged=(1e-2,)))["lr"] == 3e-3
    fallback = best_lr(runs("perplexity", [1e9, 1e9, 1e9], diverged=(1e-3, 3e-3, 1e-2)))
    assert fallback["lr"] == 1e-3 and fallback["all_diverged"]
    with pytest.raises(ValueError, match="got none"):
        best_lr([])


def test_the_sweep_is_centred_by_the_budget_or_the_rank_and_goes_on_past_an_edge():
    mib = 2**20
    grids = [lr_grid("trady", int(b * mib)) for b in (6, 25, 120)]
    assert grids == [(3e-3, 1e-2, 3e-2), (1e-3, 3e-3, 1e-2), (3e-4, 1e-3, 3e-3)]  # less budget, larger rates
    assert lr_grid("medyate-gc", 25 * mib) == lr_grid("medyate", 25 * mib)
    assert lr_centre("trady", 4 * mib) > lr_centre("trady", 8 * mib)
    assert [lr_grid(name) for name in ("lora-r1", "lora-r8", "lora-r16", "lora-r8-gc")] == [
        (3e-3, 1e-2, 3e-2),
        (3e-4, 1e-3, 3e-3),
        (1e-4, 3e-4, 1e-3),
        (3e-4, 1e-3, 3e-3),
    ]
    assert all(set(g) <= set(LADDER) for g in grids)
    with pytest.raises(ValueError, match="needs its budget"):
        lr_grid("trady")

    def best(values, lrs=(1e-3, 3e-3, 1e-2), diverged=()):
        return best_lr([{"lr": lr, "perplexity": v, "diverged": lr in diverged} for lr, v in zip(lrs, values)])

    assert beyond(best([30.0, 20.0, 10.0])) == 3e-2
    assert beyond(best([10.0, 20.0, 30.0])) == 3e-4
    assert beyond(best([30.0, 10.0, 20.0])) is None  # the best is inside the range
    assert beyond(best([1e9, 1e9, 1e9], diverged=(1e-3, 3e-3, 1e-2))) is None
    # At most `steps` rates past that side of the point's grid.
    assert beyond(best([30.0, 20.0, 10.0]), grid=(1e-4, 3e-4, 1e-3), steps=2) is None  # 3e-3 and 1e-2 past it
    assert beyond(best([30.0, 20.0, 10.0]), grid=(1e-3, 3e-3, 1e-2), steps=2) == 3e-2


def test_an_extended_front_runs_only_what_the_earlier_results_lack(tiny_front, monkeypatch):
    task, result, _ = tiny_front
    point = next((s["method"], s["budget_bytes"]) for s in result["sweep"] if s["budget_bytes"] is not None)
    earlier = json.loads(json.dumps({**result, "run": {"command": "earlier"}}))
    for key in ("memory", "records", "sweep_records"):
        earlier[key] = [r for r in earlier[key] if (r["method"], r["budget_bytes"]) != point]
    ran = []
    real = front_run.run_grid

    def counting(task, runs, *args):
        ran.extend((m.row_name, m.budget, seed, lr) for m, seed, lr in runs)
        return real(task, runs, *args)

    monkeypatch.setattr(front_run, "run_grid", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_front(task, TINY_FRONT, log=lambda s: None, previous=earlier)
    finally:
        torch.set_num_threads(threads)
    assert ran and {(m, b) for m, b, _, _ in ran} == {point}
    assert len(ran) == len([r for r in result["sweep_records"] if (r["method"], r["budget_bytes"]) == point]) + 1
    assert again["budgets"] == result["budgets"] and again["earlier_runs"] == [{"command": "earlier"}]
    assert again["elapsed"]["wall_seconds"] >= result["elapsed"]["wall_seconds"]
    assert sorted(
        json.dumps(r, sort_keys=True) for r in again["records"] if (r["method"], r["budget_bytes"]) != point
    ) == sorted(json.dumps(r, sort_keys=True) for r in earlier["records"])
    # A fraction added to the grid: its budget comes from the same LoRA r=8 step, only its points run.
    ran.clear()
    wider = FrontGrid(ranks=(1, 8), fractions=(*TINY_FRONT.fractions, 0.1), seeds=(0, 1))
    torch.set_num_threads(1)
    try:
        widened = run_front(task, wider, log=lambda s: None, previous={**again, "run": {"command": "again"}})
    finally:
        torch.set_num_threads(threads)
    budget = int(result["reference_step_bytes"] * 0.1)
    assert widened["budgets"] == [*result["budgets"], budget]
    assert ran and {(m, b) for m, b, _, _ in ran} == {(s, budget) for s in wider.strategies}


def front_rows(points):
    """Records (three seeds: mean ± 0.01) and memory rows of synthetic front points
    ``(method, budget, mean accuracy, step bytes, diverged)``."""
    records, memory = [], []
    for method, budget, mean, step, bad in points:
        for seed, d in zip((0, 42, 100), (-0.01, 0.0, 0.01)):
            records.append(
                {"task": "image", "method": method, "budget_bytes": budget, "seed": seed, "accuracy": mean + d}
            )
            records[-1]["diverged"] = bad and seed == 42
        memory.append({"task": "image", "method": method, "budget_bytes": budget, "step_total_bytes": step})
    return records, memory


def test_the_verdict_names_the_cheapest_point_at_half_the_memory_that_is_as_good():
    records, memory = front_rows(
        [
            ("lora-r8", None, 0.80, 1000, False),
            ("trady", 10, 0.70, 300, False),  # cheap, but worse beyond one std
            ("trady", 20, 0.795, 400, False),  # within one std, 0.4x: answers
            ("medyate", 20, 0.805, 450, False),  # answers too, but costs more
            ("medyate", 60, 0.90, 600, False),  # better, but above 0.5x
        ]
    )
    (answer,) = answer_lora_points(records, memory, ("trady", "medyate"))["image"]
    assert answer.by == ("image", "trady", 20) and answer.ratio == pytest.approx(0.4)


def test_the_verdict_refuses_points_too_large_worse_or_diverged_and_says_how_close_the_front_came():
    records, memory = front_rows(
        [
            ("lora-r8", None, 0.80, 1000, False),
            ("lora-r8-gc", None, 0.80, 400, False),
            ("trady", 10, 0.70, 300, False),  # worse beyond one std
            ("trady", 20, 0.85, 450, True),  # better on average, but diverged for a seed
            ("medyate", 60, 0.81, 600, False),  # as good, but 0.6x of LoRA r=8
            ("head", None, 0.81, 100, False),  # not of the TraDy family
        ]
    )
    answers = {a.lora[1]: a for a in answer_lora_points(records, memory, ("trady", "medyate"))["image"]}
    lora8, gc = answers["lora-r8"], answers["lora-r8-gc"]
    assert lora8.by is None and gc.by is None
    assert lora8.best_within == ("image", "trady", 10)  # the diverged point is not the best
    assert lora8.cheapest_match == ("image", "medyate", 60)
    assert gc.best_within is None and gc.cheapest_match == ("image", "medyate", 60)
    summary = summarize(records)
    mem = {(r["task"], r["method"], r["budget_bytes"]): r["step_total_bytes"] for r in memory}
    line = verdict_line(gc, summary, mem)
    assert "**not answered**" in line and "no TraDy-family point needs as little as 0.5x" in line
    assert "medyate at 60 B (accuracy 0.810 ± 0.010, 1.50x its step memory)" in line


def tiny_lm_task() -> Task:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    return Task(
        "lm",
        "tiny Llama -> random tokens",
        lambda: tiny_llama(0, num_hidden_layers=3),
        {"input_ids": ids, "labels": ids},
        {"input_ids": ids, "labels": ids},
        head=None,
        head_only=("lm_head.",),
        metric="perplexity",
        budget_fractions=(0.2, 0.5),
        epochs=1,
        batch_size=4,
        lr=1e-3,
        gradient_batches=1,
    )


def test_lora_with_checkpointing_keeps_block_inputs_and_pays_the_largest_block_recomputed():
    task = tiny_lm_task()
    lora = lora_targets_of(task)
    plain = measure_memory(task, REFERENCE, lora, "adamw")
    checkpointed = Method("lora", rank=8, checkpointing=True)
    (row,) = front_memory(task, [checkpointed], lora, plain)
    assert row["method"] == "lora-r8-gc" and label(row["method"]) == "LoRA r=8 + checkpointing"
    # Checkpointing drops every block's inner activations, but one block is recomputed at a time.
    assert row["saved_activation_bytes"] < plain["saved_activation_bytes"]
    assert 0 < row["checkpoint_recompute_bytes"] == plain["largest_block_saved_bytes"]
    assert row["step_total_bytes"] == (
        row["saved_activation_bytes"] + row["trainable_state_bytes"] + row["checkpoint_recompute_bytes"]
    )
    assert row["trainable_state_bytes"] == plain["trainable_state_bytes"]
    with pytest.raises(
        ValueError, match=r"no transformers model that supports gradient checkpointing; use Method\('lora', rank=8\)"
    ):
        build_method(tiny_image_task(), checkpointed, 0, [])


def test_a_checkpointed_strategy_selects_as_its_twin_keeps_less_and_pays_its_twins_largest_block():
    task = tiny_lm_task()
    lora = lora_targets_of(task)
    plain = measure_memory(task, REFERENCE, lora, "adamw")
    budget = int(plain["step_total_bytes"] * 0.2)
    twin, checkpointed = Method("medyate", budget), Method("medyate", budget, checkpointing=True)
    assert checkpointed.row_name == "medyate-gc" and checkpointed.twin == twin
    assert label(checkpointed.row_name) == "medyate + checkpointing"
    twin_row, row = front_memory(task, [twin, checkpointed], lora, plain)
    assert row["method"] == "medyate-gc" and row["budget_bytes"] == budget
    assert row["selected_channels"] == twin_row["selected_channels"] > 0
    assert row["trainable_state_bytes"] == twin_row["trainable_state_bytes"]
    assert row["saved_activation_bytes"] < twin_row["saved_activation_bytes"]
    assert 0 < row["checkpoint_recompute_bytes"] == twin_row["largest_block_saved_bytes"]
    assert row["step_total_bytes"] == (
        row["saved_activation_bytes"] + row["trainable_state_bytes"] + row["checkpoint_recompute_bytes"]
    )
    assert row["step_total_bytes"] < twin_row["step_total_bytes"]
    # Its twin measured earlier (a run being extended) serves as well; without a twin it is left out.
    (again,) = front_memory(task, [checkpointed], lora, plain, measured=[twin_row])
    assert again["step_total_bytes"] == row["step_total_bytes"]
    assert front_memory(task, [checkpointed], lora, plain) == []
    assert any("medyate-gc" in note and "twin" in note for note in task.notes)
    # It trains as its twin: the twin's records under its own name.
    records = [{"method": "medyate", "budget_bytes": budget, "seed": s, "perplexity": 5.0} for s in (0, 1)]
    records.append({"method": "medyate", "budget_bytes": budget + 1, "seed": 0, "perplexity": 6.0})
    copied = twin_records([twin, checkpointed], {("medyate-gc", budget)}, records)
    assert [(r["method"], r["seed"], r["trained_as"]) for r in copied] == [("medyate-gc", 0, "medyate")] + [
        ("medyate-gc", 1, "medyate")
    ]


def test_the_front_checkpoints_the_strategies_at_the_smaller_budgets_where_the_model_supports_it():
    grid = FrontGrid(ranks=(8,), fractions=(0.05, 0.2, 1.0), checkpointed_fractions=(0.05, 0.2))
    names = [m.key for m in front_methods(grid, [5, 20, 100], checkpointing=True)]
    assert {"trady-gc@5", "trady-gc@20", "medyate-gc@5", "medyate-gc@20", "lora-r8-gc"} <= set(names)
    assert "trady-gc@100" not in names
    assert names.index("trady-gc@5") > names.index("trady@5")  # after its twin, whose memory it needs
    assert not any(m.checkpointing for m in front_methods(grid, [5, 20, 100], checkpointing=False))


def test_a_checkpointed_strategy_answers_a_lora_point():
    records, memory = front_rows(
        [
            ("lora-r8-gc", None, 0.80, 1000, False),
            ("trady", 20, 0.80, 600, False),  # as good, but above 0.5x
            ("trady-gc", 20, 0.80, 450, False),  # the same training, less memory: answers
        ]
    )
    (answer,) = answer_lora_points(records, memory, ("trady", "medyate"))["image"]
    assert answer.by == ("image", "trady-gc", 20) and answer.ratio == pytest.approx(0.45)


def test_largest_block_groups_saved_bytes_by_numbered_block():
    saved = {"model.embed": 5, "model.layers.0.attn": 3, "model.layers.0.mlp": 4, "model.layers.1.mlp": 6, "": 100}
    assert largest_block(saved) == 7  # the unnumbered entries are not blocks that checkpointing recomputes


def test_the_front_fills_its_own_block_of_the_docs_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "<!-- bench.py -->\nsgd\n<!-- /bench.py -->\n<!-- bench.py front -->\nold\n<!-- /bench.py front -->\n"
    )
    update_docs_page(page, "front ![f](front_lm.png)\n", "quick", tmp_path / "benchmarks" / "front", "adamw")
    text = page.read_text()
    assert "sgd" in text and "old" not in text and "![f](benchmarks/front/front_lm.png)" in text
    assert (
        default_output("quick", "adamw") == OUT / "front" and default_output("full", "adamw") == OUT / "full" / "front"
    )


def test_the_front_runs_a_strategy_at_another_bank_share_checkpointed_and_as_its_twin():
    grid = FrontGrid(
        ranks=(8,),
        fractions=(0.05, 0.2, 1.0),
        checkpointed_fractions=(0.05, 0.2),
        bank_share=0.9,
        bank_share_fractions=(0.2,),
        bank_share_strategies=("medyate",),
    )
    methods = front_methods(grid, [5, 20, 100], checkpointing=True)
    shared = [m for m in methods if m.bank_share is not None]
    assert [m.key for m in shared] == ["medyate-share0.9@20", "medyate-share0.9-gc@20"]  # the twin first
    twin, checkpointed = shared
    assert checkpointed.twin == twin and twin.bank_share == 0.9 and not twin.checkpointing
    assert {"medyate@20", "medyate-gc@20"} <= {m.key for m in methods}  # the default share's points stay
    assert label(checkpointed.row_name) == "medyate, bank_share 0.9 + checkpointing"
    assert not any(m.bank_share for m in front_methods(grid, [5, 20, 100], checkpointing=False))
    # Measured at the same budget, the larger share trains more values; the checkpointed point
    # selects as its twin and pays its twin's largest block.
    task = tiny_lm_task()
    lora = lora_targets_of(task)
    plain = measure_memory(task, REFERENCE, lora, "adamw")
    budget = int(plain["step_total_bytes"] * 0.2)
    default = measure_memory(task, Method("medyate", budget), lora, "adamw")
    twin, checkpointed = (
        Method("medyate", budget, bank_share=0.9),
        Method("medyate", budget, checkpointing=True, bank_share=0.9),
    )
    twin_row, row = front_memory(task, [twin, checkpointed], lora, plain)
    assert twin_row["trainable_values"] > default["trainable_values"]
    assert default["adapter_bank_bytes"] <= 0.5 * budget < twin_row["adapter_bank_bytes"] <= 0.9 * budget
    assert row["method"] == "medyate-share0.9-gc" and row["selected_channels"] == twin_row["selected_channels"]
    assert row["checkpoint_recompute_bytes"] == twin_row["largest_block_saved_bytes"]
    # Its points answer LoRA points as the strategy's own.
    records, memory = front_rows(
        [("lora-r8-gc", None, 0.80, 1000, False), ("medyate-share0.9-gc", 20, 0.80, 450, False)]
    )
    (answer,) = answer_lora_points(records, memory, ("trady", "medyate"))["image"]
    assert answer.by == ("image", "medyate-share0.9-gc", 20)


def test_an_interrupted_grid_resumes_from_its_journal_and_trains_only_the_rest(tmp_path, monkeypatch):
    """The journal holds each run as it ends; a resumed grid returns them unchanged and trains only
    the runs the interruption lost; a journal is refused without --resume or of other sizes."""
    from trady_bench import accuracy
    from trady_bench.journal import RunJournal

    task = tiny_image_task()
    runs = [(Method("head"), seed, lr) for seed in (0, 1) for lr in (1e-3, 1e-2)]
    header = {"task": "image", "preset": "tiny", "protocol": "adamw", "sizes": {"train": 8}}
    path = tmp_path / "image.runs.jsonl"
    real, ran = accuracy.run_one, []

    def interrupted(task, m, seed, lora, lr, optimizer):
        if len(ran) == 3:
            raise KeyboardInterrupt
        ran.append((seed, lr))
        return real(task, m, seed, lora, lr, optimizer)

    monkeypatch.setattr(accuracy, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(task, runs, [], 1, None, "adamw", RunJournal(path, header))
    path.write_text(path.read_text() + '{"method": "head", "budg')  # a line the crash cut short
    with pytest.raises(SystemExit, match="--resume"):
        RunJournal(path, header)
    with pytest.raises(SystemExit, match="delete it"):
        RunJournal(path, {**header, "sizes": {"train": 16}}, resume=True)
    journal = RunJournal(path, header, resume=True)
    assert len(journal) == 3
    ran.clear()
    monkeypatch.setattr(accuracy, "run_one", real)
    resumed = run_grid(task, runs, [], 1, None, "adamw", journal)
    whole = run_grid(task, runs, [], 1, None, "adamw")
    assert [(r["seed"], r["lr"]) for r in resumed] == [(seed, lr) for _, seed, lr in runs]
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in whole]
    assert len(RunJournal(path, header, resume=True)) == 4
    journal.close()
    assert not path.exists()


def test_the_benchmark_command_refuses_an_interrupted_runs_journal_without_resume_before_loading(
    tmp_path, monkeypatch
):
    from trady_bench import cli

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "image.runs.jsonl").write_text('{"task": "image"}\n')
    loaded = []
    monkeypatch.setitem(cli.TASKS, "image", lambda sizes: loaded.append(sizes))
    with pytest.raises(SystemExit, match="Add --resume to keep them"):
        cli.main(["--preset", "quick", "--tasks", "image", "--output-dir", str(tmp_path)])
    assert not loaded  # refused before the data and the model load
    with pytest.raises(SystemExit, match="delete it to start the task over"):  # another run's journal
        cli.main(["--preset", "quick", "--tasks", "image", "--output-dir", str(tmp_path), "--resume"])
    assert not loaded and (raw / "image.runs.jsonl").read_text() == '{"task": "image"}\n'  # nothing lost
