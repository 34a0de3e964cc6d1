"""One typed record per finished trial: the only thing that passes from the sweep to the reports.

`TrialRecord` is written (from the study's user attributes) and read (from runs/<suite>/results.csv)
by this module alone; reports consume records, never column names. The file keeps one row per trial
with `axis.`, `metric.` and `config.` columns, so that a spreadsheet or pandas still reads it; the
column names are this module's business. A file written before the schema column existed (schema 0)
has the same layout and loads as is.

Metrics are held by stream and occlusion level: `metrics[p][name]`, with p = 0.0 the clean
evaluation (`val/vid_map50`, `val/coco_ap50`, ...) and p > 0 the same model on occluded clips.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import pandas as pd

SCHEMA_VERSION = 1
CLEAN = 0.0
COST_KEYS = ("params", "macs", "params_recurrent", "macs_recurrent")
LATENCY_PREFIX = "latency_"
_OCCLUDED = "occ"  # an occluded evaluation's metric: occ<p>/<name>
_ARTIFACT = "artifact."


class RecordError(ValueError):
    """A results file this version cannot read, named with what to do."""


@dataclass
class Provenance:
    """Where and how a trial ran."""

    git_commit: Optional[str] = None
    machine: Optional[str] = None
    versions: Dict[str, str] = field(default_factory=dict)
    wall_time_s: Optional[float] = None


@dataclass
class TrialRecord:
    """One finished trial (complete or pruned) of a suite."""

    key: str
    trial: int
    state: str
    seed: int
    value: Optional[float]
    axes: Dict[str, str] = field(default_factory=dict)  # the suite axis -> this trial's label
    config: Dict[str, Any] = field(default_factory=dict)  # flat dotted keys, as lightning_modules.config.flatten
    metrics: Dict[float, Dict[str, float]] = field(default_factory=dict)  # occlusion p -> metric -> value
    costs: Dict[str, float] = field(default_factory=dict)  # params, macs, params_recurrent, macs_recurrent
    latency: Dict[str, float] = field(default_factory=dict)  # latency_ms_median, ...
    extra: Dict[str, Any] = field(default_factory=dict)  # any other scalar the trial returned
    artifacts: Dict[str, str] = field(default_factory=dict)  # name -> path relative to runs/<suite>/
    provenance: Provenance = field(default_factory=Provenance)
    schema: int = SCHEMA_VERSION

    def metric(self, name: str, occlusion: float = CLEAN) -> Optional[float]:
        """A metric of one stream (`val/vid_map50`, `val/coco_ap50`, `single_frame_cap`) at an occlusion level."""
        value = self.metrics.get(float(occlusion), {}).get(name)
        return None if value is None or pd.isna(value) else float(value)

    @property
    def occlusions(self) -> List[float]:
        return sorted(p for p in self.metrics if p != CLEAN)


def occluded_name(p: float, name: str) -> str:
    """The flat name under which a trial returns `name` (e.g. `val/vid_map50`) evaluated at occlusion p."""
    return f"{_OCCLUDED}{p}/{name.split('/', 1)[-1]}"


def matches_name(p: float) -> str:
    """The record's artifact name of a trial's per-video matches at occlusion p (clean: 0)."""
    return f"matches.p{float(p):g}"


def matches_artifact(p: float) -> str:
    """The flat name under which a trial returns that artifact (`split_metrics` files it under artifacts)."""
    return _ARTIFACT + matches_name(p)


def split_metrics(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """A trial's flat metrics dict -> the record's `metrics`, `costs`, `latency`, `extra`, `artifacts`."""
    parts: Dict[str, Any] = {"metrics": {}, "costs": {}, "latency": {}, "extra": {}, "artifacts": {}}
    for name, value in flat.items():
        if name in COST_KEYS:
            parts["costs"][name] = value
        elif name.startswith(LATENCY_PREFIX):
            parts["latency"][name] = value
        elif name.startswith(_ARTIFACT):
            parts["artifacts"][name[len(_ARTIFACT):]] = value
        elif name.startswith(_OCCLUDED) and "/" in name:
            level, metric = name[len(_OCCLUDED):].split("/", 1)
            parts["metrics"].setdefault(float(level), {})[f"val/{metric}"] = value
        elif name.startswith("val/") or name == "single_frame_cap":
            parts["metrics"].setdefault(CLEAN, {})[name] = value
        else:
            parts["extra"][name] = value
    return parts


def join_metrics(record: TrialRecord) -> Dict[str, Any]:
    """The inverse of `split_metrics`: the record's results as one flat dict."""
    flat: Dict[str, Any] = {**record.costs, **record.latency, **record.extra}
    flat.update({f"{_ARTIFACT}{k}": v for k, v in record.artifacts.items()})
    for p, metrics in record.metrics.items():
        for name, value in metrics.items():
            flat[name if p == CLEAN or not name.startswith("val/") else occluded_name(p, name)] = value
    return flat


