"""Regenerate the paper's tables from a suite's records (runs/<suite>/results.csv) beside the paper.

Reports read records only: they never import training code. Every measured cell sits beside the
paper's value and the delta; with several seeds a cell is mean +- std.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd

from ablations import paper
from ablations.pipeline import HEARTBEAT_S, OPEN_SESSIONS, SESSIONS
from ablations.records import TrialRecord, read_results
from lightning_modules.markdown import markdown_row, markdown_table
from reports import paper_tables  # noqa: F401  (registers the paper's tables)
from reports import significance
from reports.registry import TableSpec, table_spec

METRIC_NAME = "VID mAP@0.5 (ILSVRC devkit rules: per-box threshold for small boxes), in %"
MAP = "val/vid_map50"


class ReportError(ValueError):
    """No records, or records that do not fit the table."""


def load_records(runs_dir: Path, suite: str) -> List[TrialRecord]:
    """The suite's completed trials (runs/<suite>/results.csv)."""
    path = Path(runs_dir) / suite / "results.csv"
    if not path.is_file():
        raise ReportError(f"no records for suite {suite!r} at {path}; run `tafm run {suite}` first")
    records = read_results(path)
    if not records:
        raise ReportError(f"{path} has no finished trial yet; run `tafm run {suite}`")
    return [r for r in records if r.state == "COMPLETE"]


def _cfg(record: TrialRecord, key: str):
    return record.config.get(key)


def _cell(values: List[Optional[float]], scale: float = 100.0) -> Tuple[Optional[float], str]:
    values = pd.Series([v for v in values if v is not None], dtype=float) * scale
    if values.empty:
        return None, "–"
    if len(values) == 1:
        return float(values.iloc[0]), f"{values.iloc[0]:.1f}"
    return float(values.mean()), f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def _delta(ours: Optional[float], theirs: Optional[float]) -> str:
    return "–" if ours is None or theirs is None else f"{ours - theirs:+.1f}"


def _paper(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:g}"


def _row_key(row: TrialRecord) -> Dict[str, object]:
    """The paper-facing identity of a trial: arch, alpha, recurrent type and placement."""
    kind = _cfg(row, "model.recurrent.type")
    after = tuple(_cfg(row, "model.recurrent.after") or ()) if kind != "none" else ()
    return {"arch": _cfg(row, "model.arch"), "alpha": float(_cfg(row, "model.alpha")), "type": kind, "after": after,
            "alpha_lstm": _cfg(row, "model.alpha_lstm")}


def _spec(table: str) -> TableSpec:
    try:
        return table_spec(table)
    except ValueError as error:
        raise ReportError(str(error)) from None


def _label(key: Dict[str, object]) -> str:
    kind = key["type"]
    where = "+".join(key["after"]) if key["after"] else ""
    name = f"{key['arch']} a={key['alpha']:g}"
    return f"{name}, {kind}" + (f" after {where}" if kind != "none" else "")


def _groups(records: List[TrialRecord]) -> List[Tuple[Dict[str, object], List[TrialRecord]]]:
    """Rows of the table: the trials of one grid point (its axis labels), seeds pooled; records without
    axes (older files) by their model. Two grid points that build the same model (e.g. an axis over
    training settings) stay two rows. Ordered by alpha (as first recorded), then stage-2 steps, one-layer
    rows first, else as recorded: a row trained longer sits beside the rows of its steps (Table 4's
    same-steps baselines above the stacked rows they are compared with)."""
    groups: Dict[str, Tuple[Dict[str, object], List[TrialRecord]]] = {}
    for record in records:
        key = _row_key(record)
        identity = record.axes or key
        groups.setdefault(json.dumps(identity, sort_keys=True, default=str), (key, []))[1].append(record)
    alphas = list(dict.fromkeys(key["alpha"] for key, _ in groups.values()))

    def order(group: Tuple[Dict[str, object], List[TrialRecord]]) -> Tuple[int, int, bool]:
        key, rows = group
        steps = stage2_steps(rows[0])
        return alphas.index(key["alpha"]), -1 if steps is None else steps, len(key["after"]) > 1

    return sorted(groups.values(), key=order)


