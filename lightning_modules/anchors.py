"""SSD anchors and the box coder, as in TF object_detection (the authors' released code).

- `generate_anchors` reproduces `anchor_generators/multiple_grid_anchor_generator.create_ssd_anchors`
  (`ssd_anchor_generator` in the pipeline config) for square inputs: normalized anchors, not clipped.
- `BoxCoder` reproduces `box_coders/faster_rcnn_box_coder.FasterRcnnBoxCoder` with scale factors
  (10, 10, 5, 5), i.e. SSD's variances 0.1 / 0.2 (reproduction notes section 2).

Boxes here are normalized (xmin, ymin, xmax, ymax); TF stores (ymin, xmin, ymax, xmax) but the
arithmetic is the same. Regression channels keep TF's order (ty, tx, th, tw).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

#: Defaults of the anchor generator (the lstm_object_detection pipeline configs' values).
DEFAULT_MIN_SCALE = 0.2
DEFAULT_MAX_SCALE = 0.95
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
DEFAULT_INTERPOLATED_SCALE_ASPECT_RATIO = 1.0
#: Box coder scale factors for (y, x, h, w), TF's faster_rcnn_box_coder defaults.
DEFAULT_SCALE_FACTORS: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
#: TF's faster_rcnn_box_coder EPSILON, added to sizes before division and log.
BOX_CODER_EPSILON = 1e-8
#: Cap on decoded log-size codes (torchvision's bbox_xform_clip); TF has none. It only changes
#: boxes more than 62x their anchor, which cover the whole image after clipping anyway, and keeps
#: exp() finite for an untrained network.
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def ssd_scales(num_layers: int, min_scale: float = DEFAULT_MIN_SCALE,
               max_scale: float = DEFAULT_MAX_SCALE) -> list[float]:
    """Per-layer scales linearly spaced from min_scale to max_scale, plus the final 1.0
    (create_ssd_anchors: `scales = [min + (max - min) * i / (n - 1)] + [1.0]`)."""
    if num_layers < 1:
        raise ValueError(f"anchors.py ssd_scales: num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return [min_scale, 1.0]
    step = (max_scale - min_scale) / (num_layers - 1)
    return [min_scale + step * i for i in range(num_layers)] + [1.0]


def layer_box_specs(
    layer: int,
    scales: Sequence[float],
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    interpolated_scale_aspect_ratio: float = DEFAULT_INTERPOLATED_SCALE_ASPECT_RATIO,
    reduce_boxes_in_lowest_layer: bool = True,
) -> list[tuple[float, float]]:
    """(scale, aspect_ratio) pairs of one prediction map, in the order of its anchors.

    Layer 0 with reduce_boxes_in_lowest_layer: (0.1, 1), (s0, 2), (s0, 1/2). Other layers: one
    anchor per aspect ratio at s_i, then one at sqrt(s_i * s_{i+1}) with the interpolated ratio.
    """
    scale, scale_next = scales[layer], scales[layer + 1]
    if layer == 0 and reduce_boxes_in_lowest_layer:
        return [(0.1, 1.0), (scale, 2.0), (scale, 0.5)]
    specs = [(scale, float(ratio)) for ratio in aspect_ratios]
    if interpolated_scale_aspect_ratio > 0.0:
        specs.append((math.sqrt(scale * scale_next), interpolated_scale_aspect_ratio))
    return specs


def num_anchors_per_location(
    num_maps: int = 5,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    interpolated_scale_aspect_ratio: float = DEFAULT_INTERPOLATED_SCALE_ASPECT_RATIO,
    reduce_boxes_in_lowest_layer: bool = True,
) -> list[int]:
    """Anchors per feature-map location, per prediction map: [3, 6, 6, 6, 6] by default."""
    scales = ssd_scales(num_maps)
    return [
        len(layer_box_specs(i, scales, aspect_ratios, interpolated_scale_aspect_ratio,
                            reduce_boxes_in_lowest_layer))
        for i in range(num_maps)
    ]


def _grid_anchors(size: int, specs: Sequence[tuple[float, float]]) -> torch.Tensor:
    """One map's anchors [size*size*k, 4] (TF grid_anchor_generator.tile_anchors): centres at
    ((x + 0.5) / size, (y + 0.5) / size), width = scale*sqrt(ar), height = scale/sqrt(ar);
    ordered by row y, then column x, then anchor."""
    spec = torch.tensor(specs, dtype=torch.float64)
    widths = spec[:, 0] * spec[:, 1].sqrt()
    heights = spec[:, 0] / spec[:, 1].sqrt()
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # [size, size]
    cx = cx[..., None].expand(size, size, len(specs))
    cy = cy[..., None].expand(size, size, len(specs))
    boxes = torch.stack([cx - widths / 2, cy - heights / 2, cx + widths / 2, cy + heights / 2], -1)
    return boxes.reshape(-1, 4)


def generate_anchors(
    feature_map_sizes: Sequence[int],
    min_scale: float = DEFAULT_MIN_SCALE,
    max_scale: float = DEFAULT_MAX_SCALE,
    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
    interpolated_scale_aspect_ratio: float = DEFAULT_INTERPOLATED_SCALE_ASPECT_RATIO,
    reduce_boxes_in_lowest_layer: bool = True,
) -> torch.Tensor:
    """SSD anchors [A, 4] (float32, normalized xyxy, unclipped) for square maps of the given sizes.

    Example: `generate_anchors([10, 5, 3, 2, 1]).shape == (534, 4)` (320x320 input).
    """
    sizes = [int(s) for s in feature_map_sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"anchors.py generate_anchors: feature_map_sizes must be a non-empty list of "
                         f"positive ints, got {list(feature_map_sizes)}")
    scales = ssd_scales(len(sizes), min_scale, max_scale)
    per_map = [
        _grid_anchors(size, layer_box_specs(i, scales, aspect_ratios, interpolated_scale_aspect_ratio,
                                            reduce_boxes_in_lowest_layer))
        for i, size in enumerate(sizes)
    ]
    return torch.cat(per_map).float()


def _center_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(ycenter, xcenter, height, width) of xyxy boxes [..., 4]."""
    xmin, ymin, xmax, ymax = boxes.unbind(-1)
    return (ymin + ymax) / 2, (xmin + xmax) / 2, ymax - ymin, xmax - xmin


