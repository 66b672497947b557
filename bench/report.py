"""Where every bench leaves what it measured: ``bench/results/<stem>.json`` (the numbers, with the command that
made them) and ``<stem>.md`` (the table the README quotes)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(stem: str, doc: dict, text: str, echo: bool = True) -> Path:
    """Write ``doc`` as ``bench/results/<stem>.json`` and ``text`` as ``<stem>.md`` (and print ``text`` when
    ``echo``); returns the path without suffix, for a plot beside them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / stem
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    path.with_suffix(".md").write_text(text)
    if echo:
        print(text)
    return path