def _extra_label(record: TrialRecord) -> str:
    """', k stages more (n steps)' for a row trained sweep.extra_stages more stages (Table 4's same-steps rows)."""
    extra = int(_cfg(record, "sweep.extra_stages") or 0)
    return f", {extra} stage{'s' if extra > 1 else ''} more ({stage2_steps(record):,} steps)" if extra else ""


def _labels(groups: List[Tuple[Dict[str, object], List[TrialRecord]]]) -> List[str]:
    """Each row's model; where two rows build the same model, their axis values too."""
    models = [_label(key) + _extra_label(rows[0]) for key, rows in groups]
    labels = list(models)
    for i, (_, rows) in enumerate(groups):
        if models.count(models[i]) > 1 and rows[0].axes:  # counted before any label changed
            labels[i] += " (" + ", ".join(f"{k}={_short_value(v)}" for k, v in rows[0].axes.items()) + ")"
    return labels


def _baseline(groups: List[Tuple[Dict[str, object], List[TrialRecord]]], key: Dict[str, object],
              rows: List[TrialRecord]) -> int:
    """The row a row is compared with: the single-frame SSD (no recurrent layer) at the same alpha, else
    (suites without one: Table 4, Figure 4, searches) the first one-layer row at that alpha with the row's
    stage-2 steps (a one-layer row given sweep.extra_stages: Table 4's same-steps baseline) where that is
    not the row itself, else the suite's first row at that alpha (so a one-layer row with extra stages
    shows what its extra steps alone buy)."""
    same = [i for i, (k, _) in enumerate(groups) if k["alpha"] == key["alpha"]]
    single = [i for i in same if groups[i][0]["type"] == "none"]
    if single:
        return single[0]
    steps = {stage2_steps(r) for r in rows}
    budget = [i for i in same if len(groups[i][0]["after"]) == 1 and {stage2_steps(r) for r in groups[i][1]} == steps]
    return budget[0] if budget and groups[budget[0]][1] is not rows else same[0]


class _Significance:
    """The 'vs baseline' cells: a paired bootstrap over val videos from the trials' kept matches."""

    def __init__(self, base_dir: Optional[Path]):
        self.base_dir, self.cache, self.computed = base_dir, {}, 0

    def cell(self, rows: List[TrialRecord], baseline: List[TrialRecord], occlusion: float) -> str:
        if rows is baseline:
            return "baseline"
        if self.base_dir is None:
            return "–"
        difference = significance.compare(rows, baseline, occlusion, self.base_dir, cache=self.cache)
        if difference is None:
            return "–"
        self.computed += 1
        return str(difference)

    def footer(self) -> List[str]:
        if not self.computed:
            return []
        return ["", "vs baseline: the row's VID mAP@0.5 minus its baseline's (the single-frame SSD at the same "
                "alpha; where the suite has none, the first one-layer row at that alpha with the row's stage-2 steps, "
                "else the first row at that alpha), in points, with its 95% interval. "
                + significance.METHOD.format(resamples=significance.RESAMPLES, seed=significance.SEED)]


