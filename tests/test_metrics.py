"""Hand-computed checks of the ImageNet VID devkit mAP, COCO AP50 and the stability errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from datamodules.metrics import (
    VidEvaluator,
    average_precision_allpoint,
    coco_ap101,
    devkit_iou,
    devkit_match,
    gt_thresholds,
)

NO_BOX = np.zeros((0, 4))
NO_INT = np.zeros((0,), dtype=np.int64)
NO_FLOAT = np.zeros((0,))


def _frame(ev: VidEvaluator, video: str, t: int, gts, gl, tids, dets, ds, dl) -> None:
    ev.update(video, t, np.array(gts, float).reshape(-1, 4), np.array(gl, int), np.array(tids, int),
              np.array(dets, float).reshape(-1, 4), np.array(ds, float), np.array(dl, int))


# --- devkit building blocks -------------------------------------------------------------------

def test_devkit_iou_uses_inclusive_pixels() -> None:
    # det 10x10 px [0..9], gt 10x10 px [5..14]: iw = 9-5+1 = 5, ih = 10, inter 50,
    # union 100 + 100 - 50 = 150 -> 1/3 (exclusive IoU on the same numbers would be 36/126).
    ov = devkit_iou(np.array([0, 0, 9, 9]), np.array([[5, 0, 14, 9], [5, 5, 9, 9], [10, 0, 19, 9]]))
    # second gt touches the det in one 5x5 corner: inter 25, union 100 + 25 - 25 -> 0.25;
    # third gt starts at x=10: iw = 9-10+1 = 0 -> no overlap.
    np.testing.assert_allclose(ov, [1 / 3, 0.25, 0.0])
    # a single shared pixel: iw = ih = 1, union 36 + 25 - 1 = 60
    assert devkit_iou(np.array([0, 0, 5, 5]), np.array([[5, 5, 9, 9]]))[0] == pytest.approx(1 / 60)


def test_gt_thresholds_small_boxes_get_lower_threshold() -> None:
    thr = gt_thresholds(np.array([[0, 0, 9, 9], [0, 0, 19, 9], [0, 0, 99, 99]]))
    # 10x10: 100/(20*20) = 0.25; 20x10: 200/(30*20) = 1/3; 100x100: 10000/12100 > 0.5 -> 0.5
    np.testing.assert_allclose(thr, [0.25, 1 / 3, 0.5])


def test_small_box_threshold_turns_a_low_overlap_into_a_true_positive() -> None:
    # gt 10x10 (thr 0.25); det 10x30 covering it: devkit ov = 100/300 = 1/3 >= 0.25 -> TP.
    # At a fixed 0.5 it would be a FP; COCO AP50 (IoU on [x0, y0, x1+1, y1+1]: 100/300) misses it.
    ev = VidEvaluator(num_classes=1)
    _frame(ev, "v", 0, [[0, 0, 9, 9]], [1], [0], [[0, 0, 9, 29]], [0.9], [1])
    # a 10x40 det: ov = 100/400 = 0.25 exactly equals the threshold, and the devkit test is >=
    _frame(ev, "v", 1, [[0, 0, 9, 9]], [1], [1], [[0, 0, 9, 39]], [0.8], [1])
    out = ev.compute()
    assert out["vid_map50"] == pytest.approx(1.0)
    assert out["coco_ap50"] == pytest.approx(0.0)


def test_duplicate_detection_matches_the_second_gt_in_the_devkit() -> None:
    a, b = [0, 0, 99, 99], [20, 0, 119, 99]
    det1, det2 = [0, 0, 99, 99], [5, 0, 104, 99]
    gts = np.array([a, b])
    ov2 = devkit_iou(np.array(det2), gts)
    # det2: ov with A = 95*100 / (20000 - 9500) = 0.905, with B = 85*100 / (20000 - 8500) = 0.739.
    np.testing.assert_allclose(ov2, [9500 / 10500, 8500 / 11500])
    # VOC takes the arg-max over ALL gts (A, already taken by det1) and calls det2 a FP; the
    # devkit drops A before the arg-max, so det2 takes B (0.739 >= 0.5): both TP.
    assert ov2[0] > ov2[1]
    np.testing.assert_array_equal(devkit_match(np.array([det1, det2]), gts), [0, 1])
    ev = VidEvaluator(num_classes=1)
    _frame(ev, "v", 0, [a, b], [1, 1], [0, 1], [det1, det2], [0.9, 0.8], [1, 1])
    assert ev.compute()["vid_map50"] == pytest.approx(1.0)


def test_all_point_ap_by_hand() -> None:
    # recall .25 .25 .5 .5 .75, precision 1 .5 2/3 .5 .6 (TP FP TP FP TP, npos 4):
    # envelope 1, 2/3, 2/3, .6, .6 -> AP = .25*1 + .25*2/3 + .25*.6 = 0.5666...
    rec = np.array([0.25, 0.25, 0.5, 0.5, 0.75])
    prec = np.array([1.0, 0.5, 2 / 3, 0.5, 0.6])
    assert average_precision_allpoint(rec, prec) == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6)
    assert average_precision_allpoint(np.zeros(0), np.zeros(0)) == 0.0


def test_coco_101_point_differs_from_all_point() -> None:
    # one TP at recall 0.5: all-point area 0.5; 101-point samples recall 0, .01, .., .5 (51 points)
    # at precision 1 and the other 50 at 0 -> 51/101.
    assert average_precision_allpoint(np.array([0.5]), np.array([1.0])) == pytest.approx(0.5)
    assert coco_ap101(np.array([0.5]), np.array([1.0])) == pytest.approx(51 / 101)


# --- the evaluator ------------------------------------------------------------------------------

def _interleaved(ev: VidEvaluator) -> None:
    """Class 1, npos 4; dets by score: TP .9, FP .8, TP .7, FP .6, TP .5 (gt g2 never found)."""
    g1, g2, g3, g4 = [0, 0, 49, 49], [100, 100, 149, 149], [0, 0, 59, 59], [200, 0, 259, 59]
    far = [400, 400, 449, 449]
    _frame(ev, "v", 0, [g1, g2], [1, 1], [0, 1], [g1, far], [0.9, 0.8], [1, 1])
    _frame(ev, "v", 1, [g3, g4], [1, 1], [2, 3], [far, g4, g3], [0.6, 0.5, 0.7], [1, 1, 1])


def test_interleaved_tp_fp_gives_hand_computed_ap() -> None:
    ev = VidEvaluator(num_classes=2)
    _interleaved(ev)
    out = ev.compute()
    # devkit: 0.25*1 + 0.25*2/3 + 0.25*0.6 (see test_all_point_ap_by_hand)
    assert out["vid_map50"] == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6)
    # COCO: recall points 0..0.25 (26) at 1, 0.26..0.5 (25) at 2/3, 0.51..0.75 (25) at 0.6, rest 0
    assert out["coco_ap50"] == pytest.approx((26 + 25 * 2 / 3 + 25 * 0.6) / 101)
    assert out["num_classes_evaluated"] == 1 and out["num_classes_skipped"] == 1
    assert (out["num_frames"], out["num_gt"], out["num_det"]) == (2, 4, 5)


def test_class_without_ground_truth_is_skipped_and_counted() -> None:
    ev = VidEvaluator(class_names=["a", "b", "c"], num_classes=3)
    _frame(ev, "v", 0, [[0, 0, 9, 9], [50, 50, 99, 99]], [1, 2], [0, 1],
           [[0, 0, 9, 9], [50, 50, 99, 99], [200, 200, 250, 250]], [0.9, 0.8, 0.99], [1, 2, 3])
    out = ev.compute()
    assert out["per_class_ap"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert (out["num_classes_evaluated"], out["num_classes_skipped"]) == (2, 1)
    assert out["vid_map50"] == pytest.approx(1.0) and out["coco_ap50"] == pytest.approx(1.0)


def test_perfect_detections_score_one_on_both_metrics() -> None:
    ev = VidEvaluator(num_classes=30)
    for t in range(4):
        gts = [[10 + t, 20, 60 + t, 90], [100, 100, 180, 140 + t]]
        _frame(ev, "v", t, gts, [3, 7], [0, 1], gts, [0.8, 0.6], [3, 7])
    out = ev.compute()
    assert out["vid_map50"] == pytest.approx(1.0) and out["coco_ap50"] == pytest.approx(1.0)
    assert out["num_classes_evaluated"] == 2 and out["num_classes_skipped"] == 28


def test_empty_evaluations_give_zero_not_nan() -> None:
    out = VidEvaluator().compute()
    assert (out["vid_map50"], out["coco_ap50"], out["num_frames"]) == (0.0, 0.0, 0)
    assert out["stability"]["stability_error"] == 0.0 and out["stability"]["num_tracks"] == 0
    ev = VidEvaluator(num_classes=2)
    _frame(ev, "v", 0, [[0, 0, 9, 9]], [1], [0], NO_BOX, NO_FLOAT, NO_INT)
    _frame(ev, "v", 1, NO_BOX, NO_INT, NO_INT, NO_BOX, NO_FLOAT, NO_INT)
    out = ev.compute()
    assert out["vid_map50"] == 0.0 and out["coco_ap50"] == 0.0 and out["num_classes_evaluated"] == 1
    assert not any(math.isnan(v) for v in out["stability"].values())


def test_bad_inputs_are_rejected_with_the_argument_named() -> None:
    ev = VidEvaluator(num_classes=30)
    with pytest.raises(ValueError, match="gt_labels.*1..30"):
        _frame(ev, "v", 0, [[0, 0, 9, 9]], [0], [0], NO_BOX, NO_FLOAT, NO_INT)
    with pytest.raises(ValueError, match="det_scores"):
        _frame(ev, "v", 0, NO_BOX, NO_INT, NO_INT, [[0, 0, 9, 9]], [0.5, 0.4], [1])
    _frame(ev, "v", 0, NO_BOX, NO_INT, NO_INT, NO_BOX, NO_FLOAT, NO_INT)
    with pytest.raises(ValueError, match="already evaluated"):
        _frame(ev, "v", 0, NO_BOX, NO_INT, NO_INT, NO_BOX, NO_FLOAT, NO_INT)
    with pytest.raises(ValueError, match="class_names"):
        VidEvaluator(class_names=["a"], num_classes=2)


def _literal_devkit_map(frames: list[tuple], num_classes: int) -> float:
    """Loop-by-loop translation of eval_vid_detection.m, over whole lists (the batch reference)."""
    conf: list[list[float]] = [[] for _ in range(num_classes + 1)]
    tps: list[list[int]] = [[] for _ in range(num_classes + 1)]
    npos = [0] * (num_classes + 1)
    for gts, gl, dets, ds, dl in frames:
        for c in gl:
            npos[c] += 1
        thr = [min(0.5, (g[2] - g[0] + 1) * (g[3] - g[1] + 1) / ((g[2] - g[0] + 11) * (g[3] - g[1] + 11))) for g in gts]
        detected = [False] * len(gts)
        for j in sorted(range(len(ds)), key=lambda i: -ds[i]):
            bb, ovmax, kmax = dets[j], -math.inf, -1
            for k, g in enumerate(gts):
                if gl[k] != dl[j] or detected[k]:
                    continue
                iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
                ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                    ov = iw * ih / ua
                    if ov >= thr[k] and ov > ovmax:
                        ovmax, kmax = ov, k
            if kmax >= 0:
                detected[kmax] = True
            conf[dl[j]].append(ds[j])
            tps[dl[j]].append(int(kmax >= 0))
    aps = []
    for c in range(1, num_classes + 1):
        if npos[c] == 0:
            continue
        order = sorted(range(len(conf[c])), key=lambda i: -conf[c][i])
        tp = np.cumsum([tps[c][i] for i in order])
        fp = np.cumsum([1 - tps[c][i] for i in order])
        aps.append(average_precision_allpoint(tp / npos[c], tp / np.maximum(tp + fp, 1)))
    return float(np.mean(aps))


def test_online_accumulation_equals_one_batch_and_order_does_not_matter() -> None:
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        n, m = int(rng.integers(0, 4)), int(rng.integers(0, 6))
        xy = rng.integers(0, 60, size=(n, 2))
        gts = np.concatenate([xy, xy + rng.integers(5, 40, size=(n, 2))], axis=1).astype(float)
        gl = rng.integers(1, 4, size=n)
        src = rng.integers(0, max(n, 1), size=m)  # each det jitters a gt (or is clutter if none)
        dets = gts[src] + rng.normal(0, 4, size=(m, 4)) if n else rng.uniform(0, 80, size=(m, 4))
        dets[:, 2:] = np.maximum(dets[:, 2:], dets[:, :2])
        dl = np.where(rng.uniform(size=m) < 0.8, gl[src] if n else 1, rng.integers(1, 4, size=m))
        frames.append((gts, gl, dets, rng.uniform(size=m).round(1), dl))
    expected = _literal_devkit_map([tuple(map(np.ndarray.tolist, f)) for f in frames], num_classes=3)

    ev = VidEvaluator(num_classes=3)
    for t, (g, gl, d, ds, dl) in enumerate(frames):
        ev.update("v", t, g, gl, np.arange(len(gl)), d, ds, dl)
        if t == 5:
            ev.compute()  # a mid-way compute must not disturb the accumulation
    once = ev.compute()
    assert 0.05 < expected < 0.95  # a mix of TPs and FPs, not a trivial case
    assert once["vid_map50"] == pytest.approx(expected)

    # frames out of order: score ties across frames (scores are rounded) are broken by update
    # order, as the devkit breaks them by image-list order; stability sorts by frame index.
    perm = rng.permutation(len(frames)).tolist()
    shuffled = VidEvaluator(num_classes=3)
    for t in perm:
        g, gl, d, ds, dl = frames[t]
        shuffled.update("v", t, g, gl, np.arange(len(gl)), d, ds, dl)
    again = shuffled.compute()
    reordered = [tuple(map(np.ndarray.tolist, frames[t])) for t in perm]
    assert again["vid_map50"] == pytest.approx(_literal_devkit_map(reordered, num_classes=3))
    assert again["stability"] == pytest.approx(once["stability"])
    assert (again["num_gt"], again["num_det"]) == (once["num_gt"], once["num_det"])
    ev.reset()
    assert ev.compute()["num_frames"] == 0


def test_torch_inputs_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    ev = VidEvaluator(num_classes=1)
    box = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    ev.update("v", 0, box, torch.tensor([1]), torch.tensor([0]), box.clone(), torch.tensor([0.5]), torch.tensor([1]))
    assert ev.compute()["vid_map50"] == pytest.approx(1.0)


# --- stability ---------------------------------------------------------------------------------

def test_perfectly_tracked_box_has_zero_stability_error() -> None:
    ev = VidEvaluator(num_classes=1)
    for t in range(5):
        gt = [10 + 3 * t, 10, 60 + 3 * t, 50]
        det = [gt[0] + 2, gt[1] + 2, gt[2] + 2, gt[3] + 2]  # constant offset: no spread, no jitter
        _frame(ev, "v", t, [gt], [1], [7], [det], [0.9], [1])
    st = ev.compute()["stability"]
    assert st == {"fragment_error": 0.0, "center_jitter": 0.0, "scale_jitter": 0.0, "stability_error": 0.0, "num_tracks": 1}


def test_every_other_frame_detection_fragment_error_by_hand() -> None:
    # track 0 matched in frames 0, 2, 4 of 0..4: 4 flips / (5-1) = 1.0; track 1 always matched: 0.
    # fragment_error = (1.0 + 0.0) / 2 = 0.5; matched boxes equal the gts, so no jitter.
    ev = VidEvaluator(num_classes=1)
    a, b = [0, 0, 39, 39], [100, 100, 139, 139]
    for t in range(5):
        dets = [a, b] if t % 2 == 0 else [b]
        _frame(ev, "v", t, [a, b], [1, 1], [0, 1], dets, [0.9] * len(dets), [1] * len(dets))
    st = ev.compute()["stability"]
    assert st["fragment_error"] == pytest.approx(0.5)
    assert st["center_jitter"] == 0.0 and st["scale_jitter"] == 0.0 and st["num_tracks"] == 2


def test_jittering_box_has_positive_centre_jitter_by_hand() -> None:
    # gt 100x100 fixed; det shifted by +5, -5, +5, -5 px in x: dx/w = +-0.05, std 0.05; dy = 0.
    ev = VidEvaluator(num_classes=1)
    for t in range(4):
        s = 5 if t % 2 == 0 else -5
        _frame(ev, "v", t, [[0, 0, 99, 99]], [1], [0], [[s, 0, 99 + s, 99]], [0.9], [1])
    st = ev.compute()["stability"]
    assert st["center_jitter"] == pytest.approx(0.05)
    assert st["scale_jitter"] == pytest.approx(0.0) and st["fragment_error"] == 0.0
    assert st["stability_error"] == pytest.approx(0.05)


def test_breathing_box_has_scale_jitter_by_hand() -> None:
    # gt 100x100 centred at 59.5; det alternates the gt and a 120x120 box on the same centre:
    # sqrt(area ratio) 1, 1.2, 1, 1.2 -> std 0.1; aspect ratio ratio always 1; centre offset 0.
    ev = VidEvaluator(num_classes=1)
    for t in range(4):
        det = [10, 10, 109, 109] if t % 2 == 0 else [0, 0, 119, 119]
        _frame(ev, "v", t, [[10, 10, 109, 109]], [1], [0], [det], [0.9], [1])
    st = ev.compute()["stability"]
    assert st["scale_jitter"] == pytest.approx(0.1) and st["center_jitter"] == pytest.approx(0.0)


def test_stability_score_threshold_drops_weak_detections() -> None:
    # the weak (0.2) detections of frames 1 and 3 count for the APs but not above a 0.5 threshold
    ev = VidEvaluator(num_classes=1, stability_score_threshold=0.5)
    for t in range(5):
        _frame(ev, "v", t, [[0, 0, 39, 39]], [1], [0], [[0, 0, 39, 39]], [0.9 if t % 2 == 0 else 0.2], [1])
    out = ev.compute()
    assert out["vid_map50"] == pytest.approx(1.0)
    assert out["stability"]["fragment_error"] == pytest.approx(1.0)


def test_coco_keeps_only_the_top_max_dets_per_frame_and_class() -> None:
    # two gts, two perfect dets; with coco_max_dets=1 only the 0.9 det counts for COCO: recall
    # reaches 0.5 -> 51/101 (pycocotools maxDets), while the devkit keeps every det -> 1.0.
    ev = VidEvaluator(num_classes=1, coco_max_dets=1)
    boxes = [[0, 0, 49, 49], [100, 0, 149, 49]]
    _frame(ev, "v", 0, boxes, [1, 1], [0, 1], boxes, [0.9, 0.8], [1, 1])
    out = ev.compute()
    assert out["vid_map50"] == pytest.approx(1.0)
    assert out["coco_ap50"] == pytest.approx(51 / 101)
