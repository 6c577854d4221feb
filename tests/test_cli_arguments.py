"""The CLI refuses a bad budget or batch size with argparse's usage error, naming the value."""

from __future__ import annotations

import pytest

from trady_peft.cli import main

MODEL = ["--model", "tests/tiny_models.py:tiny_cnn", "--input-shape", "3,16,16"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["memory", *MODEL, "--budget", "1e400B"], "memory_budget='1e400B' is too large"),
        (["memory", *MODEL, "--budget", "1.5B"], "memory_budget='1.5B' is 1.5 bytes, not a whole number"),
        (["memory", *MODEL, "--batch-size", "0"], "'0' is not a positive int"),
        (["budget", *MODEL, "--batch-size", "0"], "'0' is not a positive int"),
    ],
)
def test_bad_cli_arguments_are_usage_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err
