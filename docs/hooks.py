"""The table of `TraDyConfig` fields in docs/config.md, generated from the fields' `help` metadata.

docs/config.md holds the table between `<!-- config-table -->` and `<!-- /config-table -->`, so it reads
the same on the repository host as on the built site. `python docs/hooks.py` rewrites it after a field
changes (tests/project/test_docs_consistency.py fails while it is stale); as an MkDocs hook, the same function
puts the current table into the built page.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

BEGIN, END = "<!-- config-table -->", "<!-- /config-table -->"
CONFIG_PAGE = Path(__file__).resolve().parent / "config.md"


def config_table() -> str:
    import trady_peft  # before any peft import: it keeps the quantization backends' import-time logs out

    config = trady_peft.TraDyConfig
    inherited = {f.name for f in dataclasses.fields(config.__base__)}  # peft's PeftConfig
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(config):
        help_text = f.metadata.get("help")
        if f.name in inherited and f.name not in ("target_modules",) or not help_text:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append(f"| `{f.name}` | `{default!r}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def with_config_table(markdown: str) -> str:
    """`markdown` with the current table between `BEGIN` and `END`."""
    block = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    return block.sub(lambda _: f"{BEGIN}\n{config_table()}\n{END}", markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return with_config_table(markdown) if BEGIN in markdown else markdown


if __name__ == "__main__":
    CONFIG_PAGE.write_text(with_config_table(CONFIG_PAGE.read_text()))
    print(f"wrote {CONFIG_PAGE}")