def from_trial(trial_number: int, state: str, value: Optional[float], attrs: Mapping[str, Any]) -> TrialRecord:
    """A record from what the harness stored on the Optuna trial (its `record` user attribute)."""
    return TrialRecord(key=attrs["key"], trial=trial_number, state=state, seed=int(attrs["seed"]), value=value,
                       axes=dict(attrs["labels"]), config=dict(attrs["config"]), **split_metrics(attrs["metrics"]),
                       provenance=Provenance(attrs.get("git_commit"), attrs.get("machine"),
                                             dict(attrs.get("versions", {})), attrs.get("wall_time_s")))


def to_row(record: TrialRecord) -> Dict[str, Any]:
    """One results.csv row."""
    row = {"key": record.key, "trial": record.trial, "state": record.state, "seed": record.seed,
           "value": record.value, "wall_time_s": record.provenance.wall_time_s,
           "git_commit": record.provenance.git_commit, "machine": record.provenance.machine,
           "versions": json.dumps(record.provenance.versions, sort_keys=True), "schema": record.schema}
    row.update({f"axis.{k}": v for k, v in record.axes.items()})
    row.update({f"metric.{k}": v for k, v in join_metrics(record).items()})
    row.update({f"config.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.config.items()})
    return row


def records_frame(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """The records as results.csv's table, in the order given (a grid's in grid order: harness.study_records)."""
    return pd.DataFrame([to_row(r) for r in records])


def write_results(records: Iterable[TrialRecord], path: Path) -> pd.DataFrame:
    """Rewrite a suite's results table atomically (a crash never leaves half a file)."""
    frame = records_frame(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return frame


def _value(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return None if not isinstance(value, (list, dict)) and pd.isna(value) else value


def _section(row: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    return {c[len(prefix):]: _value(v) for c, v in row.items() if c.startswith(prefix) and _value(v) is not None}


def from_row(row: Mapping[str, Any], path: Path) -> TrialRecord:
    """One record from one results.csv row; a file of a newer schema, or one missing a column every
    record has, is an error naming the file."""
    schema = int(row["schema"]) if "schema" in row and not pd.isna(row["schema"]) else 0
    if schema > SCHEMA_VERSION:
        raise RecordError(f"{path}: results of schema {schema}, newer than this tafm reads ({SCHEMA_VERSION}); "
                          "update tafm or rerun the suite")
    missing = [c for c in ("key", "seed") if c not in row]
    if missing:
        raise RecordError(f"{path}: not a tafm results file (no column {', '.join(missing)}); rerun the suite "
                          "(`tafm run SUITE`) to rewrite it from its study")
    versions = row.get("versions")
    value = row.get("value")
    return TrialRecord(
        key=str(row["key"]), trial=int(row.get("trial", 0)), state=str(row.get("state", "COMPLETE")),
        seed=int(row["seed"]), value=None if value is None or pd.isna(value) else float(value),
        axes={k: str(v) for k, v in _section(row, "axis.").items()}, config=_section(row, "config."),
        **split_metrics(_section(row, "metric.")),
        provenance=Provenance(_value(row.get("git_commit")), _value(row.get("machine")),
                              json.loads(versions) if isinstance(versions, str) else {},
                              _value(row.get("wall_time_s"))),
        schema=SCHEMA_VERSION)


def read_results(path: Path) -> List[TrialRecord]:
    """Every record of a results.csv (older files included)."""
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return []
    return [from_row(row, path) for row in frame.to_dict("records")]
