"""The side-by-side memory report: TraDy's row states its budget and the footprint measured against it."""

from __future__ import annotations

import torch

import trady_peft


def test_the_memory_report_prints_budget_and_measured_footprint():
    import re

    from tests.tiny_models import tiny_cnn
    from trady_peft.report import compare_memory

    config = trady_peft.TraDyConfig(memory_budget="6KiB", strategy="d-full-random", modules_to_save=["classifier"])
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    report = compare_memory(tiny_cnn, batch, config)
    note = report.row("TraDy").note
    found = re.search(
        r"measured footprint ([\d,]+) B \(bank ([\d,]+) \+ saved inputs ([\d,]+)\) of the 6,144-byte", note
    )
    assert found, note
    total, bank, saved = (int(g.replace(",", "")) for g in found.groups())
    assert total == bank + saved <= 6144 and saved > 0
