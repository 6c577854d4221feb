"""`TraDyConfig`: bad input gets a clear error naming the value and the remedy; numpy numbers are
accepted as plain Python numbers; seeds and channel counts keep to their documented limits.

The table of ``docs/errors.md`` is the list of cases: every row is executed here, so the page
cannot drift from what the code says. Config objects only (no model), to stay fast.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from trady_peft import TraDyCallback, TraDyConfig
from trady_peft.memory.budget import parse_budget
from trady_peft.selection.draws import MAX_SEED, period_generator

PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
RAISES = {"ValueError": ValueError, "UserWarning": UserWarning}


def error_rows() -> list[tuple[str, str, list[str]]]:
    """(code, exception name, message fragments) of each row of the page's error table."""
    rows, in_table = [], False
    for line in PAGE.read_text().splitlines():
        if line.startswith("| Bad input |"):
            in_table = True
            continue
        if in_table and line.startswith("|---"):
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert len(cells) == 3, f"a row of the error table needs 3 cells: {line}"
            code, kind, message = cells
            fragments = [f.strip() for f in message.split(" … ")]
            assert all(f.startswith("`") and f.endswith("`") for f in [code, kind, *fragments]), line
            rows.append((code[1:-1], kind[1:-1], [f[1:-1] for f in fragments]))
    return rows


ROWS = error_rows()


def run(code: str):
    return eval(code, {"TraDyConfig": TraDyConfig, "TraDyCallback": TraDyCallback, "parse_budget": parse_budget})


def test_the_error_table_is_large_and_every_row_names_the_value_and_the_remedy():
    assert len(ROWS) >= 30, len(ROWS)
    codes = [code for code, _, _ in ROWS]
    assert len(set(codes)) == len(codes), "a row is repeated"
    for code, kind, fragments in ROWS:
        assert kind in RAISES, (code, kind)
        assert len(fragments) >= 2, f"{code}: give the value and the remedy as separate fragments"
        assert "=" in fragments[0], f"{code}: the first fragment must name the value (name=value)"


@pytest.mark.parametrize("code, kind, fragments", ROWS, ids=[r[0] for r in ROWS])
def test_every_row_of_the_error_table_really_says_so(code, kind, fragments):
    if kind == "UserWarning":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(code)
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert messages, f"{code} did not warn"
        message = messages[0]
    else:
        with pytest.raises(RAISES[kind]) as info:
            run(code)
        message = str(info.value)
    pattern = ".*".join(re.escape(f) for f in fragments)
    assert re.search(pattern, message, re.DOTALL), f"{code}:\n  message: {message}\n  expected: {fragments}"


def test_numpy_numbers_are_accepted_and_stored_as_plain_python_numbers(tmp_path):
    config = TraDyConfig(
        memory_budget=np.int64(27946), seed=np.int64(3), top_k=np.int32(2), gradient_batches=np.int8(4)
    )
    assert type(config.memory_budget) is int and config.budget.amount == 27946
    assert type(config.seed) is int and type(config.top_k) is int and type(config.gradient_batches) is int
    json.dumps(config.to_dict(), default=sorted)  # sets (target_modules) aside, plain JSON
    config.save_pretrained(tmp_path)
    assert TraDyConfig.from_pretrained(tmp_path).memory_budget == 27946
    fraction = TraDyConfig(channels_per_layer=np.float32(0.25), medyate_alpha=np.float64(0.3))
    assert type(fraction.channels_per_layer) is float and fraction.channels_per_layer == 0.25
    assert type(fraction.medyate_alpha) is float
    count = TraDyConfig(channels_per_layer=np.int64(3))
    assert type(count.channels_per_layer) is int and count.channels_for(8) == 3
    assert type(TraDyCallback(resample_every_steps=np.int64(10)).resample_every_steps) is int


def test_the_largest_seed_works_with_every_distinct_period():
    assert TraDyConfig(seed=MAX_SEED).seed == MAX_SEED
    period_generator(MAX_SEED, 1_000_002)  # fits a torch generator seed
    with pytest.raises(ValueError, match="too large"):
        TraDyConfig(seed=MAX_SEED + 1)


def test_clamping_channels_per_layer_warns_once():
    config = TraDyConfig(channels_per_layer=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config.channels_for(8) == 8
        assert config.channels_for(4) == 4
        assert config.channels_for(16) == 12
    assert len(caught) == 1 and "8 input channels" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TraDyConfig(channels_per_layer=1.0).channels_for(3) == 3  # a fraction is never clamped


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels_per_layer": 0}, "at least 1"),
        ({"channels_per_layer": 1.5}, "(0, 1]"),
        ({"channels_per_layer": "10%"}, "must be an int"),
        ({"strategy": "greedy"}, "strategy='greedy' is unknown"),
        ({"seed": 1.5}, "seed=1.5"),
    ],
)
def test_bad_config_values_are_rejected_with_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=rf".*{__import__('re').escape(message)}"):
        TraDyConfig(**kwargs)