def suite_table(table: str, records: List[TrialRecord], base_dir: Optional[Path] = None) -> List[str]:
    """The markdown rows of one suite's table, in the paper's layout where it has one. With `base_dir`
    (runs/<suite>, where the records' artifacts lie) every row gets its paired-bootstrap interval
    against the single-frame baseline."""
    spec = _spec(table)
    occlusion = sorted({p for r in records for p in r.occlusions if r.metric(MAP, p) is not None})
    groups = _groups(records)
    has_baseline = len(groups) > 1
    header = ["model", "seeds", "mAP (ours)", "paper", "delta"]
    if has_baseline:
        header += ["vs baseline [95% CI]"]
    for p in occlusion:
        header += [f"mAP p={p:g} (ours)", "paper", "delta"] + ([f"p={p:g} vs baseline [95% CI]"] if has_baseline else [])
    cap = _cell([r.metric("single_frame_cap") for r in records])[0]
    if cap is not None:
        header += ["vs single-frame cap"]
    header += ["COCO AP50 (ours)", "params M", "MACs B"]
    for columns in spec.columns:
        header += list(columns.header)
    latency = any("latency_ms_median" in r.latency for r in records)
    if latency:
        header += ["latency ms (ours, median)", "Pixel 2 big core ms", "ours / paper"]
    lines = markdown_table(header)
    tests = _Significance(base_dir)
    baseline, control, frozen = None, False, True
    for label, (key, rows) in zip(_labels(groups), groups):
        base_rows = groups[_baseline(groups, key, rows)][1]
        ours, text = _cell([r.metric(MAP) for r in rows])
        theirs = spec.paper_map(key, None)
        cells = [label, str(len(rows)), text, _paper(theirs), _delta(ours, theirs)]
        if has_baseline:
            cells += [tests.cell(rows, base_rows, 0.0)]
        for p in occlusion:
            value, text_p = _cell([r.metric(MAP, p) for r in rows])
            theirs = spec.paper_map(key, p)
            cells += [text_p, _paper(theirs), _delta(value, theirs)]
            if has_baseline:
                cells += [tests.cell(rows, base_rows, p)]
        if cap is not None:
            cells += [_delta(ours, cap)]
        cells += [_cell([r.metric("val/coco_ap50") for r in rows])[1],
                  f"{rows[0].costs['params'] / 1e6:.3f}", f"{rows[0].costs['macs'] / 1e9:.3f}"]
        for columns in spec.columns:
            cells += columns.cells(key, rows)
        if latency:
            mine = float(pd.Series([r.latency.get("latency_ms_median") for r in rows], dtype=float).median())
            theirs = paper.TABLE7.get((key["arch"], key["alpha"]), (None,))[0]
            cells += [f"{mine:.1f}", _paper(theirs), "–" if theirs is None else f"{mine / theirs:.2f}"]
        if key["type"] == "none" and baseline is None:
            baseline = ours
            control = str(_cfg(rows[0], "sweep.single_frame_stage2")).lower() == "true"
            frozen = str(_cfg(rows[0], "train.freeze") or "frozen_bn_eval") != "none"
        lines.append(markdown_row(cells))
    if cap is not None:
        lines += ["", f"Single-frame cap: {cap:.1f} mAP. An oracle that localises every object perfectly but, like any "
                  "single-frame detector, knows a look-alike pair's class only on the frames where its marker is "
                  "drawn (elsewhere it names both classes at equal score), scored on the same val frames. A "
                  "single-frame model cannot pass it; a temporal one can, up to 100."]
    if baseline is not None:
        lines += ["", f"Single-frame SSD baseline (ours): {baseline:.1f} mAP"
                  + (_control_note(records, frozen) if control else ": the stage-1 model.")]
    else:
        lines += _budget_note(records, groups)
    lines += tests.footer()
    return lines


def stage2_steps(record: TrialRecord) -> Optional[int]:
    """Stage-2 steps behind a row's model: train.max_steps per stacked layer of a progressive row (each
    layer is a stage of its own) and per sweep.extra_stages, train.max_steps x sweep.control_stages for
    the single-frame control, None for a stage-1 model."""
    steps = int(_cfg(record, "train.max_steps") or 0)
    if str(_cfg(record, "model.recurrent.type")) == "none":
        if str(_cfg(record, "sweep.single_frame_stage2")).lower() != "true":
            return None
        return steps * int(_cfg(record, "sweep.control_stages") or 1)
    after = _cfg(record, "model.recurrent.after") or []
    layers = len(after) if str(_cfg(record, "sweep.progressive")).lower() == "true" and len(after) > 1 else 1
    return steps * (layers + int(_cfg(record, "sweep.extra_stages") or 0))


