"""Markdown tables, as every report and measurement prints them: `| a | b |` rows under a `| --- |` rule."""
from __future__ import annotations

from typing import Iterable, List, Sequence


def markdown_row(cells: Sequence[object]) -> str:
    """One table row: `| a | b |`."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]] = ()) -> List[str]:
    """A table's lines: the header, the rule, then one line per row."""
    return [markdown_row(header), "|" + " --- |" * len(header), *(markdown_row(r) for r in rows)]
