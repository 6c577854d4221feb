"""The benchmark process's environment: set up (the examples importable, libraries quiet) and described."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import sys
from pathlib import Path

import transformers

#: The repository root (benchmarks/trady_bench/ is two levels below it).
ROOT = Path(__file__).resolve().parents[2]


def examples_importable() -> None:
    """Put examples/ on ``sys.path`` (once), for the offline assets the tasks load."""
    folder = str(ROOT / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)


def quiet() -> None:
    """The examples' assets importable; transformers', datasets' and trady_peft's chatter (and
    transformers' weight-loading bars, which each worker process would print) off."""
    examples_importable()
    import datasets  # an examples extra: imported when a run sets up

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("trady_peft").setLevel(logging.ERROR)


def environment(command: str, threads: int) -> dict:
    """What a result file records about its run: the command, the date, package versions, the machine."""
    versions = {}
    for pkg in ("torch", "transformers", "peft", "datasets", "evaluate", "trady-peft", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**versions, "python": platform.python_version()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
        },
    }