class BoxCoder:
    """Center-size box coder (TF faster_rcnn_box_coder) with scale factors for (y, x, h, w).

    Codes are stored as (ty, tx, th, tw), TF's channel order:
    ty = 10 * (yc - yc_a) / h_a, tx = 10 * (xc - xc_a) / w_a, th = 5 * log(h / h_a), tw = 5 * log(w / w_a).
    """

    def __init__(self, scale_factors: Sequence[float] = DEFAULT_SCALE_FACTORS,
                 max_log_scale: float | None = DEFAULT_MAX_LOG_SCALE) -> None:
        if len(scale_factors) != 4 or any(f <= 0 for f in scale_factors):
            raise ValueError(f"anchors.py BoxCoder: scale_factors must be 4 positive numbers (y, x, h, w), "
                             f"got {tuple(scale_factors)}")
        self.scale_factors = tuple(float(f) for f in scale_factors)
        self.max_log_scale = max_log_scale

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Regression targets [..., 4] of xyxy boxes relative to anchors (shapes broadcast)."""
        yc_a, xc_a, h_a, w_a = _center_size(anchors)
        yc, xc, h, w = _center_size(boxes)
        # TF adds EPSILON to all four sizes to avoid NaN in division and log.
        h_a, w_a = h_a + BOX_CODER_EPSILON, w_a + BOX_CODER_EPSILON
        h, w = h + BOX_CODER_EPSILON, w + BOX_CODER_EPSILON
        sy, sx, sh, sw = self.scale_factors
        ty = sy * (yc - yc_a) / h_a
        tx = sx * (xc - xc_a) / w_a
        th = sh * torch.log(h / h_a)
        tw = sw * torch.log(w / w_a)
        return torch.stack([ty, tx, th, tw], dim=-1)

    def decode(self, rel_codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """xyxy boxes [..., A, 4] from codes [..., A, 4] (ty, tx, th, tw) and anchors [A, 4]."""
        if rel_codes.shape[-1] != 4 or rel_codes.shape[-2] != anchors.shape[0]:
            raise ValueError(f"anchors.py BoxCoder.decode: rel_codes must be [..., {anchors.shape[0]}, 4] "
                             f"to match the anchors, got {tuple(rel_codes.shape)}")
        yc_a, xc_a, h_a, w_a = _center_size(anchors.to(rel_codes))
        sy, sx, sh, sw = self.scale_factors
        ty, tx, th, tw = rel_codes.unbind(-1)
        th, tw = th / sh, tw / sw
        if self.max_log_scale is not None:
            th, tw = th.clamp(max=self.max_log_scale), tw.clamp(max=self.max_log_scale)
        h = torch.exp(th) * h_a
        w = torch.exp(tw) * w_a
        yc = ty / sy * h_a + yc_a
        xc = tx / sx * w_a + xc_a
        return torch.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], dim=-1)
