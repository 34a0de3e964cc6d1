"""What a trained checkpoint detects on consecutive val frames, for pictures (paper Figure 5).

The network streams over the frames with its recurrent state carried from frame to frame, as the
online evaluation does (`LSTMSSDModule.validation_step`), with the weights it is evaluated with (EMA
when the checkpoint has them). Frames may be occluded exactly as the evaluation occludes them.

    >>> video, frames = val_frames(root, video="ILSVRC2015_val_00000000", count=8)
    >>> shots = detect_frames(load_detector("runs/_stages/<hash>/checkpoints/last.ckpt"), video, frames)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from datamodules.clips import DecodeCounters, load_frame
from datamodules.transforms import occlude_frame, to_model_input
from datamodules.vid import CLASS_NAMES, FrameAnno, Video, normalized_to_pixel, read_vid
from lightning_modules.anchors import BoxCoder
from lightning_modules.config import ModelConfig, as_config
from lightning_modules.postprocess import postprocess
from lightning_modules.stages import read_net_state
from lightning_modules.train_config import TrainConfig


@dataclass
class Shot:
    """One frame as a model saw it: the (occluded) image, its ground truth and the model's detections,
    boxes in inclusive pixel xyxy; labels are class ids 1..C, `names[label - 1]` their names."""

    video: str
    frame_index: int
    image: Image.Image
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: Tuple[str, ...]


def val_frames(root: Path | str, video: Optional[str] = None, count: int = 8, start: int = 0,
               split: str = "val") -> Tuple[Video, List[FrameAnno]]:
    """`count` consecutive frames of one val video from `start`: `video` by name, by its index in name
    order, or the first one."""
    videos, _ = read_vid(root, split, progress=False, memo=True)
    if not videos:
        raise ValueError(f"{root}: no {split} videos")
    chosen = _pick(videos, video, root, split)
    if not 0 <= start < len(chosen.frames):
        raise ValueError(f"video {chosen.name} has {len(chosen.frames)} frames; --start {start} is outside it")
    return chosen, list(chosen.frames[start:start + count])


def _pick(videos: Sequence[Video], video: Optional[str], root, split: str) -> Video:
    if video is None:
        return videos[0]
    by_name = {v.name: v for v in videos}
    if video in by_name:
        return by_name[video]
    if video.isdigit() and int(video) < len(videos):
        return videos[int(video)]
    raise ValueError(f"--video {video!r}: not a {split} video of {root}; valid: a name such as {videos[0].name}, "
                     f"or an index 0..{len(videos) - 1}")


def load_detector(checkpoint: Path | str) -> Tuple[torch.nn.Module, ModelConfig, TrainConfig]:
    """The network of a training checkpoint (eval mode, the weights it is evaluated with), its model
    config and the training config whose postprocessing settings it is scored with."""
    from lightning_modules.deploy.export import load_checkpoint

    net, cfg = load_checkpoint(checkpoint)
    net.load_state_dict(read_net_state(checkpoint, use_ema=None))
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False).get("hyper_parameters") or {}
    train = as_config(TrainConfig, hparams["train"]) if "train" in hparams else TrainConfig()
    return net.eval(), cfg, train


def model_title(cfg: ModelConfig) -> str:
    """A column title: `single-frame SSD` or `<type> after <layers>`."""
    if cfg.recurrent.type.value == "none":
        return "single-frame SSD"
    return f"{cfg.recurrent.type.value} after {'+'.join(cfg.recurrent.after)}"


@torch.no_grad()
def detect_frames(detector: Tuple[torch.nn.Module, ModelConfig, TrainConfig], video: Video,
                  frames: Sequence[FrameAnno], occlusion: float = 0.0, occlusion_seed: int = 0) -> List[Shot]:
    """A detector's (`load_detector`) detections on `frames` (consecutive, of `video`), state carried
    across them; with `occlusion` > 0 the frames are occluded as the evaluation occludes them."""
    net, cfg, train = detector
    counters = DecodeCounters()
    images, inputs = [], []
    for frame in frames:
        image = load_frame(frame, counters, strict=True)
        if occlusion > 0:
            image = Image.fromarray(occlude_frame(np.asarray(image), frame.boxes, occlusion, occlusion_seed,
                                                  video.name, frame.frame_index))
        images.append(image)
        inputs.append(to_model_input(image, cfg.input_size))
    clip = torch.stack(inputs).unsqueeze(1)  # [T, B = 1, 3, S, S]
    reset = torch.zeros(len(frames), 1, dtype=torch.bool)
    reset[0] = True
    box_regression, class_logits, _ = net(clip, None, reset)
    detections = postprocess(box_regression.flatten(0, 1), class_logits.flatten(0, 1), net.anchors(), BoxCoder(),
                             train.score_threshold, train.nms_iou, train.max_per_class, train.max_total)
    names = CLASS_NAMES if cfg.num_classes == len(CLASS_NAMES) else tuple(f"class {k}" for k in range(1, cfg.num_classes + 1))
    return [Shot(video.name, frame.frame_index, image, frame.boxes, frame.labels,
                 normalized_to_pixel(det["boxes"].float(), frame.width, frame.height).numpy(),
                 det["scores"].float().numpy(), det["labels"].numpy(), names)
            for frame, image, det in zip(frames, images, detections)]
