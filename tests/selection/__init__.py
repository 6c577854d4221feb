"""Tests of `trady_peft.selection`: strategies, draws and importance tables."""
