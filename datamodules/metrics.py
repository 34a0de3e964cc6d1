"""ImageNet VID detection metrics, accumulated online frame by frame.

Two accuracy metrics on the same boxes (pixel 0-based inclusive (xmin, ymin, xmax, ymax), as in
the VID XML; detections in the same convention, floats allowed):

- ``vid_map50``: the official ILSVRC VID devkit mAP (``eval_vid_detection.m``): per-gt threshold
  ``min(0.5, wh / ((w+10)(h+10)))``, inclusive-pixel IoU, per-frame greedy matching in which a
  detection only considers same-class gts not yet matched (test ``ov >= thr``), all-point
  interpolated AP (VOC2010+) per class, mean over classes that have ground truth.
- ``coco_ap50``: COCO AP at IoU 0.5 as pycocotools computes it: boxes converted to
  [xmin, ymin, xmax+1, ymax+1] with plain IoU, per frame and class the top ``max_dets`` (100)
  detections matched greedily by score (best IoU >= 0.5 among unmatched gts, ties to the later
  gt), 101-point interpolated precision, mean over classes with ground truth. Score ties across
  frames are broken by update order (pycocotools: by image id).

Per frame only (score, tp flag, video) per detection and the per-video, per-class gt count are kept;
the stability records of ``datamodules.stability`` are kept per gt box. ``per_video()`` hands the
devkit (score, tp) per detection with its video, what a paired bootstrap over videos needs.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

from datamodules.stability import StabilityAccumulator

# Defaults of the official metrics, in one place.
DEVKIT_DEFAULT_IOU = 0.5  # eval_vid_detection.m: defaultIOUthr
DEVKIT_PIXEL_TOLERANCE = 10.0  # eval_vid_detection.m: pixelTolerance
COCO_IOU = 0.5  # AP50
COCO_MAX_DETS = 100  # pycocotools maxDets[-1], per frame and class
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def devkit_iou_matrix(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Devkit overlap [D, N] of inclusive pixel boxes: iw = min(x2)-max(x1)+1, 0 where iw or ih <= 0."""
    d = np.asarray(dets, dtype=np.float64).reshape(-1, 1, 4)
    g = np.asarray(gts, dtype=np.float64).reshape(1, -1, 4)
    iw = np.minimum(d[..., 2], g[..., 2]) - np.maximum(d[..., 0], g[..., 0]) + 1.0
    ih = np.minimum(d[..., 3], g[..., 3]) - np.maximum(d[..., 1], g[..., 1]) + 1.0
    inter = iw * ih
    area_d = (d[..., 2] - d[..., 0] + 1.0) * (d[..., 3] - d[..., 1] + 1.0)
    area_g = (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0)
    valid = (iw > 0) & (ih > 0)
    return np.where(valid, inter / np.where(valid, area_d + area_g - inter, 1.0), 0.0)


