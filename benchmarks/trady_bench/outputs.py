"""What a benchmark writes: the JSON files, the plots, ``table.md``, and the docs page's generated block."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .environment import ROOT
from .front_report import front_markdown
from .plots import artifact_plot, front_plot, pareto_plot
from .report import report_markdown

#: Where the quick preset's results go (the other presets: a folder inside it).
OUT = ROOT / "docs" / "benchmarks"
#: The docs page whose markers receive the generated tables.
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"


def default_output(preset: str, protocol: str = "sgd") -> Path:
    """Where a preset's results go: docs/benchmarks (quick), docs/benchmarks/<preset> (the others);
    the front (``protocol="adamw"``) in a ``front`` folder inside."""
    out = OUT if preset == "quick" else OUT / preset
    return out / "front" if protocol == "adamw" else out


def write_json(path: Path, env: dict, key: str, rows: Any) -> None:
    """``env`` and ``rows`` (under ``key``) as one indented JSON file."""
    path.write_text(json.dumps({**env, key: rows}, indent=1, default=float) + "\n")


def write_outputs(results: dict[str, dict], env: dict, out: Path) -> None:
    """Every output of ``results`` (task name -> `run_task`'s result) under ``out``; the docs page's
    block too when ``out`` is the preset's default folder."""
    out.mkdir(parents=True, exist_ok=True)
    records = [r for t in results.values() for r in t["records"]]
    memory = [r for t in results.values() for r in t["memory"]]
    speed = [r for t in results.values() for r in t["speed"]]
    artifacts = [t["artifact"] for t in results.values()]
    titles = {k: t["title"] for k, t in results.items()}
    tasks_meta = {
        k: {
            key: t.get(key)
            for key in (
                "title",
                "notes",
                "lora_targets",
                "target_layers",
                "budgets",
                "untrained",
                "lr",
                "max_grad_norm",
                "elapsed",
                "run",
            )
        }
        for k, t in results.items()
    }
    write_json(out / "accuracy.json", {**env, "tasks": tasks_meta}, "records", records)
    write_json(out / "memory.json", env, "rows", memory)
    write_json(out / "speed.json", env, "rows", speed)
    write_json(out / "artifact.json", env, "runs", artifacts)
    pareto_plot(records, memory, out / "pareto.png", titles)
    artifact_plot(artifacts, out / "artifact.png", titles)
    table = report_markdown(results, env, records, memory, speed, artifacts, titles)
    (out / "table.md").write_text(table)
    preset = env.get("preset", {}).get("name", "quick")
    if out.resolve() == default_output(preset).resolve():
        update_docs_page(DOCS_PAGE, table, preset, out)


def markers(preset: str, protocol: str = "sgd") -> tuple[str, str]:
    """The docs page's markers around a preset's generated tables (``front`` in them for the front)."""
    name = "bench.py" if preset == "quick" else f"bench.py {preset}"
    name += " front" if protocol == "adamw" else ""
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def update_docs_page(page: Path, table: str, preset: str = "quick", out: Path = OUT, protocol: str = "sgd") -> None:
    """Put the generated tables (``<out>/table.md`` or ``front.md``) between the page's markers for
    ``preset`` and ``protocol``; the plots they name are linked from the page's folder."""
    folder = Path(os.path.relpath(out, page.parent)).as_posix()  # table.md sits next to its plots
    table = re.sub(r"\]\(([\w-]+\.png)\)", lambda m: f"]({folder}/{m.group(1)})", table)
    replace_between(page, *markers(preset, protocol), table)


def replace_between(page: Path, begin: str, end: str, text: str) -> None:
    """Put ``text`` between the markers ``begin`` and ``end`` of ``page`` (a SystemExit if either is missing)."""
    content = page.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{page} lacks the {begin} ... {end} markers that the benchmark fills.")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{text}{end}{tail}")


def write_front_outputs(results: dict[str, dict], env: dict, out: Path) -> None:
    """The front's outputs under ``out``: ``front.json`` (every task's points, memory, sweep and
    records, with ``env``), one plot per task (``front_<task>.png``) and ``front.md``; the docs
    page's block too when ``out`` is the preset's default folder."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "front.json", env, "tasks", results)
    for name, result in results.items():
        front_plot(result, out / f"front_{name}.png")
    table = front_markdown(results, env)
    (out / "front.md").write_text(table)
    preset = env.get("preset", {}).get("name", "quick")
    if out.resolve() == default_output(preset, "adamw").resolve():
        update_docs_page(DOCS_PAGE, table, preset, out, "adamw")
