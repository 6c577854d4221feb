"""A forward that only one process runs (validation without no_grad) runs no collective: the DDP run
under a byte budget completes, and both ranks price and draw alike."""

from __future__ import annotations

import json

import pytest

from tests.core.distributed.test_two_ranks import run_two_ranks


@pytest.mark.slow  # two processes
def test_a_validation_forward_on_one_rank_does_not_hang_a_budgeted_ddp_run(tmp_path):
    run_two_ranks("tests.core.distributed.validation_worker", str(tmp_path))
    ranks = [json.loads((tmp_path / f"validation{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["selections"] == ranks[1]["selections"]
    # Rank 0's larger batch was priced on both ranks at the next optimizer step (and the period redrawn).
    assert ranks[0]["batch_sizes"] == ranks[1]["batch_sizes"] == [8]
    assert ranks[0]["selections"][0] != ranks[0]["selections"][1]
    assert ranks[0]["cost"] <= 12 * 1024
