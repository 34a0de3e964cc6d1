"""Clip-consistent SSD augmentation, model input conversion and the paper's occlusion corruption.

A training clip samples ONE `ClipAug` (SSD random crop, horizontal flip, optional photometric
jitter) and applies it to every frame (lstm_ssd_reproduction.md Sec. 4). Evaluation only resizes
(`to_model_input`), optionally after `occlude` (paper Sec. 4.4, Table 6) with a per-frame seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from datamodules.data_config import AugmentConfig
from datamodules.vid import pixel_to_normalized


@dataclass(frozen=True)
class ClipAug:
    """One sampled augmentation, shared by all frames of a clip."""

    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # fractions of W, H (xyxy)
    flip: bool = False
    brightness: float = 0.0  # added, [0, 1] units
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # fraction of a turn


def _covered(crop: tuple[float, float, float, float], boxes: list[tuple[float, ...]], min_covered: float) -> bool:
    """Whether any box (normalized xyxy) has at least `min_covered` of its area inside the crop (TF
    min_object_covered test). Python floats: the same float64 arithmetic as numpy, without its per-call cost
    on one to three boxes (this test runs ~10 times a clip)."""
    for xmin, ymin, xmax, ymax in boxes:
        inside_w = max(min(crop[2], xmax) - max(crop[0], xmin), 0.0)
        inside_h = max(min(crop[3], ymax) - max(crop[1], ymin), 0.0)
        if inside_w * inside_h / max((xmax - xmin) * (ymax - ymin), 1e-12) >= min_covered:
            return True
    return False


def _sample_crop(rng: np.random.Generator, width: int, height: int, boxes_px: np.ndarray,
                 cfg: AugmentConfig) -> tuple[float, float, float, float]:
    """SSD random crop (TF ssd_random_crop): crop fractions; (0, 0, 1, 1) = no crop."""
    full = (0.0, 0.0, 1.0, 1.0)
    if rng.random() < cfg.no_crop_prob:
        return full
    min_covered = float(rng.choice(np.asarray(cfg.min_object_covered, np.float64)))
    normalized = pixel_to_normalized(np.asarray(boxes_px, np.float64).reshape(-1, 4), width, height)
    boxes = [tuple(float(v) for v in box) for box in normalized] or [full]  # no box: the whole image (TF)
    for _ in range(cfg.max_attempts):
        area = rng.uniform(cfg.area_min, cfg.area_max) * width * height
        ratio = rng.uniform(cfg.aspect_ratio_min, cfg.aspect_ratio_max)
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if not (1 <= w <= width and 1 <= h <= height):
            continue
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)
        if _covered(crop, boxes, min_covered):
            return crop
    return full


def sample_clip_augmentation(rng: np.random.Generator, width: int, height: int,
                             cfg: AugmentConfig, boxes_px: np.ndarray | None = None) -> ClipAug:
    """Sample one crop (constrained by the first frame's pixel boxes), flip and jitter."""
    if not cfg.enabled:
        return ClipAug()
    boxes = np.zeros((0, 4)) if boxes_px is None else boxes_px
    crop = _sample_crop(rng, width, height, boxes, cfg)
    flip = bool(rng.random() < cfg.flip_prob)
    if not cfg.photometric:
        return ClipAug(crop=crop, flip=flip)
    return ClipAug(
        crop=crop, flip=flip,
        brightness=float(rng.uniform(-cfg.brightness_max_delta, cfg.brightness_max_delta)),
        contrast=float(rng.uniform(cfg.contrast_min, cfg.contrast_max)),
        saturation=float(rng.uniform(cfg.saturation_min, cfg.saturation_max)),
        hue=float(rng.uniform(-cfg.hue_max_delta, cfg.hue_max_delta)))


def _photometric(x: np.ndarray, aug: ClipAug) -> np.ndarray:
    """Brightness, contrast, saturation, hue (TF random_adjust_*), each clipped to [0, 1]."""
    if aug.brightness:
        x = np.clip(x + aug.brightness, 0.0, 1.0)
    if aug.contrast != 1.0:
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = np.clip((x - mean) * aug.contrast + mean, 0.0, 1.0)
    if aug.saturation != 1.0:
        gray = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
        x = np.clip((x - gray[..., None]) * aug.saturation + gray[..., None], 0.0, 1.0)
    if aug.hue:  # rotate chroma in YIQ space by hue * 360 degrees
        to_yiq = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                             [0.211, -0.523, 0.312]], np.float32)
        c, s = math.cos(2 * math.pi * aug.hue), math.sin(2 * math.pi * aug.hue)
        rot = np.asarray([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
        m = np.linalg.inv(to_yiq) @ rot @ to_yiq
        x = np.clip(x @ m.T.astype(np.float32), 0.0, 1.0)
    return x


def _to_tensor(image: Image.Image, out_size: int, aug: ClipAug | None = None) -> torch.Tensor:
    """Resize to out_size x out_size (bilinear, no aspect preservation) -> [3,S,S] 2*x/255-1."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    x = np.asarray(rgb.resize((out_size, out_size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    if aug is not None:
        x = _photometric(x, aug)
    x *= 2.0  # in place: the same float32 operations as x * 2.0 - 1.0, without two more arrays
    x -= 1.0
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def to_model_input(image: Image.Image, out_size: int) -> torch.Tensor:
    """Evaluation input: resize only, float [3, S, S] in [-1, 1]."""
    return _to_tensor(image, out_size)


def apply_clip_augmentation(
    image: Image.Image, boxes_px: np.ndarray, labels: np.ndarray, aug: ClipAug, out_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply a clip's crop/flip/jitter to one frame and its pixel boxes.

    Returns (image [3,S,S] in [-1,1], normalized xyxy boxes [n,4] float32 clipped to the crop,
    labels [n] int64, keep mask over the input boxes): a box is kept iff its centre is in the crop.
    """
    width, height = image.size
    x0, y0 = round(aug.crop[0] * width), round(aug.crop[1] * height)
    x1 = max(x0 + 1, min(width, round(aug.crop[2] * width)))
    y1 = max(y0 + 1, min(height, round(aug.crop[3] * height)))
    if (x0, y0, x1, y1) != (0, 0, width, height):
        image = image.crop((x0, y0, x1, y1))
    boxes = pixel_to_normalized(np.asarray(boxes_px, np.float64).reshape(-1, 4), width, height)
    c0 = np.asarray([x0 / width, y0 / height])
    c1 = np.asarray([x1 / width, y1 / height])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    keep = np.all((centre >= c0) & (centre < c1), axis=1)
    span = np.concatenate([c1 - c0, c1 - c0])
    boxes = np.clip((boxes[keep] - np.concatenate([c0, c0])) / span, 0.0, 1.0)
    if aug.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
    tensor = _to_tensor(image, out_size, aug)
    return (tensor, torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),
            torch.from_numpy(np.asarray(labels, np.int64)[keep]), torch.from_numpy(keep))


def frame_rng(seed: int, video: str, frame_index: int) -> np.random.Generator:
    """Generator derived from (seed, video, frame index) only: order- and batching-independent."""
    digest = hashlib.sha256(f"{seed}/{video}/{frame_index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def occlude(image: np.ndarray, boxes_px: np.ndarray, p: float,
            rng: np.random.Generator) -> np.ndarray:
    """Paper Sec. 4.4 occlusion: per gt box with prob p, zero a random rectangle inside it.

    The rectangle is between h/2 x w/2 and 3h/4 x 3w/4 of the box (h, w = box size in pixels,
    inclusive coordinates). Returns a copy; p = 0 returns the image unchanged.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"occlude expects an HxWx3 image, got shape {image.shape}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"occlusion probability must be in [0, 1], got {p}")
    out = image.copy()
    if p == 0.0:
        return out
    height, width = image.shape[:2]
    for xmin, ymin, xmax, ymax in np.asarray(boxes_px).reshape(-1, 4):
        if rng.random() >= p:
            continue
        xmin, ymin = max(int(xmin), 0), max(int(ymin), 0)
        xmax, ymax = min(int(xmax), width - 1), min(int(ymax), height - 1)
        bw, bh = xmax - xmin + 1, ymax - ymin + 1
        if bw <= 0 or bh <= 0:
            continue
        rw = int(rng.integers(math.ceil(bw / 2), max(math.ceil(bw / 2), (3 * bw) // 4) + 1))
        rh = int(rng.integers(math.ceil(bh / 2), max(math.ceil(bh / 2), (3 * bh) // 4) + 1))
        rx = int(rng.integers(xmin, xmax - rw + 2))
        ry = int(rng.integers(ymin, ymax - rh + 2))
        out[ry:ry + rh, rx:rx + rw] = 0
    return out


def occlude_frame(image: np.ndarray, boxes_px: np.ndarray, p: float, seed: int, video: str,
                  frame_index: int) -> np.ndarray:
    """Deterministic evaluation occlusion of one frame (same result for every model and run)."""
    return occlude(image, boxes_px, p, frame_rng(seed, video, frame_index))
