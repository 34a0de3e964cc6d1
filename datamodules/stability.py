"""Temporal stability of video detections along ground-truth tracks (after Zhang & Wang 2016).

"On the stability of video detection and tracking" (arXiv 1611.06467) splits stability into a
fragment error, a centre-position error and a scale-and-ratio error. This module accumulates,
for every ground-truth track (video, track id), one record per annotated frame: whether the
ILSVRC devkit matching of that frame gave the gt a detection, and if so the normalised offsets
of the matched detection. Boxes are pixel 0-based inclusive (xmin, ymin, xmax, ymax), so a box's
width is ``xmax - xmin + 1`` and its centre ``(xmin + xmax) / 2`` (the same for gt and det).

Exact definitions, for a track k annotated in frames t = 1..N_k (sorted by frame index; frames
where the object is not annotated are simply absent, they are not "unmatched"):

- status s_t = 1 if the devkit matched a detection to the gt in frame t, else 0.
- fragment error of the track: f_k = #{t : s_t != s_{t-1}} / (N_k - 1), defined for N_k >= 2.
  ``fragment_error`` = mean of f_k over tracks with N_k >= 2 (single-frame tracks have no
  transition to count and are left out of this mean).
- On the matched frames of a track (det box d, gt box g, widths w, heights h, centres cx, cy):
  ex = (cx_d - cx_g) / w_g, ey = (cy_d - cy_g) / h_g,
  es = sqrt((w_d * h_d) / (w_g * h_g))               (scale ratio),
  er = (w_d / h_d) / (w_g / h_g)                       (aspect-ratio ratio).
  ``center_jitter`` = mean over tracks of std(ex) + std(ey);
  ``scale_jitter``  = mean over tracks of std(es) + std(er) (the paper's scale-and-ratio error).
  std is the population standard deviation (ddof = 0) over the track's matched frames; tracks
  with fewer than 2 matched frames have no spread to measure and are left out of these means.
- ``stability_error`` = fragment_error + center_jitter + scale_jitter (the paper's Phi).
- ``num_tracks`` = number of distinct (video, track id) pairs seen.

Every mean over an empty set of tracks is reported as 0.0 (not NaN). Memory is six floats per
annotated gt box; frames may arrive in any order (records are sorted by frame at compute time).
"""
from __future__ import annotations

from array import array

import numpy as np

# Columns of one per-(track, frame) record.
_FRAME, _MATCHED, _EX, _EY, _ES, _ER = range(6)
_RECORD_LEN = 6


def box_geometry(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y, width, height of inclusive pixel boxes [N, 4]."""
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    return cx, cy, w, h


def stability_records(gt_boxes: np.ndarray, matched_det_boxes: np.ndarray) -> np.ndarray:
    """Per-gt (matched, ex, ey, es, er) rows [N, 5]; unmatched gts (NaN det row) get matched=0, 0s."""
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    det = np.asarray(matched_det_boxes, dtype=np.float64).reshape(-1, 4)
    matched = ~np.isnan(det).any(axis=1)
    out = np.zeros((gt.shape[0], 5), dtype=np.float64)
    out[:, 0] = matched
    if matched.any():
        gcx, gcy, gw, gh = box_geometry(gt[matched])
        dcx, dcy, dw, dh = box_geometry(det[matched])
        out[matched, 1] = (dcx - gcx) / gw
        out[matched, 2] = (dcy - gcy) / gh
        out[matched, 3] = np.sqrt(np.clip(dw * dh, 0.0, None) / (gw * gh))
        out[matched, 4] = (dw / dh) / (gw / gh)
    return out


class StabilityAccumulator:
    """Online per-track records for the fragment / centre / scale-and-ratio errors."""

    def __init__(self) -> None:
        self._tracks: dict[tuple[str, int], array] = {}

    def reset(self) -> None:
        """Forget every track."""
        self._tracks = {}

    def add(
        self,
        video: str,
        frame_index: int,
        track_ids: np.ndarray,
        gt_boxes: np.ndarray,
        matched_det_boxes: np.ndarray,
    ) -> None:
        """Record one frame: gt i of track ``track_ids[i]`` matched ``matched_det_boxes[i]`` (NaN = none)."""
        rows = stability_records(gt_boxes, matched_det_boxes)
        for track_id, row in zip(np.asarray(track_ids).reshape(-1).tolist(), rows):
            key = (video, int(track_id))
            buf = self._tracks.get(key)
            if buf is None:
                buf = self._tracks[key] = array("d")
            buf.append(float(frame_index))
            buf.extend(row.tolist())

    def compute(self) -> dict[str, float | int]:
        """fragment_error, center_jitter, scale_jitter, stability_error, num_tracks (module docstring)."""
        fragments: list[float] = []
        centers: list[float] = []
        scales: list[float] = []
        for buf in self._tracks.values():
            rec = np.frombuffer(buf, dtype=np.float64).reshape(-1, _RECORD_LEN)
            rec = rec[np.argsort(rec[:, _FRAME], kind="stable")]
            status = rec[:, _MATCHED] > 0.5
            if status.size >= 2:
                flips = np.count_nonzero(status[1:] != status[:-1])
                fragments.append(flips / (status.size - 1))
            hit = rec[status]
            if hit.shape[0] >= 2:
                centers.append(float(np.std(hit[:, _EX]) + np.std(hit[:, _EY])))
                scales.append(float(np.std(hit[:, _ES]) + np.std(hit[:, _ER])))
        fragment = float(np.mean(fragments)) if fragments else 0.0
        center = float(np.mean(centers)) if centers else 0.0
        scale = float(np.mean(scales)) if scales else 0.0
        return {
            "fragment_error": fragment,
            "center_jitter": center,
            "scale_jitter": scale,
            "stability_error": fragment + center + scale,
            "num_tracks": len(self._tracks),
        }
