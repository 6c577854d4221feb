"""Fixtures of the core tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """Float64 as torch's default dtype during the test, for exact comparisons with a dense reference."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
