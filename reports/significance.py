"""Is a row's mAP difference from its suite's baseline real? A paired bootstrap over val videos.

Each trial keeps, per evaluated stream, its devkit matches by video (`VideoMatches`: every
detection's video, class, score and tp flag, and the gt count per video and class; written by
`datamodules.metrics.VidEvaluator.per_video`). A resample draws the val videos with replacement;
both models' VID mAP@0.5 are recomputed on that same sample (a video drawn k times counts k times:
its detections and its gts), and the difference is kept. With several seeds each seed's pair is
resampled and the differences are averaged, so the interval is that of the mean difference over
seeds. The 95% interval is the 2.5th and 97.5th percentile of 1,000 (by default) seeded resamples;
a row whose interval contains 0 is "not significant".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from ablations.records import TrialRecord

#: The report's footer: how the intervals were computed.
METHOD = ("Intervals: paired bootstrap over val videos ({resamples} seeded resamples, seed {seed}). A resample "
          "draws the val videos with replacement; the row and the baseline are both re-scored (VID mAP@0.5 "
          "from their kept per-video matches) on the same sample; with several seeds the per-seed differences "
          "are averaged. Shown: the difference on all videos, mean over seeds, and the 2.5th-97.5th "
          "percentile of the resampled differences; an interval containing 0 is marked not significant.")

RESAMPLES = 1000  #: resamples per interval, by default
SEED = 0  #: the resampling seed, by default
_FIELDS = ("video", "label", "score", "tp", "videos", "npos")
_CELLS_PER_CHUNK = 20_000_000  # resamples x detections held at once (memory bound on large val sets)


class SignificanceError(ValueError):
    """Matches that cannot be compared (different val videos, a missing or malformed file)."""


@dataclass(frozen=True)
class VideoMatches:
    """One trial's devkit matches on one stream, by video (see the module docstring)."""

    video: np.ndarray  # [D] index into videos
    label: np.ndarray  # [D] class id 1..C
    score: np.ndarray  # [D]
    tp: np.ndarray  # [D] 1 true positive, 0 false positive (devkit matching)
    videos: np.ndarray  # [V] video names
    npos: np.ndarray  # [V, C + 1] gt boxes per video and class (column 0 unused)

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray]) -> "VideoMatches":
        missing = [name for name in _FIELDS if name not in arrays]
        if missing:
            raise SignificanceError(f"per-video matches lack {', '.join(missing)}; expected {', '.join(_FIELDS)}")
        return cls(**{name: np.asarray(arrays[name]) for name in _FIELDS})

    def save(self, path: Path | str) -> Path:
        """Write a compressed .npz (a few hundred kB for a synthetic val set)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{name: getattr(self, name) for name in _FIELDS})
        return path

    @classmethod
    def load(cls, path: Path | str) -> "VideoMatches":
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                return cls.from_arrays({name: data[name] for name in data.files})
        except (OSError, ValueError) as exc:
            raise SignificanceError(f"{path}: cannot read per-video matches ({exc}); rerun the trial") from exc

    def map50(self, counts: np.ndarray | None = None) -> np.ndarray | float:
        """VID mAP@0.5 with video v counted counts[..., v] times; counts [R, V] gives R values."""
        if counts is None:
            return float(self.map50(np.ones((1, len(self.videos)), dtype=np.int64))[0])
        return _resampled_map(self, np.asarray(counts, dtype=np.int64))


def _resampled_map(m: VideoMatches, counts: np.ndarray) -> np.ndarray:
    """[R] mAPs: per class, all-point AP (devkit VOCap) of the weighted precision/recall curve.

    A video drawn k times weighs its detections k: a run of k copies of a true positive raises recall
    in k steps whose interpolated precision all equal the precision after the run, so weighting the
    cumulative sums is exact; classes without gt in a sample leave that sample's mean, as in
    `VidEvaluator.compute`.

    Only true positives raise recall, and the precision after a false positive is at most that of the
    true positive before it, so AP needs the curve at the K true positives only (K is at most the gt
    count; the detections D are many more): the weighted tp and fp counts there are `counts @ T` and
    `counts @ F`, with T and F the per-video tp and fp counts up to each true positive ([V, K]).
    """
    resamples = counts.shape[0]
    weights = counts.astype(np.float64)
    ap_sum = np.zeros(resamples)
    n_classes = np.zeros(resamples)
    for c in range(1, m.npos.shape[1]):
        npos = weights @ m.npos[:, c].astype(np.float64)  # [R]
        has_gt = npos > 0
        if not has_gt.any():
            continue
        sel = np.nonzero(m.label == c)[0]
        order = sel[np.argsort(-m.score[sel], kind="stable")]
        is_tp = m.tp[order] > 0
        ap = np.zeros(resamples)
        if is_tp.any():
            tp_video, tp_cum, fp_cum = _counts_at_true_positives(m.video[order], is_tp, len(m.videos))
            step = max(1, _CELLS_PER_CHUNK // tp_video.size)
            for lo in range(0, resamples, step):
                w = weights[lo:lo + step]
                ctp, cfp = w @ tp_cum, w @ fp_cum  # [r, K]
                precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
                best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
                ap[lo:lo + step] = np.sum(w[:, tp_video] * best_after, axis=1) / np.maximum(npos[lo:lo + step], 1)
        ap_sum += np.where(has_gt, ap, 0.0)
        n_classes += has_gt
    return np.where(n_classes > 0, ap_sum / np.maximum(n_classes, 1), 0.0)


def _counts_at_true_positives(video: np.ndarray, is_tp: np.ndarray, videos: int
                              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the detections of one class in score order: each true positive's video [K], and per video the
    true positives up to and including each one and the false positives before it ([V, K] each)."""
    tp_index = np.nonzero(is_tp)[0]
    tp_video = video[tp_index]
    k = np.arange(tp_index.size)
    tp_cum = np.zeros((videos, tp_index.size))
    tp_cum[tp_video, k] = 1.0
    fp_gap = np.zeros((videos, tp_index.size))  # false positives between true positive k - 1 and k
    fp_index = np.nonzero(~is_tp)[0]
    gap = np.searchsorted(tp_index, fp_index)  # the first true positive after each false positive
    before_last = gap < tp_index.size  # those after the last true positive change no precision that counts
    np.add.at(fp_gap, (video[fp_index[before_last]], gap[before_last]), 1.0)
    return tp_video, np.cumsum(tp_cum, axis=1), np.cumsum(fp_gap, axis=1)


