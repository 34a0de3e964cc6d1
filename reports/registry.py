"""Report tables register themselves: a suite's `table:` names one, `reports.tables` renders it.

A table is one function, `(row, p) -> the paper's mAP (or None)`, decorated with `@register_table`;
`row` is a `RowKey` (arch, alpha, recurrent type, placement, alpha_lstm) and `p` the occlusion level
of the column (None: the clean column). Extra columns and a figure are optional arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ablations.records import TrialRecord

RowKey = Dict[str, object]
PaperMap = Callable[[RowKey, Optional[float]], Optional[float]]


@dataclass(frozen=True)
class Columns:
    """Extra columns after the costs: their headers, and their cells for one row's records."""

    header: Tuple[str, ...]
    cells: Callable[[RowKey, List[TrialRecord]], List[str]]


@dataclass(frozen=True)
class TableSpec:
    name: str
    paper_map: PaperMap
    columns: Tuple[Columns, ...] = ()
    figure: Optional[Callable[[List[TrialRecord], Path], List[str]]] = None  # draws into the report folder


TABLES: Dict[str, TableSpec] = {}


def register_table(name: str, columns: Sequence[Columns] = (),
                   figure: Optional[Callable[[List[TrialRecord], Path], List[str]]] = None) -> Callable[[PaperMap], PaperMap]:
    """Register a suite table under `name` (what a suite YAML's `table:` says)."""
    def decorate(paper_map: PaperMap) -> PaperMap:
        TABLES[name] = TableSpec(name, paper_map, tuple(columns), figure)
        return paper_map
    return decorate


def table_spec(name: str) -> TableSpec:
    if name not in TABLES:
        raise ValueError(f"unknown report table {name!r}; valid: {', '.join(sorted(TABLES))} "
                         "(or register one with reports.registry.register_table)")
    return TABLES[name]
