"""`import trady_peft` prints nothing, and `trady-peft --help` answers without loading torch.

`make setup` installs bitsandbytes and torchao (the `dev` extra, for the quantized-base tests);
imported by peft, they log five lines on every start (trady_peft/_quiet_import.py says which).
The command line reads its arguments in `trady_peft_cli`, outside the package, so `--help` and
argument errors never import torch, transformers or peft (seconds of imports; the help itself
takes milliseconds).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "trady_peft")


def python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter of this environment, from the repository root."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def console_script() -> tuple[str, str]:
    """The module and function the `trady-peft` console script runs, as pyproject.toml declares them."""
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    module, function = re.search(r'^trady-peft\s*=\s*"([\w.]+):(\w+)"', scripts, re.M).groups()
    return module, function


def test_import_trady_peft_prints_nothing():
    done = python("import trady_peft")
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


def test_the_examples_imports_print_nothing():
    """The examples import trady_peft (or their assets module, which imports it) before peft, transformers
    and evaluate, which load the quantization backends."""
    code = "import sys; sys.path.insert(0, 'examples'); import datasets, offline_assets, peft, transformers, evaluate"
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


def test_our_warnings_and_the_backends_later_logs_still_show(caplog):
    import warnings

    import trady_peft
    from trady_peft._quiet_import import BACKEND_IMPORT_LOGGERS

    assert all(logging.getLogger(name).level == logging.NOTSET for name in BACKEND_IMPORT_LOGGERS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # the filters a plain `python` run has
        trady_peft.TraDyConfig(strategy="d-full-random", top_k=3)
    assert any("does not use layer_ranking or top_k" in str(w.message) for w in caught)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("torchao after the import")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("bitsandbytes after the import")
    assert "torchao after the import" in caplog.text and "bitsandbytes after the import" in caplog.text


@pytest.mark.parametrize("argv", [["--help"], ["budget", "--help"], ["memory", "--help"], ["rank-layers", "--help"]])
def test_the_help_of_the_console_script_imports_no_torch_transformers_or_peft(argv):
    module, function = console_script()
    done = python(
        "import sys\n"
        f"from {module} import {function} as main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n"
    )
    assert done.returncode == 0, done.stderr
    assert "usage: trady-peft" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_wrong_argument_is_refused_before_torch_loads():
    module, function = console_script()
    done = python(
        "import sys\n"
        f"from {module} import {function} as main\n"
        "try:\n"
        "    main(['budget', '--model', 'm.py:f', '--input-shape', 'x'])\n"
        "except SystemExit as exit:\n"
        f"    print(exit.code, sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n"
    )
    assert "is not a shape such as 3,128,128" in done.stderr
    assert done.stdout.strip() == "2 []"


def test_trady_peft_cli_keeps_the_parser_and_main():
    from trady_peft import cli
    from trady_peft_cli import build_parser, main

    assert cli.build_parser is build_parser and cli.main is main
    args = build_parser().parse_args(["budget", "--model", "m.py:f", "--input-shape", "3,8,8"])
    assert cli.COMMANDS[args.command] is cli.cmd_budget and args.input_shape == [3, 8, 8]
