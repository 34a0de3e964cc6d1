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

    python benchmarks/probe_cue.py runs/quick/stages/.../last.ckpt ... [--data-root DIR] [--videos N] [--split train|val]

Reads the ground truth from the generator (the dataset's manifest), the images from disk.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.metrics import devkit_iou  # noqa: E402
from datamodules.synthetic import ensure_synthetic, render_video, snippet_name  # noqa: E402
from datamodules.synthetic_cap import _ID_BY_NAME, partner, synth_config_of  # noqa: E402
from datamodules.vid import read_vid  # noqa: E402
from lightning_modules.detect import detect_frames, load_detector, model_title  # noqa: E402

KINDS = ("cue", "seen", "unseen")
TOP1 = ("top-1 class", "top-1 pair")


def cue_column(classes: tuple[str, ...], position: int) -> str:
    """The cue-frame column of the pair of the class at `position`: "cue bus/car" (the pair's names sorted)."""
    return "cue " + "/".join(sorted(classes[i] for i in (position, partner(position, len(classes)))))


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
                ids = (_ID_BY_NAME[cfg.classes[obj.class_index]], _ID_BY_NAME[cfg.classes[other]])
                best = [0.0, 0.0]
                if hit.any():
                    for j, cid in enumerate(ids):
                        scores = shot.scores[hit & (shot.labels == cid)]
                        best[j] = float(scores.max()) if len(scores) else 0.0
                # each kind, and on cue frames each pair too ("cue car/bus"): a stage 1 learns a pair's marker or not
                for key in [kind] + ([cue_column(cfg.classes, obj.class_index)] if kind == "cue" else []):
                    tally = counts.setdefault(key, [0, 0, 0])
                    tally[0] += 1
                    if max(best) > 0:
                        tally[1] += 1
                        tally[2] += int(best[0] > best[1])
            seen.update(o.track for o in objects if o.cue_visible)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="training checkpoints (.ckpt)")
    parser.add_argument("--data-root", default=None, help="synthetic dataset folder (default: the built-in benchmark)")
    parser.add_argument("--videos", type=int, default=32, help="videos to probe (default 32)")
    parser.add_argument("--split", default="val", choices=("train", "val"),
                        help="val (default), or train: the videos the checkpoints fitted (memorised or learnt?)")
    args = parser.parse_args(argv)
    root = Path(args.data_root) if args.data_root else ensure_synthetic(progress=False)
    cfg = synth_config_of(root)
    pairs = [cue_column(cfg.classes, i) for i in range(0, len(cfg.classes) - 1, 2)] if cfg else []
    columns = KINDS + TOP1 + tuple(pairs)
    print("| checkpoint | model | " + " | ".join(f"{k}: right / found" for k in columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for ckpt in args.checkpoints:
        detector = load_detector(ckpt)
        counts = probe(detector, root, args.videos, args.split)
        cells = [f"{r / f:.2f} / {f / n:.2f} (n={n})" if f else f"- / 0.00 (n={n})" for n, f, r in
                 (counts.get(k, [0, 0, 0]) for k in columns)]
        print(f"| {ckpt} | {model_title(detector[1])} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
