"""The API reference documents exactly the public surface, and every public symbol has a docstring."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import trady_peft

API = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()


def test_every_public_symbol_has_a_docstring_in_the_api_reference():
    missing_doc, missing_ref = [], []
    for name in trady_peft.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(trady_peft, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing_doc.append(name)
        if f"::: trady_peft.{name}\n" not in API:
            missing_ref.append(name)
    assert not missing_doc, f"no docstring: {missing_doc}"
    assert not missing_ref, f"not in docs/api.md: {missing_ref}"


def test_the_api_reference_documents_nothing_outside_the_public_surface():
    documented = re.findall(r"^::: trady_peft\.(\S+)$", API, flags=re.M)
    assert sorted(documented) == sorted(n for n in trady_peft.__all__ if not n.startswith("__"))
