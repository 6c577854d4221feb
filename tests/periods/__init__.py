"""Tests of `trady_peft.periods`: prices, draws, redraws and the moves from one period to the next."""