def _control_note(records: List[TrialRecord], frozen: bool) -> str:
    """How the single-frame control was finetuned, and whether every row had its stage-2 budget."""
    control = {stage2_steps(r) for r in records if str(_cfg(r, "model.recurrent.type")) == "none"} - {None}
    others = {stage2_steps(r) for r in records if str(_cfg(r, "model.recurrent.type")) != "none"} - {None}
    steps = "/".join(f"{n:,}" for n in sorted(control))
    text = (f", finetuned after stage 1 with the base {'frozen' if frozen else 'trained too'} for {steps} steps "
            f"(`sweep.single_frame_stage2`")
    stages = {int(_cfg(r, "sweep.control_stages") or 1) for r in records} - {1}
    text += f", `sweep.control_stages` {'/'.join(map(str, sorted(stages)))}: the progressive rows' stages)" if stages else ")"
    if others <= control:
        return text + " on the same clips as the recurrent rows' stage 2, so every row has the same training budget."
    return (text + "; the recurrent rows trained " + "/".join(f"{n:,}" for n in sorted(others)) + " stage-2 steps "
            "(progressive rows: train.max_steps per stacked layer), so a row with more steps than the control had a "
            "larger training budget than it.")


def _budget_note(records: List[TrialRecord], groups: List[Tuple[Dict[str, object], List[TrialRecord]]]) -> List[str]:
    """A line when the rows (no single-frame control among them) trained different stage-2 steps: whether
    each was compared with a one-layer row of its own steps, or with a row of fewer."""
    steps = sorted({stage2_steps(r) for r in records} - {None})
    if len(steps) < 2:
        return []
    text = ("Stage-2 budgets differ: the rows trained " + " / ".join(f"{n:,}" for n in steps) + " stage-2 steps "
            "(a row stacked progressively trains train.max_steps per layer, a row with sweep.extra_stages that "
            "many stages more)")
    unmatched = sorted({stage2_steps(rows[0]) for key, rows in groups if len(key["after"]) > 1
                        and stage2_steps(groups[_baseline(groups, key, rows)][1][0]) != stage2_steps(rows[0])} - {None})
    if not unmatched:
        return ["", text + ", and each row of several layers is compared with a one-layer row of the same steps, so "
                "its difference is its layers', not its training's (a one-layer row with extra stages is compared "
                "with the first row: what the extra steps alone buy)."]
    return ["", text + "; the rows of " + " / ".join(f"{n:,}" for n in unmatched) + " steps have no one-layer row "
            "of their steps to compare with (`sweep.extra_stages` gives one), so their difference from the baseline "
            "mixes their extra layers with their extra steps."]


def _width_note(records: List[TrialRecord]) -> List[str]:
    """A line when the trials were trained at scaled widths (model.width_scale): the alpha in the row
    labels is the paper's, and params / MACs are those of the network actually trained."""
    scales = sorted({float(r.config.get("model.width_scale") or 1.0) for r in records})
    if scales == [1.0]:
        return []
    return [f"- Widths: trained at model.width_scale {', '.join(f'{s:g}' for s in scales)} times the paper's "
            "(alpha 1 rows train at 0.5, alpha 0.5 rows at 0.25): rows keep the paper's alpha as their label, "
            "and their params / MACs are those of the network trained. The paper-scale counts are in the cost "
            "tables (`tafm cost --table`)."]


