"""Tests of `trady_peft.core.distributed` and `collectives`: several ranks, and the workers they run."""