@dataclass(frozen=True)
class Difference:
    """Row minus baseline, in mAP points: on all videos (mean over seeds) and its bootstrap interval."""

    delta: float
    low: float
    high: float
    seeds: int
    resamples: int

    @property
    def significant(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        text = f"{self.delta:+.1f} [{_bound(self.low)}, {_bound(self.high)}]"
        return text if self.significant else f"{text} not significant"


def _bound(value: float) -> str:
    """An interval end in points; one that rounds to 0.0 shows its first digit, so its sign (which decides
    significance) is never hidden."""
    return f"{value:+.1f}" if abs(value) >= 0.05 or value == 0.0 else f"{value:+.1g}"


def paired_bootstrap(pairs: Sequence[Tuple[VideoMatches, VideoMatches]], resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = 0.95) -> Difference:
    """Interval of mean(row - baseline) over seeds; pairs holds one (row, baseline) per seed.

    Both members of a pair must be scored on the same val videos (same names, same order).
    """
    if not pairs:
        raise SignificanceError("paired_bootstrap needs at least one (row, baseline) pair")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise SignificanceError(f"resamples must be >= 1 and level in (0, 1); got {resamples}, {level}")
    rng = np.random.default_rng(seed)
    deltas: List[float] = []
    samples = np.zeros(resamples)
    for row, base in pairs:
        if list(row.videos) != list(base.videos):
            raise SignificanceError("a row and its baseline were scored on different val videos "
                                    f"({len(row.videos)} vs {len(base.videos)}); rerun both with the same data")
        n = len(row.videos)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) if n else np.zeros((resamples, 0), int)
        deltas.append(100.0 * (row.map50() - base.map50()))
        samples += 100.0 * (row.map50(counts) - base.map50(counts))
    samples /= len(pairs)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return Difference(float(np.mean(deltas)), float(low), float(high), len(pairs), resamples)


def _load_cached(path: Path, cache: Dict[Path, VideoMatches]) -> VideoMatches:
    if path not in cache:
        cache[path] = VideoMatches.load(path)
    return cache[path]


def seed_pairs(rows: Sequence["TrialRecord"], baseline: Sequence["TrialRecord"], occlusion: float, base_dir: Path,
               cache: Optional[Dict[Path, VideoMatches]] = None) -> List[Tuple[VideoMatches, VideoMatches]]:
    """(row, baseline) matches of every seed both groups ran, at one occlusion level; a seed whose
    matches were not kept (records written before tafm kept them) is left out."""
    from ablations.records import matches_name

    cache = {} if cache is None else cache
    name = matches_name(occlusion)
    by_seed = {r.seed: r for r in baseline if name in r.artifacts}
    pairs = []
    for row in sorted(rows, key=lambda r: r.seed):
        base = by_seed.get(row.seed)
        if base is None or name not in row.artifacts:
            continue
        pairs.append((_load_cached(Path(base_dir) / row.artifacts[name], cache),
                      _load_cached(Path(base_dir) / base.artifacts[name], cache)))
    return pairs


def compare(rows: Sequence["TrialRecord"], baseline: Sequence["TrialRecord"], occlusion: float, base_dir: Path,
            resamples: int = RESAMPLES, seed: int = SEED,
            cache: Optional[Dict[Path, VideoMatches]] = None) -> Optional[Difference]:
    """The row's difference from the baseline at one occlusion level, pooled over the seeds both ran;
    None when no seed kept its matches."""
    pairs = seed_pairs(rows, baseline, occlusion, base_dir, cache)
    return paired_bootstrap(pairs, resamples, seed) if pairs else None
