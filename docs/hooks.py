"""MkDocs hook: pages say `<!-- config-table -->` where the table of `TraDyConfig` fields goes.

The table is generated from the dataclass fields' `help` metadata at build time, so the docs and
the code have one source.
"""

from __future__ import annotations

import dataclasses

MARKER = "<!-- config-table -->"


def config_table() -> str:
    from peft.config import PeftConfig

    import trady_peft

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(trady_peft.TraDyConfig):
        help_text = f.metadata.get("help")
        if f.name in inherited and f.name not in ("target_modules",) or not help_text:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append(f"| `{f.name}` | `{default!r}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, config_table()) if MARKER in markdown else markdown
