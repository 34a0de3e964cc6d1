"""NMS and detection post-processing (reproduction notes section 4: per-class NMS 0.5, 100/100)."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.anchors import BoxCoder, generate_anchors
from lightning_modules.loss import iou_matrix
from lightning_modules.postprocess import batched_nms, nms, postprocess


def _reference_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS with a Python loop (the definition the fast version must equal)."""
    score_list = scores.tolist()
    order = sorted(range(len(score_list)), key=lambda i: (-score_list[i], i))
    iou = iou_matrix(boxes, boxes).tolist()
    keep: list[int] = []
    for i in order:
        if all(iou[i][j] <= threshold for j in keep):
            keep.append(i)
    return keep


def test_nms_suppresses_above_threshold_only() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.49], [2.0, 2.0, 3.0, 3.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert iou_matrix(boxes[:1], boxes[1:2]).item() == 0.5
    # box 1 has IoU exactly 0.5 with box 0: kept; box 2 (IoU 0.49 with 0, > 0.5 with 1) is dropped by box 1.
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 3]
    assert nms(boxes, scores, 0.45).tolist() == [0, 3]


def test_nms_empty_ties_and_chains() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    same = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    assert nms(same, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0]  # ties: lower index first
    assert nms(same, torch.tensor([0.4, 0.5, 0.5]), 0.5).tolist() == [1]
    # Chain a > b > c where a suppresses b, b would suppress c, but b is gone so c survives.
    chain = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.3, 0.0, 1.3, 1.0], [0.6, 0.0, 1.6, 1.0]])
    assert nms(chain, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


def test_nms_equals_textbook_greedy_on_random_boxes() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy = torch.rand(200, 2, generator=gen)
        boxes = torch.cat([xy, xy + 0.05 + 0.3 * torch.rand(200, 2, generator=gen)], dim=1)
        scores = torch.rand(200, generator=gen)
        assert nms(boxes, scores, 0.5).tolist() == _reference_nms(boxes, scores, 0.5)


def test_batched_nms_keeps_other_classes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.9]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([1, 2, 1]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([1, 2, 3]), 0.5).tolist() == [0, 1, 2]


def test_postprocess_decodes_box_where_expected() -> None:
    coder = BoxCoder()
    anchors = generate_anchors([4, 2, 1])
    num_anchors, num_classes = anchors.shape[0], 5
    logits = torch.full((2, num_anchors, num_classes + 1), -10.0)
    regression = torch.zeros(2, num_anchors, 4)
    target = torch.tensor([0.2, 0.3, 0.5, 0.8])
    logits[0, 7, 3] = 2.0  # class 3 on anchor 7, regressed onto the target box
    regression[0, 7] = coder.encode(target[None], anchors[7:8])[0]
    logits[0, 0, 0] = 10.0  # background logit is ignored
    logits[1, 5, 1] = 1.0  # frame 1: anchor 5 as is (it sticks out of the image: clipped)
    dets = postprocess(regression, logits, anchors, coder)
    assert len(dets) == 2
    assert dets[0]["labels"].tolist() == [3]
    torch.testing.assert_close(dets[0]["boxes"], target[None], atol=1e-5, rtol=0)
    torch.testing.assert_close(dets[0]["scores"], torch.sigmoid(torch.tensor([2.0])))
    assert dets[1]["labels"].tolist() == [1] and dets[1]["labels"].dtype == torch.int64
    torch.testing.assert_close(dets[1]["boxes"], anchors[5:6].clamp(0, 1))
    assert anchors[5].min() < 0  # the check above really exercised the clipping


@pytest.mark.parametrize("logit_shift", [0.0, -6.0])  # most / few anchors above the score threshold
def test_postprocess_per_class_nms_and_limits(logit_shift: float) -> None:
    coder = BoxCoder()
    anchors = generate_anchors([10, 5, 3, 2, 1])
    num_anchors, num_classes = anchors.shape[0], 30
    gen = torch.Generator().manual_seed(1)
    regression = 0.5 * torch.randn(1, num_anchors, 4, generator=gen)
    logits = torch.randn(1, num_anchors, num_classes + 1, generator=gen) + logit_shift
    det = postprocess(regression, logits, anchors, coder, max_per_class=7, max_total=1000)[0]
    assert det["labels"].min() >= 1 and det["labels"].max() <= num_classes
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    assert det["boxes"].min() >= 0 and det["boxes"].max() <= 1
    # Each class equals textbook NMS on that class's candidates (score > 0.01), cut to its best 7.
    boxes = coder.decode(regression[0], anchors).clamp(0, 1)
    scores = torch.sigmoid(logits[0, :, 1:])
    capped = 0
    for label in range(1, num_classes + 1):
        cand = (scores[:, label - 1] > 0.01).nonzero().squeeze(1)
        ref = cand[_reference_nms(boxes[cand], scores[cand, label - 1], 0.5)]
        capped += len(ref) > 7
        mine = det["labels"] == label
        torch.testing.assert_close(det["scores"][mine], scores[ref[:7], label - 1])
        torch.testing.assert_close(det["boxes"][mine], boxes[ref[:7]])
    assert capped >= 5  # the per-class cap really bound
    # The total cut keeps the best max_total over all classes.
    top = postprocess(regression, logits, anchors, coder, max_per_class=7, max_total=100)[0]
    assert len(top["scores"]) == 100
    torch.testing.assert_close(top["scores"], det["scores"][:100])
    torch.testing.assert_close(top["boxes"], det["boxes"][:100])
    assert top["labels"].tolist() == det["labels"][:100].tolist()


def test_postprocess_score_threshold_and_empty_frames() -> None:
    coder = BoxCoder()
    anchors = generate_anchors([2, 1])
    logits = torch.full((3, anchors.shape[0], 4), -20.0)
    dets = postprocess(torch.zeros(3, anchors.shape[0], 4), logits, anchors, coder)
    assert [len(d["scores"]) for d in dets] == [0, 0, 0]
    assert dets[0]["boxes"].shape == (0, 4) and dets[0]["labels"].dtype == torch.int64
