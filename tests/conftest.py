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


@pytest.fixture(autouse=True)
def library_log_levels():
    """Each test starts with trady_peft's and transformers' log levels as the one before found them (a
    benchmark's `quiet()` silences both for a whole process)."""
    import logging

    import transformers

    level, verbosity = logging.getLogger("trady_peft").level, transformers.logging.get_verbosity()
    yield
    logging.getLogger("trady_peft").setLevel(level)
    transformers.logging.set_verbosity(verbosity)
