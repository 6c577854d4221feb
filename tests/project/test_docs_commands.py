"""The commands that README.md and docs/ show run as written, after the README's set-up.

The README's set-up is `make setup` (or `make quickstart`) and `source .venv/bin/activate`. The
tests run the commands from the repository root in the environment of the Python that runs them
(in CI that is `.venv` itself): its bin/ first on PATH, as activation puts it, and this checkout
first on PYTHONPATH. Commands come from the shell blocks of the pages (```bash) and from their
inline code that starts with a program (`make test`, `python benchmarks/bench.py --preset quick`).

The fast tests check that every command resolves (the program is installed; the script, the make
target, the pip extra, the trady-peft sub-command and its flags exist: values are not checked, the
docs show some being refused), run the cheap ones (`--help`, the activation) and check that the
README's comment on `make test` names every tool the target runs; the slow test runs the shell
blocks' other commands.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
PROGRAMS = ("make", "python", "trady-peft", "pip", "source", "mkdocs", "pytest", "bash", "torchrun", "accelerate")
#: Parts of commands that stand for the reader's own files or values: such commands are checked, never run.
PLACEHOLDERS = ("./my-hf-model", "my_models.py", "train.py", " DIR ", " N ")
VENV_BIN = Path(sys.executable).parent


def shell_blocks(text: str) -> list[str]:
    """The commands of the page's shell blocks: continuation lines joined, comments dropped."""
    commands = []
    for fence, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if fence in SHELL_FENCES:
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(shlex.join(words))
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline code outside the code blocks that starts with a program and gives it arguments."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    return [span for span in spans if program(span.split()[0]) in PROGRAMS and len(span.split()) > 1]


def program(word: str) -> str:
    """The program a command's first word names (`.venv/bin/trady-peft` is trady-peft, run without activating)."""
    return word.removeprefix(".venv/bin/")


def documented_commands(inline: bool = True) -> list[tuple[str, str]]:
    """(page, command) for the shell blocks' commands, and the inline ones unless `inline` is False."""
    found = []
    for page in PAGES:
        text = page.read_text()
        found += [(page.name, command) for command in shell_blocks(text) + (inline_commands(text) if inline else [])]
    return found


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def environment() -> dict[str, str]:
    """The environment `source .venv/bin/activate` gives, for the venv that runs the tests."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def in_this_venv(command: str) -> str:
    """`command` with `.venv/bin/` pointing at the venv that runs the tests when this checkout has no .venv."""
    if (ROOT / ".venv" / "bin").is_dir():
        return command
    return command.replace(".venv/bin/", f"{Path(sys.prefix) / 'bin'}/")


def run(command: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def unresolved(command: str) -> str | None:
    """Why `command` would not run as written, or None."""
    from trady_peft_cli import build_parser

    words = shlex.split(command)
    name, args = program(words[0]), words[1:]
    if name == "source":
        venv = re.search(r"^VENV\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
        if args != [f"{venv}/bin/activate"]:
            return f"activates {args}, but `make setup` makes {venv}"
        return None if (Path(sys.prefix) / "bin" / "activate").exists() else "the tests do not run in a venv"
    if shutil.which(name, path=environment()["PATH"]) is None:
        return f"{name} is not installed in {VENV_BIN}"
    if name == "make":
        missing = [a for a in args if not a.startswith("-") and "=" not in a and a not in make_targets()]
        return f"no make target {missing}" if missing else None
    if name == "pip" and args[:2] == ["install", "-e"]:
        extras = re.fullmatch(r"\.(?:\[(\w+)\])?", args[2]).group(1)
        declared = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
        return None if extras is None or re.search(rf"^{extras} = \[", declared, re.M) else f"no extra {extras!r}"
    if name in ("python", "bash") and args and args[0].endswith((".py", ".sh")):
        return None if (ROOT / args[0]).exists() else f"{args[0]} does not exist"
    if name == "trady-peft" and args and args[0] != "--help":
        sub_commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
        if args[0] not in sub_commands:
            return f"no sub-command {args[0]!r}"
        flags = {flag for action in sub_commands[args[0]]._actions for flag in action.option_strings}
        unknown = [a for a in args[1:] if a.startswith("--") and a.split("=")[0] not in flags]
        return f"trady-peft {args[0]} has no {unknown}" if unknown else None
    return None


def test_the_pages_show_commands_in_shell_blocks_and_prose():
    commands = [command for _, command in documented_commands()]
    assert "source .venv/bin/activate" in commands
    assert "trady-peft --help" in commands and "python examples/quickstart.py --help" in commands
    assert any(c.startswith("trady-peft memory --model benchmarks/paper_models.py") for c in commands)


def test_every_documented_command_resolves():
    problems = [(page, command, why) for page, command in documented_commands() if (why := unresolved(command))]
    assert not problems


def test_the_readme_says_how_to_use_the_venv_and_how_to_install_elsewhere():
    readme = [command for page, command in documented_commands() if page == "README.md"]
    assert "source .venv/bin/activate" in readme and ".venv/bin/trady-peft --help" in readme
    assert "pip install -e ." in readme and "pip install -e '.[examples]'" in readme


def test_the_activation_puts_the_venv_first_and_the_help_commands_answer():
    activate = in_this_venv("source .venv/bin/activate")
    done = run(f"{activate} && command -v python && command -v trady-peft")
    assert done.returncode == 0, done.stderr
    python, trady_peft = done.stdout.split()
    assert Path(python).parent == Path(trady_peft).parent == Path(sys.prefix) / "bin"

    helps = sorted({c for _, c in documented_commands() if c.endswith("--help")})
    assert len(helps) >= 3
    for command in helps:
        done = run(f"{activate} && {in_this_venv(command)}", timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-2000:])


def test_the_readme_says_what_make_test_runs():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    tools = {re.search(r"\$\(BIN\)/(?:python -m )?([\w-]+)", line).group(1) for line in recipe.splitlines()}
    assert {"pytest", "mkdocs", "ruff"} <= tools
    readme = (ROOT / "README.md").read_text()
    comment = re.search(r"^make test +#(.*)$", readme, re.M).group(1)
    assert all(tool in comment for tool in tools), comment


@pytest.mark.slow  # the shell blocks' real commands: minutes (make quickstart, make test, trady-peft memory)
def test_the_shell_blocks_run_as_written(tmp_path):
    """Every shell-block command but the benchmarks (their runs and durations are recorded in docs/benchmarks.md),
    the pip installs (into the reader's own environment), the activation and the `--help` commands (the fast tests
    run those) and the commands naming the reader's own files. trady-peft commands run in a copy of the checkout
    (one writes a chart into docs/); make commands run here, and only when the tests run in this checkout's .venv."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "build", "site", "__pycache__"))
    own_venv = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()
    ran = []
    for page, command in documented_commands(inline=False):
        if command in ran or any(p in f" {command} " for p in PLACEHOLDERS) or command.endswith("--help"):
            continue
        if command.startswith(("make bench", "python benchmarks/", "source ", "pip ")):  # pip: the reader's venv
            continue
        if command.startswith("make ") and not own_venv:
            continue
        done = run(command, cwd=ROOT if command.startswith("make ") else copy, timeout=1200)
        assert done.returncode == 0, (page, command, done.stdout[-2000:], done.stderr[-2000:])
        ran.append(command)
    assert any(c.startswith("trady-peft memory") for c in ran) and any(c.startswith("trady-peft budget") for c in ran)
