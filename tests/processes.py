"""Running test code in fresh Python processes: one (`run_python`) or several ranks (`run_processes`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

#: the repository root: the working directory of the processes, and their PYTHONPATH
ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    """Run ``code`` in a fresh offline Python process at the repository root; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(worker: str, world: int, *args: str, env: dict[str, str] | None = None) -> None:
    """Run ``python -m worker RANK WORLD *args PORT`` for ranks ``0 .. world - 1`` (gloo on CPU, one
    thread each) and fail with a rank's stderr if it fails. ``env`` adds variables (e.g. CUDA's)."""
    port = free_port()
    # The caller's PYTHONPATH too: DeepSpeed may be installed outside the environment (see the DeepSpeed test).
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", worker, str(rank), str(world), *args, str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
