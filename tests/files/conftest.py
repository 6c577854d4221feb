"""Fixtures of the adapter-file tests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import tiny_cnn_adapter

FILE = "adapter_model.safetensors"
IDX = "base_model.model.stem.trady_indices"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real tiny adapter on disk, its tensors and the outputs it gives."""
    path = tmp_path_factory.mktemp("good")
    model = tiny_cnn_adapter().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = model(pixel_values=x)["logits"].detach()
    model.save_pretrained(path)
    tensors = load_file(path / FILE)
    assert tensors[IDX].numel() >= 2 and tensors[IDX].dtype == torch.int32
    return path, tensors, x, expected
