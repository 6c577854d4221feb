"""Tests of `trady_peft.memory.frozen_path`: the twins of frozen modules on the backprop path."""
