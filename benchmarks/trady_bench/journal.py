"""The run journal: each training run of a task, appended to ``<output>/raw/<task>.runs.jsonl`` as
it ends, so that an interrupted benchmark resumes (``--resume``) without training again the runs
it had finished. The task's results replace the journal once they are written."""

from __future__ import annotations

import json
import os
from pathlib import Path


def run_key(method: str, budget: int | None, seed: int, optimizer: str, lr: float) -> tuple:
    """What identifies a run of a task: its point (method row, budget), seed, optimizer and rate."""
    return (method, budget, seed, optimizer, float(lr))


def key_of(record: dict) -> tuple:
    """`run_key` of a finished run's record."""
    return run_key(record["method"], record["budget_bytes"], record["seed"], record["optimizer"], record["lr"])


class RunJournal:
    """The finished runs of one task, read from ``path`` and appended to it.

    The file's first line is ``header`` (task, protocol, preset, sizes): a journal of another
    header is refused, as is an existing journal without ``resume`` (its runs are kept until the
    user chooses). A last line cut short by a crash is dropped."""

    def __init__(self, path: Path, header: dict, resume: bool = False):
        self.path, self._records = Path(path), {}
        if self.path.exists():
            if not resume:
                raise SystemExit(
                    f"{self.path}: an interrupted run left its finished runs here. Add --resume to keep them and "
                    f"run only the rest, or delete the file to start the task over."
                )
            lines = self.path.read_text().splitlines()
            found = json.loads(lines[0]) if lines else None
            if found != header:
                raise SystemExit(
                    f"--resume: {self.path} holds runs of {found}, not of {header}; delete it to start the task over."
                )
            for i, line in enumerate(lines[1:], start=2):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines):  # the line a crash cut short: dropped from the file too
                        self.path.write_text("\n".join(lines[:-1]) + "\n")
                        continue
                    raise
                self._records[key_of(record)] = record
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header) + "\n")

    def __len__(self) -> int:
        return len(self._records)

    def find(self, method: str, budget: int | None, seed: int, optimizer: str, lr: float) -> dict | None:
        """A copy of the finished run with these keys, or None."""
        record = self._records.get(run_key(method, budget, seed, optimizer, lr))
        return dict(record) if record is not None else None

    def add(self, record: dict) -> None:
        """Append a finished run to the file (flushed to disk before it returns)."""
        self._records[key_of(record)] = dict(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Remove the file: the task's results, written, hold every run."""
        self.path.unlink(missing_ok=True)