def devkit_iou(det: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Devkit overlap of one detection [4] with gts [N, 4], inclusive pixels; 0 where no overlap."""
    return devkit_iou_matrix(np.asarray(det, dtype=np.float64).reshape(1, 4), gts)[0]


def gt_thresholds(gts: np.ndarray) -> np.ndarray:
    """Devkit per-gt IoU threshold min(0.5, w*h / ((w+10)*(h+10))), w = xmax-xmin+1 [N]."""
    g = np.asarray(gts, dtype=np.float64).reshape(-1, 4)
    w = g[:, 2] - g[:, 0] + 1.0
    h = g[:, 3] - g[:, 1] + 1.0
    tol = DEVKIT_PIXEL_TOLERANCE
    return np.minimum(DEVKIT_DEFAULT_IOU, (w * h) / ((w + tol) * (h + tol)))


def coco_iou(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Plain IoU [D, N] of boxes already in [x0, y0, x1, y1) (exclusive) form, as pycocotools."""
    d = np.asarray(dets, dtype=np.float64).reshape(-1, 1, 4)
    g = np.asarray(gts, dtype=np.float64).reshape(1, -1, 4)
    iw = np.clip(np.minimum(d[..., 2], g[..., 2]) - np.maximum(d[..., 0], g[..., 0]), 0.0, None)
    ih = np.clip(np.minimum(d[..., 3], g[..., 3]) - np.maximum(d[..., 1], g[..., 1]), 0.0, None)
    inter = iw * ih
    area_d = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    union = area_d + area_g - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def devkit_match(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Devkit greedy matching of one frame and class; dets must be sorted by descending score.

    Returns, per detection, the index of the matched gt or -1 (false positive). Each detection
    considers only gts not yet matched, keeps the largest ov with ov >= thr (first on ties).
    """
    det = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.full(det.shape[0], -1, dtype=np.int64)
    if gt.shape[0] == 0:
        return out
    passes = devkit_iou_matrix(det, gt)
    passes = np.where(passes >= gt_thresholds(gt)[None, :], passes, -np.inf)
    taken = np.zeros(gt.shape[0], dtype=bool)
    for j in np.nonzero(np.isfinite(passes).any(axis=1))[0].tolist():  # others are FPs outright
        cand = np.where(taken, -np.inf, passes[j])
        k = int(np.argmax(cand))  # first of equal maxima, as the devkit's strict ov > ovmax
        if np.isfinite(cand[k]):
            out[j] = k
            taken[k] = True
    return out


def coco_match(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = COCO_IOU) -> np.ndarray:
    """pycocotools greedy matching (inclusive boxes in, +1 conversion inside); dets sorted by score.

    Returns per detection the matched gt index or -1. Best IoU >= threshold among unmatched gts,
    ties going to the later gt as in ``COCOeval.evaluateImg``.
    """
    det = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4) + np.array([0.0, 0.0, 1.0, 1.0])
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4) + np.array([0.0, 0.0, 1.0, 1.0])
    out = np.full(det.shape[0], -1, dtype=np.int64)
    if gt.shape[0] == 0 or det.shape[0] == 0:
        return out
    ious = coco_iou(det, gt)
    thr = min(iou_threshold, 1 - 1e-10)
    taken = np.zeros(gt.shape[0], dtype=bool)
    for j in np.nonzero((ious >= thr).any(axis=1))[0].tolist():  # others are FPs outright
        cand = np.where(~taken & (ious[j] >= thr), ious[j], -np.inf)
        k = cand.size - 1 - int(np.argmax(cand[::-1]))  # last index of the max
        if np.isfinite(cand[k]):
            out[j] = k
            taken[k] = True
    return out


def precision_recall(scores: np.ndarray, tp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """Devkit/VOC curve: stable sort by descending score, cumulative tp/fp, rec = tp/npos."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp_sorted = np.asarray(tp, dtype=np.float64)[order]
    ctp = np.cumsum(tp_sorted)
    cfp = np.cumsum(1.0 - tp_sorted)
    recall = ctp / max(npos, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return recall, precision


def average_precision_allpoint(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ all-point AP (devkit VOCap): pad, running max from the end, sum where recall moves."""
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def coco_ap101(recall: np.ndarray, precision: np.ndarray) -> float:
    """pycocotools AP: precision made monotone, sampled at recalls 0, 0.01, .., 1 (0 beyond reach)."""
    rc = np.asarray(recall, dtype=np.float64)
    pr = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    q = np.zeros(COCO_RECALL_THRESHOLDS.size, dtype=np.float64)
    inds = np.searchsorted(rc, COCO_RECALL_THRESHOLDS, side="left")
    ok = inds < rc.size
    q[ok] = pr[inds[ok]]
    return float(np.mean(q))


def _as_array(x: Any, dtype: Any, name: str, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    """Numpy copy of a numpy/torch/list input, reshaped to [N, *shape_tail]; error names the argument."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x if x is not None else [], dtype=dtype)
    if arr.size == 0:
        return arr.reshape((0, *shape_tail))
    if shape_tail and (arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail):
        raise ValueError(f"VidEvaluator.update: {name} must have shape [N, {shape_tail[0]}], got {arr.shape}")
    if not shape_tail and arr.ndim != 1:
        raise ValueError(f"VidEvaluator.update: {name} must be 1-D [N], got shape {arr.shape}")
    return arr


class VidEvaluator:
    """Online ImageNet VID evaluator: ``update`` once per frame, ``compute`` at the end.

    ``compute()`` returns vid_map50, coco_ap50, per_class_ap (devkit AP by class name, classes with
    gt only), num_classes_evaluated / num_classes_skipped (classes without any gt are skipped from
    both means and counted), num_frames, num_gt, num_det and ``stability`` (see
    ``datamodules.stability``). With zero frames, zero gt or zero detections every AP is 0.0, not
    NaN. ``stability_score_threshold`` keeps only detections scoring at least that much for the
    stability matching (same devkit matching on that subset); 0.0 uses every detection.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        num_classes: int = 30,
        stability_score_threshold: float = 0.0,
        coco_max_dets: int = COCO_MAX_DETS,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"VidEvaluator: class_names has {len(class_names)} names but num_classes={num_classes}; "
                "give one name per class id 1..num_classes"
            )
        if num_classes < 1:
            raise ValueError(f"VidEvaluator: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(1, num_classes + 1)]
        self.stability_score_threshold = float(stability_score_threshold)
        self.coco_max_dets = int(coco_max_dets)
        self.reset()

    def reset(self) -> None:
        """Forget every frame seen so far."""
        n = self.num_classes + 1  # index 0 unused (background)
        self._scores = [array("d") for _ in range(n)]
        self._vid_tp = [array("b") for _ in range(n)]
        self._coco_tp = [array("b") for _ in range(n)]  # 1 tp, 0 fp, -1 beyond max_dets
        self._video_of = [array("i") for _ in range(n)]  # index into self._videos, per detection
        self._npos = np.zeros(n, dtype=np.int64)
        self._videos: dict[str, int] = {}
        self._npos_by_video: list[np.ndarray] = []
        self._seen: dict[str, set[int]] = {}
        self._num_frames = 0
        self._num_det = 0
        self._stability = StabilityAccumulator()

    def update(
        self,
        video: str,
        frame_index: int,
        gt_boxes: Any,
        gt_labels: Any,
        gt_track_ids: Any,
        det_boxes: Any,
        det_scores: Any,
        det_labels: Any,
    ) -> None:
        """Match one frame's detections to its gts (devkit and COCO) and store (score, tp) per class.

        gt_track_ids may be None: those gts then count for the APs but not for stability.
        """
        gtb = _as_array(gt_boxes, np.float64, "gt_boxes", (4,))
        gtl = _as_array(gt_labels, np.int64, "gt_labels")
        db = _as_array(det_boxes, np.float64, "det_boxes", (4,))
        ds = _as_array(det_scores, np.float64, "det_scores")
        dl = _as_array(det_labels, np.int64, "det_labels")
        tids = None if gt_track_ids is None else _as_array(gt_track_ids, np.int64, "gt_track_ids")
        self._check_frame(video, int(frame_index), gtb, gtl, tids, db, ds, dl)

        if video not in self._videos:
            self._videos[video] = len(self._videos)
            self._npos_by_video.append(np.zeros(self.num_classes + 1, dtype=np.int64))
        video_id = self._videos[video]
        matched_det = np.full(gtb.shape, np.nan)  # per gt: box of the det that matched it (stability)
        for c in np.union1d(np.unique(gtl), np.unique(dl)).tolist():
            g_idx = np.nonzero(gtl == c)[0]
            d_idx = np.nonzero(dl == c)[0]
            d_idx = d_idx[np.argsort(-ds[d_idx], kind="stable")]
            self._npos[c] += g_idx.size
            self._npos_by_video[video_id][c] += g_idx.size
            if d_idx.size == 0:
                continue
            keep = min(d_idx.size, self.coco_max_dets)
            coco = np.full(d_idx.size, -1, dtype=np.int8)
            if g_idx.size == 0:  # no gt of this class here: every detection is a false positive
                vid = np.full(d_idx.size, -1, dtype=np.int64)
                coco[:keep] = 0
            else:
                vid = devkit_match(db[d_idx], gtb[g_idx])
                coco[:keep] = coco_match(db[d_idx[:keep]], gtb[g_idx]) >= 0
            self._scores[c].frombytes(ds[d_idx].tobytes())
            self._vid_tp[c].frombytes((vid >= 0).astype(np.int8).tobytes())
            self._coco_tp[c].frombytes(coco.tobytes())
            self._video_of[c].extend([video_id] * d_idx.size)
            if tids is not None and g_idx.size:
                if self.stability_score_threshold > 0.0:
                    strong = ds[d_idx] >= self.stability_score_threshold
                    d_idx = d_idx[strong]
                    vid = devkit_match(db[d_idx], gtb[g_idx])
                hit = vid >= 0
                matched_det[g_idx[vid[hit]]] = db[d_idx[hit]]
        if tids is not None and tids.size:
            self._stability.add(video, int(frame_index), tids, gtb, matched_det)
        self._num_frames += 1
        self._num_det += int(dl.size)

    def _check_frame(
        self,
        video: str,
        frame_index: int,
        gtb: np.ndarray,
        gtl: np.ndarray,
        tids: np.ndarray | None,
        db: np.ndarray,
        ds: np.ndarray,
        dl: np.ndarray,
    ) -> None:
        """Reject inconsistent lengths, labels outside 1..num_classes, bad boxes and repeated frames."""
        where = f"VidEvaluator.update(video={video!r}, frame_index={frame_index})"
        if gtl.size != gtb.shape[0] or (tids is not None and tids.size != gtb.shape[0]):
            raise ValueError(
                f"{where}: gt_boxes has {gtb.shape[0]} rows, gt_labels {gtl.size}, "
                f"gt_track_ids {None if tids is None else tids.size}; they must have the same length"
            )
        if ds.size != db.shape[0] or dl.size != db.shape[0]:
            raise ValueError(
                f"{where}: det_boxes has {db.shape[0]} rows, det_scores {ds.size}, det_labels {dl.size}; "
                "they must have the same length"
            )
        for name, lab in (("gt_labels", gtl), ("det_labels", dl)):
            if lab.size and (lab.min() < 1 or lab.max() > self.num_classes):
                raise ValueError(
                    f"{where}: {name} has values in [{lab.min()}, {lab.max()}]; valid class ids are "
                    f"1..{self.num_classes} (0 is background and must be removed before evaluation)"
                )
        if gtb.size and ((gtb[:, 2] < gtb[:, 0]).any() or (gtb[:, 3] < gtb[:, 1]).any()):
            raise ValueError(f"{where}: gt_boxes must be inclusive (xmin, ymin, xmax, ymax) with xmax >= xmin, ymax >= ymin")
        if not (np.isfinite(db).all() and np.isfinite(ds).all() and np.isfinite(gtb).all()):
            raise ValueError(f"{where}: boxes and scores must be finite (found NaN or inf)")
        seen = self._seen.setdefault(video, set())
        if frame_index in seen:
            raise ValueError(
                f"{where}: this frame was already evaluated; each (video, frame) must be passed once "
                "(overlapping clips would count its boxes twice)"
            )
        seen.add(frame_index)

    def per_video(self) -> dict[str, np.ndarray]:
        """The devkit matches by video, for resampling videos: every detection's video index, class,
        score and tp flag (in update order), the video names, and the gt count per video and class.

        ``reports.significance`` recomputes ``vid_map50`` from these (exactly, with every video once).
        """
        classes = range(1, self.num_classes + 1)
        return {
            "video": np.concatenate([np.frombuffer(self._video_of[c], dtype=np.int32) for c in classes]).astype(np.int32),
            "label": np.concatenate([np.full(len(self._scores[c]), c, dtype=np.int16) for c in classes]),
            "score": np.concatenate([np.frombuffer(self._scores[c], dtype=np.float64) for c in classes]),
            "tp": np.concatenate([np.frombuffer(self._vid_tp[c], dtype=np.int8) for c in classes]),
            "videos": np.array(list(self._videos), dtype=str),
            "npos": (np.stack(self._npos_by_video) if self._npos_by_video
                     else np.zeros((0, self.num_classes + 1), dtype=np.int64)).astype(np.int32),
        }

    def compute(self) -> dict[str, Any]:
        """Metrics over every frame so far (see class docstring); APs are 0.0 when nothing was seen."""
        per_class: dict[str, float] = {}
        vid_aps: list[float] = []
        coco_aps: list[float] = []
        for c in range(1, self.num_classes + 1):
            npos = int(self._npos[c])
            if npos == 0:
                continue
            scores = np.frombuffer(self._scores[c], dtype=np.float64)
            vid_tp = np.frombuffer(self._vid_tp[c], dtype=np.int8)
            rec, prec = precision_recall(scores, vid_tp, npos)
            ap = average_precision_allpoint(rec, prec)
            per_class[self.class_names[c - 1]] = ap
            vid_aps.append(ap)
            coco_tp = np.frombuffer(self._coco_tp[c], dtype=np.int8)
            kept = coco_tp >= 0
            rec, prec = precision_recall(scores[kept], coco_tp[kept], npos)
            coco_aps.append(coco_ap101(rec, prec))
        return {
            "vid_map50": float(np.mean(vid_aps)) if vid_aps else 0.0,
            "coco_ap50": float(np.mean(coco_aps)) if coco_aps else 0.0,
            "per_class_ap": per_class,
            "num_classes_evaluated": len(vid_aps),
            "num_classes_skipped": self.num_classes - len(vid_aps),
            "num_frames": self._num_frames,
            "num_gt": int(self._npos.sum()),
            "num_det": self._num_det,
            "stability": self._stability.compute(),
        }
