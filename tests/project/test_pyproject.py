"""pyproject.toml: an SPDX license, a setuptools that reads it, and the examples' dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_pyproject_uses_an_spdx_license_and_ships_the_example_dependencies():

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project["project"]["classifiers"])
    assert "setuptools>=77" in project["build-system"]["requires"]
    extra = " ".join(project["project"]["optional-dependencies"]["examples"])
    assert "datasets" in extra and "evaluate" in extra
