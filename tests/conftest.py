"""Shared test set-up: one intra-op thread (the tests' tiny kernels run faster without thread
hand-offs on a 2-core machine). Imports of `tests.*`, `examples/` and `benchmarks/` work through
pytest's `pythonpath` setting in pyproject.toml."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
