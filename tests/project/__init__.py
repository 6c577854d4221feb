"""Checks of the project around the package: docs, examples, README, benchmarks, packaging."""
