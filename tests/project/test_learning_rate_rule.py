"""benchmarks/learning_rate_rule.py: the rule against each sweep's best rate, from a front file."""

from __future__ import annotations

import learning_rate_rule  # benchmarks/ is on pytest's pythonpath
import pytest

from trady_peft.recommend import learning_rate_for


def test_each_strategy_point_is_compared_with_its_sweeps_best_rate(capsys):
    front = {
        "tasks": {
            "lm": {
                "memory": [
                    {"method": "trady", "budget_bytes": 100, "adapter_bank_bytes": 16 * 2_000_000},
                    {"method": "lora-r8", "budget_bytes": None},
                ],
                "sweep": [
                    {"method": "trady", "budget_bytes": 100, "lr": 3e-3, "tried": {"0.001": 2.0, "0.003": 1.0}},
                    {"method": "lora-r8", "budget_bytes": None, "lr": 1e-3, "tried": {"0.001": 1.0}},
                ],
                "sweep_records": [{"method": "trady", "perplexity": 1.0}],
            }
        }
    }
    (row,) = learning_rate_rule.rows(front)  # LoRA has no bank: left out
    assert row[:4] == ("lm", "trady", 100 / 2**20, 2_000_000)
    rule = learning_rate_for(2_000_000, "causal_lm")  # a task measured in perplexity: the causal-LM rule
    assert row[4] == rule and row[6] == pytest.approx(3e-3 / rule)
