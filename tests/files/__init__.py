"""Tests of `trady_peft.files`: what an adapter file holds, how it is checked and saved."""