def _stage1_note(records: List[TrialRecord]) -> List[str]:
    """A line when stage 1 trained on other data than the rows (sweep.stage1_cue_prob, sweep.stage1_data_root)."""
    cues = sorted({float(r.config["sweep.stage1_cue_prob"]) for r in records
                   if r.config.get("sweep.stage1_cue_prob") is not None})
    roots = sorted({str(r.config["sweep.stage1_data_root"]) for r in records
                    if r.config.get("sweep.stage1_data_root") is not None})
    if not cues and not roots:
        return []
    where = " and ".join([f"{', '.join(roots)} (`sweep.stage1_data_root`)"] * bool(roots) + [
        f"the twin of its synthetic dataset with the class marker on {', '.join(f'{c:.0%}' for c in cues)} of frames "
        f"(`sweep.stage1_cue_prob` {', '.join(f'{c:g}' for c in cues)}: the same videos, generated once)"] * bool(cues))
    return [f"- Stage 1: the single-frame SSD trained on {where}; stage 2 and every row train and are scored on "
            "the dataset above. A real (non-synthetic) dataset trains stage 1 on itself."]


def read_sessions(suite_dir: Path) -> List[dict]:
    """The `tafm run` invocations of a suite, oldest first: the finished ones (runs/<suite>/sessions.jsonl)
    and the unfinished ones (sessions.open/*.json, killed or still running: `"unfinished": True`, their time
    up to their last heartbeat); [] if none."""
    path = Path(suite_dir) / SESSIONS
    sessions = []
    if path.is_file():
        sessions += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for open_file in sorted((Path(suite_dir) / OPEN_SESSIONS).glob("*.json")):
        try:
            sessions.append({**json.loads(open_file.read_text(encoding="utf-8")), "unfinished": True})
        except (OSError, json.JSONDecodeError):  # removed or being replaced as we read: its run just finished
            continue
    return sorted(sessions, key=lambda s: str(s.get("started") or ""))


def wall_time_text(sessions: List[dict]) -> str:
    """`42 min (2 runs, 2 workers)`: the summed wall clock of a suite's invocations; unfinished ones (killed
    or still running) count up to their last heartbeat and are said: `(3 runs, 2 unfinished, 2 workers)`."""
    if not sessions:
        return "not recorded"
    total = sum(float(s.get("wall_s") or 0.0) for s in sessions)
    workers = sorted({int(s.get("workers") or 1) for s in sessions})
    unfinished = sum(bool(s.get("unfinished")) for s in sessions)
    runs = f"{len(sessions)} run{'s' if len(sessions) > 1 else ''}" + (f", {unfinished} unfinished" if unfinished else "")
    return f"{total / 60:.0f} min ({runs}, {'/'.join(map(str, workers))} worker{'s' if workers != [1] else ''})"


def _provenance(records: List[TrialRecord], sessions: Optional[List[dict]] = None) -> List[str]:
    roots = {str(r.config["data.root"]) for r in records if r.config.get("data.root") is not None}
    dataset = ", ".join(sorted(roots)) if roots else "the synthetic VID benchmark (tafm data synth defaults)"
    commits = ", ".join(sorted({str(r.provenance.git_commit) for r in records if r.provenance.git_commit})) or "unknown"
    machines = ", ".join(sorted({str(r.provenance.machine) for r in records if r.provenance.machine})) or "unknown"
    seeds = sorted({int(r.seed) for r in records})
    return [f"- Metric: {METRIC_NAME}; COCO AP@0.5 as a second column.",
            f"- Dataset: {dataset}. The paper's numbers are ImageNet VID minival: on the synthetic benchmark the "
            "absolute values are not comparable; compare the ordering of the rows with the paper's (whether it "
            "matches is a finding of this run, not a given).",
            f"- Seeds: {seeds}; trials: {len(records)}; commit: {commits}; machine: {machines}.",
            f"- Wall time: {wall_time_text(sessions or [])}, from each `tafm run` start until its trials were recorded "
            f"(extras and report not included); a run killed or interrupted counts until its last {HEARTBEAT_S:.0f}-s "
            "heartbeat.",
            *_stage1_note(records),
            *_width_note(records),
            f"- Generated: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the suite's records."]


