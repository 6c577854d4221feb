"""The test suite, one folder per room of the package (tests/README.md)."""
