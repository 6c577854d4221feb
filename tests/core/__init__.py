"""Tests of `trady_peft.core`: the channel-sparse layer and what it stands on."""