def write_report(suite: str, table: str, description: str, runs_dir: Path, out_dir: Path) -> Path:
    """Write reports/<suite>/README.md (and fig4.png for Figure 4); returns the README path. Sections the
    run measured besides the trials (runs/<suite>/extras/*.md: cost tables, Table 7) are appended."""
    records = load_records(runs_dir, suite)
    lines = [f"# {suite}: {description}", ""]
    target = Path(out_dir) / suite
    spec = _spec(table)
    if spec.figure is not None:
        lines += spec.figure(records, target)
    lines += suite_table(table, records, Path(runs_dir) / suite)
    lines += _pruned_lines(read_results(Path(runs_dir) / suite / "results.csv"))
    for extra in sorted((Path(runs_dir) / suite / "extras").glob("*.md")):
        lines += ["", extra.read_text().rstrip()]
    lines += ["", "## Provenance", ""] + _provenance(records, read_sessions(Path(runs_dir) / suite))
    target.mkdir(parents=True, exist_ok=True)
    readme = target / "README.md"
    readme.write_text("\n".join(lines) + "\n")
    return readme


def _pruned_lines(records: List[TrialRecord]) -> List[str]:
    """The trials a search pruned (over its MAC budget, or stopped by the MedianPruner), each with its point
    and the reason: they are in no row of the table."""
    pruned = [r for r in records if r.state == "PRUNED"]
    if not pruned:
        return []
    lines = ["", f"Pruned: {len(pruned)} of {len(records)} trials, in no row above:"]
    for record in pruned:
        point = ", ".join(f"{axis}={_short_value(value)}" for axis, value in record.axes.items())
        lines.append(f"- {record.key} ({point}): {record.extra.get('pruned') or 'pruned'}")
    return lines


def _short_value(value: object) -> str:
    """An axis value for a person: a sampled float to 3 significant digits, anything else as it is."""
    try:
        number = float(str(value))
    except ValueError:
        return str(value)
    return f"{number:.3g}" if "." in str(value) else str(value)


def _short_commit(commit: str) -> str:
    """The first 12 hex digits, keeping a `+dirty` mark."""
    head, _, mark = commit.partition("+")
    return head[:12] + (f"+{mark}" if mark else "")


_SEEDS_LINE = re.compile(r"^- Seeds: \[(?P<seeds>[^\]]*)\]; trials: (?P<trials>\d+); commit: (?P<commits>[^;]*);", re.M)
_WALL_LINE = re.compile(r"^- Wall time: (?P<wall>.*?), from each `tafm run`", re.M)


def report_provenance(text: str) -> Dict[str, str]:
    """A written report's seeds, trial count, wall time and commits, read back from its Provenance lines
    (`_provenance` writes them); a report without them gives "unknown"."""
    seeds = _SEEDS_LINE.search(text)
    wall = _WALL_LINE.search(text)
    commits = [c.strip() for c in seeds.group("commits").split(",")] if seeds else []
    return {"seeds": seeds.group("seeds") if seeds else "unknown",
            "trials": seeds.group("trials") if seeds else "unknown",
            "wall": wall.group("wall") if wall else "unknown",
            "commits": ", ".join(_short_commit(c) for c in commits if c and c != "unknown") or "unknown"}


def write_index(suites: List[Tuple[str, str]], out_dir: Path) -> Path:
    """reports/README.md: every suite (name, description) with the report in out_dir/<suite>/README.md, its
    seeds, trials, wall time and commit read from that report, so the index describes the reports beside it
    whichever runs dir each came from; a suite without a report is listed as not run yet."""
    header = ["suite", "report", "seeds", "trials", "wall time", "commit"]
    rows = []
    for name, description in suites:
        readme = Path(out_dir) / name / "README.md"
        if not readme.is_file():
            rows.append([name, "not run yet: no report", "", "", "", ""])
            continue
        facts = report_provenance(readme.read_text(encoding="utf-8"))
        rows.append([name, f"[{description}]({name}/README.md)", facts["seeds"], facts["trials"], facts["wall"],
                     facts["commits"]])
    lines = ["# Regenerated tables", "", *markdown_table(header, rows)]
    index = Path(out_dir) / "README.md"
    index.write_text("\n".join(lines) + "\n")
    return index
