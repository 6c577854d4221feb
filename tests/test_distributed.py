"""Issue 3 acceptance: two CPU processes (gloo) draw identical channels and end identical."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("strategy", ["trady", "medyate"])
def test_two_ranks_agree_on_every_selection_and_end_identical(strategy, tmp_path):
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker", str(rank), "2", strategy, str(tmp_path), str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    sel = [json.loads((tmp_path / f"selections{r}.json").read_text()) for r in range(2)]
    assert sel[0] == sel[1]
    assert sel[0][0] != sel[0][1]  # channels really were redrawn between epochs
    a, b = (torch.load(tmp_path / f"adapter{r}.pt") for r in range(2))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-5, atol=1e-7)
