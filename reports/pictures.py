"""Pictures of what detectors see (paper Figure 5): ground truth and detections drawn on consecutive
frames, one column per model, so a single-frame and a recurrent model compare on the same frames.

Drawing and encoding only (PIL; `.mp4` through imageio when installed): the frames and detections
come in as `Shot`s (`lightning_modules.detect` makes them from checkpoints).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FORMATS = (".png", ".gif", ".mp4")
GROUND_TRUTH = (255, 255, 255)
# one colour per class id (mod 10), far from white and from each other
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
HEADER = 22  # pixels above the columns for their titles
GIF_FRAME_MS = 300
MAX_BOXES = 20  # detections drawn per frame at most, the best first


# One frame as a model saw it: `lightning_modules.detect.Shot` (frame_index, image, gt_boxes, gt_labels,
# boxes, scores, labels, names; boxes in inclusive pixel xyxy, labels class ids 1..C). Reports draw it
# by its fields and never import the code that makes it.
Shot = Any


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _name(shot: Shot, label: int) -> str:
    return shot.names[label - 1] if 1 <= label <= len(shot.names) else f"class {label}"


def _corners(box: Any, scale: int) -> Tuple[float, float, float, float]:
    """A box's inclusive pixel corners scaled, ordered: a box under a pixel wide (one clipped at the frame's
    border, say) comes out of the inclusive conversion with x1 = x0 - 1, which PIL refuses to draw."""
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def draw_shot(shot: Shot, min_score: float = 0.3, scale: int = 3) -> Image.Image:
    """The frame enlarged `scale` times, ground truth in thin white (its class below the box) and the
    detections scoring >= min_score (MAX_BOXES at most) in their class colour, labelled `class score`."""
    image = shot.image.convert("RGB").resize((shot.image.width * scale, shot.image.height * scale), Image.BILINEAR)
    draw, font = ImageDraw.Draw(image), _font(10 + scale)
    for box, label in zip(shot.gt_boxes, shot.gt_labels):
        x0, y0, x1, y1 = _corners(box, scale)
        draw.rectangle((x0, y0, x1, y1), outline=GROUND_TRUTH, width=1)
        draw.text((x0 + 2, y1 - 12 - scale), _name(shot, int(label)), fill=GROUND_TRUTH, font=font)
    keep = shot.scores >= min_score
    best = sorted(zip(shot.boxes[keep], shot.scores[keep], shot.labels[keep]), key=lambda d: -d[1])[:MAX_BOXES]
    for box, score, label in reversed(best):  # the best drawn last, on top
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = _corners(box, scale)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        text = f"{_name(shot, int(label))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        draw.rectangle((left, top, right + 2, bottom + 1), fill=colour)
        draw.text((x0 + 1, y0), text, fill=(0, 0, 0), font=font)
    draw.text((4, 2), f"frame {shot.frame_index}", fill=GROUND_TRUTH, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return image


def side_by_side(row: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """One frame of every model, left to right."""
    canvas = Image.new("RGB", (sum(i.width for i in row) + gap * (len(row) - 1), max(i.height for i in row)), (32, 32, 32))
    x = 0
    for image in row:
        canvas.paste(image, (x, 0))
        x += image.width + gap
    return canvas


def compose(columns: Sequence[Sequence[Shot]], min_score: float = 0.3, scale: int = 3) -> List[Image.Image]:
    """Per frame, the models' drawn shots side by side (every column holds the same frames)."""
    if not columns:
        raise ValueError("pictures: no columns of shots to draw")
    frames = min(len(column) for column in columns)
    return [side_by_side([draw_shot(column[t], min_score, scale) for column in columns]) for t in range(frames)]


def stack(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Images top to bottom: the still picture of a sequence of frames."""
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)),
                       (32, 32, 32))
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height + gap
    return canvas


def header(titles: Sequence[str], widths: Sequence[int], gap: int = 4) -> Image.Image:
    """The columns' titles, each above its column."""
    canvas = Image.new("RGB", (sum(widths) + gap * (len(widths) - 1), HEADER), (32, 32, 32))
    draw, font, x = ImageDraw.Draw(canvas), _font(14), 0
    for title, width in zip(titles, widths):
        draw.text((x + 4, 3), title, fill=GROUND_TRUTH, font=font)
        x += width + gap
    return canvas


def save_pictures(frames: Sequence[Image.Image], titles: Sequence[str], column_width: int, out: Path | str) -> Path:
    """`.png`: the titles over the frames stacked top to bottom; `.gif` (PIL) and `.mp4` (imageio +
    imageio-ffmpeg): the titled frames one after the other."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {out}: unknown picture format {out.suffix!r}; valid: {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    top = header(titles, [column_width] * len(titles))
    if out.suffix.lower() == ".png":
        stack([top, *frames]).save(out)
        return out
    titled = [stack([top, frame], gap=0) for frame in frames]
    if out.suffix.lower() == ".gif":
        titled[0].save(out, save_all=True, append_images=titled[1:], duration=GIF_FRAME_MS, loop=0)
    else:
        _save_mp4(titled, out)
    return out


def _save_mp4(frames: Sequence[Image.Image], out: Path) -> None:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ValueError(f"--out {out}: writing .mp4 needs imageio and its ffmpeg plugin "
                         f"(pip install -e '.[video]', i.e. imageio and imageio-ffmpeg); .gif and .png need nothing more") from None
    even = [np.asarray(f)[: f.height // 2 * 2, : f.width // 2 * 2] for f in frames]  # H.264 wants even sides
    iio.imwrite(out, np.stack(even), fps=1000 // GIF_FRAME_MS, codec="libx264")
