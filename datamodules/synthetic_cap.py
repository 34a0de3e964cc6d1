"""The single-frame cap of the synthetic benchmark: the best VID mAP a detector that sees one frame
at a time can expect, measured with an oracle on the generator's own ground truth.

The oracle localises every annotated object perfectly. On a frame where the object's class marker
is drawn (`cue_visible`) it names the class with score 1; elsewhere the two members of a look-alike
pair are pixel-identical (see SYNTH_MECHANISM), so the best a single frame allows is both classes
at the same confidence: one detection per pair member, each scored 0.5 plus a seeded jitter of
+-0.005 that orders the tied detections at random. mAP is then scored on exactly the minival frames
the trained models are scored on, by the same `VidEvaluator`, and averaged over a few jitter seeds.
A temporal detector that carries the class from a cue frame is not held by this cap.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from datamodules.clips import minival_window
from datamodules.metrics import VidEvaluator
from datamodules.synthetic import MANIFEST, SynthConfig, render_video, snippet_name
from datamodules.synthetic_render import ObjectFrame
from datamodules.vid import CLASS_NAMES, VID_CLASSES

_ID_BY_NAME = {name: cid for cid, name, _ in VID_CLASSES}


@dataclass(frozen=True)
class SingleFrameCap:
    """Oracle mAP (fraction) over jitter seeds, and the share of evaluated boxes with the cue hidden."""

    vid_map50: float
    vid_map50_std: float
    cue_hidden_share: float
    boxes: int


def partner(position: int, n_classes: int) -> Optional[int]:
    """The look-alike of the class at `position` (pairs are positions 2p, 2p+1), or None if unpaired."""
    other = position ^ 1
    return other if other < n_classes else None


def oracle_frame(objects: list[ObjectFrame], classes: tuple[str, ...], rng: np.random.Generator):
    """(boxes [N,4], scores [N], labels [N]) of the single-frame oracle for one frame's annotated objects."""
    boxes, scores, labels = [], [], []
    for obj in objects:
        other = partner(obj.class_index, len(classes))
        if obj.cue_visible or other is None:
            boxes.append(obj.box), scores.append(1.0), labels.append(_ID_BY_NAME[classes[obj.class_index]])
            continue
        for position in (obj.class_index, other):
            boxes.append(obj.box), scores.append(0.5 + 0.01 * (rng.random() - 0.5))
            labels.append(_ID_BY_NAME[classes[position]])
    return (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64),
            np.asarray(labels, np.int64))


def ground_truth(objects: list[ObjectFrame], classes: tuple[str, ...]):
    """(boxes [N,4], class ids [N], track ids [N]) of one frame's annotated objects, as `VidEvaluator.update` takes them."""
    return (np.asarray([o.box for o in objects], np.float64).reshape(-1, 4),
            np.asarray([_ID_BY_NAME[classes[o.class_index]] for o in objects], np.int64),
            np.asarray([o.track for o in objects], np.int64))


def val_windows(cfg: SynthConfig, minival_frames: Optional[int], data_seed: int, max_val_videos: Optional[int]):
    """Per val video: (name, [(frame index, annotated objects)]) over the evaluated window."""
    count = cfg.val_videos if max_val_videos is None else min(cfg.val_videos, max_val_videos)
    for index in range(count):
        name = snippet_name("val", index).rpartition("/")[2]
        frames = [[o for o in objects if o.annotated] for _, objects in render_video(cfg, "val", index)]
        start, length = (0, len(frames)) if minival_frames is None else \
            minival_window(name, len(frames), minival_frames, data_seed)
        yield name, [(t, frames[t]) for t in range(start, start + length)]


def single_frame_cap(cfg: SynthConfig, minival_frames: Optional[int] = 20, data_seed: int = 0,
                     max_val_videos: Optional[int] = None, jitter_seeds: int = 5) -> SingleFrameCap:
    """The cap on the val frames a trained model is scored on: the minival windows of `data_seed`
    (`minival_frames=None`: every frame, the `full` protocol), the first `max_val_videos` videos."""
    videos = list(val_windows(cfg, minival_frames, data_seed, max_val_videos))
    maps = []
    for seed in range(jitter_seeds):
        rng = np.random.default_rng(seed)
        evaluator = VidEvaluator(class_names=CLASS_NAMES, num_classes=len(CLASS_NAMES))
        for name, frames in videos:
            for t, objects in frames:
                evaluator.update(name, t, *ground_truth(objects, cfg.classes), *oracle_frame(objects, cfg.classes, rng))
        maps.append(evaluator.compute()["vid_map50"])
    objects = [o for _, frames in videos for _, objs in frames for o in objs]
    hidden = sum(not o.cue_visible and partner(o.class_index, len(cfg.classes)) is not None for o in objects)
    return SingleFrameCap(float(np.mean(maps)), float(np.std(maps)), hidden / max(1, len(objects)), len(objects))


def synth_config_of(root: Path | str) -> Optional[SynthConfig]:
    """The SynthConfig a synthetic dataset folder was generated with (its manifest), None for real VID."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    return SynthConfig(**json.loads(path.read_text(encoding="utf-8"))["config"])


@functools.lru_cache(maxsize=16)
def cap_of_root(root: str, minival_frames: Optional[int], data_seed: int,
                max_val_videos: Optional[int]) -> Optional[SingleFrameCap]:
    """`single_frame_cap` of the synthetic dataset at `root` (None for a real VID root), once per process."""
    cfg = synth_config_of(root)
    return None if cfg is None else single_frame_cap(cfg, minival_frames, data_seed, max_val_videos)
