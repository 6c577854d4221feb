"""What the frozen-path twins share: bit-packed masks round-trip."""

from __future__ import annotations

import torch

from trady_peft.memory.frozen_path.common import pack_bits, unpack_bits


def test_bit_packing_round_trips():
    mask = torch.rand(3, 5, 7) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
