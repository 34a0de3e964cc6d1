"""Pictures of what trained checkpoints detect (paper Figure 5): `tafm viz`, and each suite's strip of
its baseline (the single-frame row) against its best row on one val video, embedded in its report."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ablations.records import TrialRecord

STRIP = "strip.png"
STRIP_EXTRA = "3_pictures.md"
STRIP_FRAMES = 6


def draw_checkpoints(checkpoints: Sequence[Path | str], out: Path | str, *, root: Optional[Path | str] = None,
                     video: Optional[str] = None, frames: int = 8, start: int = 0, occlusion: float = 0.0,
                     min_score: float = 0.3, scale: int = 3, titles: Optional[Sequence[str]] = None) -> Path:
    """Ground truth and detections of every checkpoint (one column each) on `frames` consecutive val
    frames of `video` (default: the first), written to `out` (.png, .gif or .mp4). `root`: the VID root
    (default: the synthetic benchmark)."""
    from datamodules.data_config import DataConfig
    from lightning_modules.detect import detect_frames, load_detector, model_title, val_frames
    from lightning_modules.fit import resolve_root
    from reports.pictures import FORMATS, compose, save_pictures

    if Path(out).suffix.lower() not in FORMATS:  # before any model runs
        raise ValueError(f"--out {out}: unknown picture format {Path(out).suffix!r}; valid: {', '.join(FORMATS)}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    chosen, frame_annos = val_frames(resolve_root(DataConfig(), root), video, frames, start)
    columns, names = [], []
    for checkpoint in checkpoints:
        detector = load_detector(checkpoint)
        columns.append(detect_frames(detector, chosen, frame_annos, occlusion, DataConfig().occlusion_seed))
        names.append(model_title(detector[1]))
    width = frame_annos[0].width * scale
    return save_pictures(compose(columns, min_score, scale), list(titles or names), width, out)


def write_strip(records: Sequence[TrialRecord], metric: str, maximize: bool, report_dir: Path, extras_dir: Path,
                log: Callable[[str], None] = print) -> Optional[Path]:
    """The report's picture: the baseline (single-frame) row against the best other row on the busiest val
    video, as report_dir/strip.png, linked from extras_dir/3_pictures.md. None (and a line) when the
    suite has no such pair or their checkpoints are gone."""
    pair = _baseline_and_best(records, metric, maximize)
    if pair is None:
        log("  no picture: the suite has no single-frame row and another row to compare it with")
        return None
    checkpoints = [Path(str(r.extra.get("checkpoint", ""))) for r in pair]
    if not all(c.is_file() for c in checkpoints):
        log(f"  no picture: checkpoint {next(c for c in checkpoints if not c.is_file())} is gone")
        return None
    titles = [f"{role}: {_label(r)}, seed {r.seed} ({metric} {r.metric(metric) or 0:.3g})"
              for role, r in zip(("baseline", "best"), pair)]
    from datamodules.data_config import DataConfig
    from lightning_modules.fit import resolve_root

    root = resolve_root(DataConfig(), pair[0].config.get("data.root") or None)
    video = busiest_video(root, STRIP_FRAMES)
    short = [f"{role}: {_label(r)} ({100 * (r.metric(metric) or 0):.1f})" for role, r in zip(("baseline", "best"), pair)]
    path = draw_checkpoints(checkpoints, report_dir / STRIP, root=root, video=video, frames=STRIP_FRAMES, scale=2,
                            titles=short)  # a column is only as wide as the frame
    extras_dir.mkdir(parents=True, exist_ok=True)
    (extras_dir / STRIP_EXTRA).write_text("\n".join([
        "## What the detector sees (paper Figure 5)", "",
        f"![{titles[0]} vs {titles[1]}]({STRIP})", "",
        f"Left: {titles[0]}; right: {titles[1]} (the best row by its mean over seeds, drawn at the same seed). "
        f"{STRIP_FRAMES} consecutive frames (top to bottom) of val video {video}, the one with the most ground-truth "
        "boxes in its first frames; the recurrent state carried from frame to frame; ground truth in white, detections scoring >= 0.3 "
        "in their class colour with their score. `tafm viz CHECKPOINT...` draws any checkpoints, videos and frames.",
    ]) + "\n")
    return path


def _baseline_and_best(records: Sequence[TrialRecord], metric: str, maximize: bool) -> Optional[List[TrialRecord]]:
    """The single-frame row and the best other row (by its mean over seeds), drawn at the same seed."""
    scored = [r for r in records if r.metric(metric) is not None]
    rows: dict = {}
    for record in scored:
        rows.setdefault(tuple(sorted(record.axes.items())) or record.key, []).append(record)
    baseline = next((g for g in rows.values() if g[0].config.get("model.recurrent.type") == "none"), None)
    others = [g for g in rows.values() if g[0].config.get("model.recurrent.type") != "none"]
    if baseline is None or not others:
        return None
    best = (max if maximize else min)(others, key=lambda g: sum(r.metric(metric) for r in g) / len(g))
    seeds = sorted({r.seed for r in baseline} & {r.seed for r in best})
    if not seeds:
        return None
    return [next(r for r in group if r.seed == seeds[0]) for group in (baseline, best)]


def busiest_video(root: Path | str, frames: int) -> str:
    """The val video with the most ground-truth boxes in its first `frames` frames (a picture with objects
    in it, chosen from the annotations only, never from what a model detects)."""
    from datamodules.vid import read_vid

    videos, _ = read_vid(root, "val", progress=False, memo=True)
    return max(videos, key=lambda v: sum(len(f.boxes) for f in v.frames[:frames])).name


def _label(record: TrialRecord) -> str:
    return ", ".join(str(v) for v in record.axes.values()) or record.key
