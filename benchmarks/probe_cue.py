"""Cue probe: does a trained detector tell the members of a look-alike pair apart, and when?

The synthetic benchmark hides which member of a pair (horse/zebra, car/bus, bear/giant_panda) an
object is, except on the frames where its class marker is drawn (`cue_visible`). A recurrent model
can only beat the single-frame cap if its base names the right member on those cue frames, and it
only carries context if it stays right on the frames after. For every annotated object of a paired
class in the val videos (each streamed from its first frame, state carried), the probe looks at the
detections of the pair's two classes at IoU >= 0.5 and asks whether the true member outscores its
look-alike. Objects are split by kind of frame: `cue` (marker drawn), `seen` (no marker now, but
this track showed it earlier in the video) and `unseen` (no marker yet). `found` is the share of
objects with a detection of either member; accuracy is over found objects (chance 0.5). Two more
columns over every annotated object: `top-1 class` and `top-1 pair`, whether the highest-scoring
detection at IoU >= 0.5 (any class) names the object's class, or a member of its pair.
The last columns split the cue frames by pair (`cue bus/car`, ...): a stage 1 learns one pair's marker
and not another's (README "Stage 1's learning rate, its data, and what a weak stage 1 lacks").

A second table splits a checkpoint's mAP into finding the pair and naming the member, on exactly the frames
and streams the report scores (each val video's minival window, state reset at its start; `--minival-frames`
/ `--minival-seed` for a run scored with other windows, 0 frames for every frame): `mAP` (the
report's figure), `pair-merged mAP` (each pair scored as one class: a member's detection counts for either,
the pair's detections suppressed as one class's, at the checkpoint's NMS IoU) and `pair score` (per annotated
object, the best score of each member at IoU >= 0.5, summed: how confidently the pair is found), on objects
with their marker drawn and on those without, and `marked right > unmarked guess`: the chance that a marked
object's right member scores above an unmarked object's best member (ties half), the rank a single frame
needs for its right names to come before its guesses (1 for the single-frame cap's oracle, 0.5 for a model
no surer on a marked object than on an unmarked one; README "Where the control's points go").

    python benchmarks/probe_cue.py runs/quick/stages/.../last.ckpt ... [--data-root DIR] [--videos N] [--split train|val]
        [--minival-frames N (0: every frame)] [--minival-seed S]   # the second table's windows, as the run scored

Reads the ground truth from the generator (the dataset's manifest), the images from disk.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.data_config import DataConfig  # noqa: E402
from datamodules.metrics import VidEvaluator, devkit_iou  # noqa: E402
from datamodules.synthetic import ensure_synthetic, render_video, snippet_name  # noqa: E402
from datamodules.synthetic_cap import _ID_BY_NAME, ground_truth, partner, synth_config_of, val_windows  # noqa: E402
from datamodules.vid import CLASS_NAMES, read_vid  # noqa: E402
from lightning_modules.detect import detect_frames, load_detector, model_title  # noqa: E402
from lightning_modules.postprocess import batched_nms  # noqa: E402

KINDS = ("cue", "seen", "unseen")
TOP1 = ("top-1 class", "top-1 pair")


def cue_column(classes: tuple[str, ...], position: int) -> str:
    """The cue-frame column of the pair of the class at `position`: "cue bus/car" (the pair's names sorted)."""
    return "cue " + "/".join(sorted(classes[i] for i in (position, partner(position, len(classes)))))


def member_scores(shot, hit: np.ndarray, classes: tuple[str, ...], position: int) -> list[float]:
    """The best score among the detections `hit` (a mask over `shot`'s) of the class at `position` and of its
    look-alike, in that order; 0 where there is none."""
    ids = [_ID_BY_NAME[classes[p]] for p in (position, partner(position, len(classes)))]
    return [float(shot.scores[hit & (shot.labels == cid)].max(initial=0.0)) for cid in ids]


def probe(detector, root: Path, videos: int, split: str = "val") -> dict:
    """{kind: [objects, found, right]} of a `load_detector` detector over the first `videos` videos of the
    synthetic root's `split` ("val", or "train": the videos the model fitted, to tell memorising from
    generalising); for TOP1 the counts are [objects, found at IoU >= 0.5, top detection right]; "cue PAIR" (e.g.
    "cue bus/car") counts the cue frames of that pair's objects alone."""
    cfg = synth_config_of(root)
    if cfg is None:
        raise SystemExit(f"{root}: not a synthetic dataset (no manifest); the probe needs the generator's cue flags")
    by_name = {v.name: v for v in read_vid(root, split, progress=False, memo=True)[0]}
    counts = {kind: [0, 0, 0] for kind in KINDS + TOP1}
    for index in range(min(videos, cfg.val_videos if split == "val" else cfg.videos)):
        name = snippet_name(split, index).rpartition("/")[2]
        video = by_name[name]
        truth = [[o for o in objects if o.annotated] for _, objects in render_video(cfg, split, index)]
        shots = detect_frames(detector, video, video.frames)
        seen: set[int] = set()
        for shot, objects in zip(shots, truth):
            for obj in objects:
                other = partner(obj.class_index, len(cfg.classes))
                hit = devkit_iou(np.asarray(obj.box), shot.boxes) >= 0.5
                top = int(shot.labels[np.flatnonzero(hit)[np.argmax(shot.scores[hit])]]) if hit.any() else None
                pair = {_ID_BY_NAME[cfg.classes[p]] for p in (obj.class_index, other) if p is not None}
                for key, right in zip(TOP1, (top == _ID_BY_NAME[cfg.classes[obj.class_index]], top in pair)):
                    counts[key][0] += 1
                    counts[key][1] += int(top is not None)
                    counts[key][2] += int(top is not None and right)
                if other is None:
                    continue
                kind = "cue" if obj.cue_visible else ("seen" if obj.track in seen else "unseen")
                best = member_scores(shot, hit, cfg.classes, obj.class_index)
                # each kind, and on cue frames each pair too ("cue car/bus"): a stage 1 learns a pair's marker or not
                for key in [kind] + ([cue_column(cfg.classes, obj.class_index)] if kind == "cue" else []):
                    tally = counts.setdefault(key, [0, 0, 0])
                    tally[0] += 1
                    if max(best) > 0:
                        tally[1] += 1
                        tally[2] += int(best[0] > best[1])
            seen.update(o.track for o in objects if o.cue_visible)
    return counts


def pair_ids(classes: tuple[str, ...]) -> dict[int, int]:
    """Class id -> the id of its pair's first member (an unpaired class maps to itself)."""
    return {_ID_BY_NAME[name]: _ID_BY_NAME[classes[i - i % 2 if partner(i, len(classes)) is not None else i]]
            for i, name in enumerate(classes)}


def merge_pairs(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, ids: dict[int, int],
                iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame's detections with each pair as one class: labels mapped by `ids`, then the pair's detections
    suppressed as a single class's would be (greedy NMS at `iou`), so an object found as both members counts once."""
    merged = np.asarray([ids.get(int(label), int(label)) for label in labels], np.int64)
    if not len(merged):
        return boxes, scores, merged
    keep = batched_nms(torch.as_tensor(boxes, dtype=torch.float64), torch.as_tensor(scores, dtype=torch.float64),
                       torch.as_tensor(merged), iou).numpy()
    return boxes[keep], scores[keep], merged[keep]


def window_scores(detector, root: Path, videos: int, minival_frames: int | None = DataConfig.minival_frames,
                  minival_seed: int = DataConfig.minival_seed) -> dict:
    """mAP, pair-merged mAP (fractions) and the mean pair score of annotated paired objects with and without their
    marker drawn, over the first `videos` val videos' minival windows (`minival_frames=None`: every frame, the
    `full` protocol), each streamed from its first frame as the evaluation streams it."""
    cfg = synth_config_of(root)
    by_name = {v.name: v for v in read_vid(root, "val", progress=False, memo=True)[0]}
    ids, nms_iou = pair_ids(cfg.classes), detector[2].nms_iou
    plain, merged = (VidEvaluator(CLASS_NAMES, len(CLASS_NAMES)) for _ in range(2))
    members: dict[str, list[list[float]]] = {"cue": [], "no cue": []}  # [right, look-alike] per paired object
    for name, window in val_windows(cfg, minival_frames, minival_seed, videos):
        video, start = by_name[name], window[0][0]
        shots = detect_frames(detector, video, video.frames[start:start + len(window)])
        for shot, (_, objects) in zip(shots, window):
            gt_boxes, gt_labels, tracks = ground_truth(objects, cfg.classes)
            plain.update(name, shot.frame_index, gt_boxes, gt_labels, tracks, shot.boxes, shot.scores, shot.labels)
            merged.update(name, shot.frame_index, gt_boxes, np.asarray([ids[int(c)] for c in gt_labels], np.int64),
                          tracks, *merge_pairs(shot.boxes, shot.scores, shot.labels, ids, nms_iou))
            for obj in objects:
                if partner(obj.class_index, len(cfg.classes)) is not None:
                    hit = devkit_iou(np.asarray(obj.box), shot.boxes) >= 0.5
                    members["cue" if obj.cue_visible else "no cue"].append(
                        member_scores(shot, hit, cfg.classes, obj.class_index))
    return {"mAP": plain.compute()["vid_map50"], "pair-merged mAP": merged.compute()["vid_map50"],
            **{f"pair score, {kind}": float(np.sum(v, axis=1).mean()) if v else float("nan")
               for kind, v in members.items()},
            "marked right > unmarked guess": right_above_guess(members["cue"], members["no cue"])}


def right_above_guess(marked: list[list[float]], unmarked: list[list[float]]) -> float:
    """P(a marked object's right-member score > an unmarked object's best member score), ties counted half, over
    every such pair of objects (per object [right, look-alike] scores); nan without both kinds."""
    if not marked or not unmarked:
        return float("nan")
    right = np.sort(np.asarray(marked, np.float64)[:, 0])
    guess = np.sort(np.asarray(unmarked, np.float64).max(axis=1))
    below = np.searchsorted(guess, right, side="left")  # guesses strictly under each right score
    ties = np.searchsorted(guess, right, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(right) * len(guess)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="training checkpoints (.ckpt)")
    parser.add_argument("--data-root", default=None, help="synthetic dataset folder (default: the built-in benchmark)")
    parser.add_argument("--videos", type=int, default=32, help="videos to probe (default 32)")
    parser.add_argument("--split", default="val", choices=("train", "val"),
                        help="val (default), or train: the videos the checkpoints fitted (memorised or learnt?)")
    parser.add_argument("--minival-frames", type=int, default=DataConfig.minival_frames,
                        help="second table: the frames of each val video's window, as the checkpoints were scored "
                             f"(data.minival_frames, default {DataConfig.minival_frames}); 0: every frame, as "
                             "data.eval_protocol=full scores")
    parser.add_argument("--minival-seed", type=int, default=DataConfig.minival_seed,
                        help=f"second table: which window (data.minival_seed, default {DataConfig.minival_seed})")
    args = parser.parse_args(argv)
    if args.minival_frames < 0 or args.minival_seed < 0:
        parser.error("--minival-frames and --minival-seed must be >= 0")
    root = Path(args.data_root) if args.data_root else ensure_synthetic(progress=False)
    cfg = synth_config_of(root)
    pairs = [cue_column(cfg.classes, i) for i in range(0, len(cfg.classes) - 1, 2)] if cfg else []
    columns = KINDS + TOP1 + tuple(pairs)
    print("| checkpoint | model | " + " | ".join(f"{k}: right / found" for k in columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    detectors = [load_detector(ckpt) for ckpt in args.checkpoints]
    for ckpt, detector in zip(args.checkpoints, detectors):
        counts = probe(detector, root, args.videos, args.split)
        cells = [f"{r / f:.2f} / {f / n:.2f} (n={n})" if f else f"- / 0.00 (n={n})" for n, f, r in
                 (counts.get(k, [0, 0, 0]) for k in columns)]
        print(f"| {ckpt} | {model_title(detector[1])} | " + " | ".join(cells) + " |", flush=True)
    if args.split != "val" or cfg is None:
        return 0
    print()
    for index, (ckpt, detector) in enumerate(zip(args.checkpoints, detectors)):
        scores = window_scores(detector, root, args.videos, args.minival_frames or None, args.minival_seed)
        if index == 0:
            print("| checkpoint | model | " + " | ".join(scores) + " |")
            print("| --- | --- | " + " | ".join("---" for _ in scores) + " |")
        cells = [f"{100 * v:.1f}" if "mAP" in k else f"{v:.3f}" if "pair score" in k else f"{v:.2f}"
                 for k, v in scores.items()]
        print(f"| {ckpt} | {model_title(detector[1])} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
