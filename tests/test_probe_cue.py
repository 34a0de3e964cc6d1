"""benchmarks/probe_cue.py's second table: a checkpoint's mAP split into finding the pair (pair-merged mAP,
pair score) and naming the member, on the frames the report scores. Checked with hand-made detections whose
answers are known: an oracle that names every object right, and one that hedges between a pair's members."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from datamodules.data_config import DataConfig
from datamodules.synthetic import SynthConfig, generate
from datamodules.synthetic_cap import _ID_BY_NAME
from lightning_modules.detect import Shot
from lightning_modules.train_config import TrainConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_cue.py"
_SPEC = importlib.util.spec_from_file_location("probe_cue", _PATH)
probe_cue = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe_cue)

HORSE, ZEBRA, CAR, BUS, BEAR, PANDA = (_ID_BY_NAME[n] for n in ("horse", "zebra", "car", "bus", "bear", "giant_panda"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    cfg = SynthConfig(videos=1, val_videos=3, frames=30, size=64, seed=3, max_objects=2)
    return generate(tmp_path_factory.mktemp("synth") / "vid", cfg, progress=False)


def test_pairs_merge_into_their_first_member_and_count_once_per_object():
    ids = probe_cue.pair_ids(("horse", "zebra", "car", "bus", "bear"))  # bear: no partner
    assert ids == {HORSE: HORSE, ZEBRA: HORSE, CAR: CAR, BUS: CAR, BEAR: BEAR}
    boxes = np.asarray([[0, 0, 20, 20], [1, 0, 20, 20], [0, 0, 20, 20], [40, 40, 60, 60]], np.float64)
    scores = np.asarray([0.6, 0.4, 0.5, 0.3])
    labels = np.asarray([HORSE, ZEBRA, CAR, BUS])
    kept_boxes, kept_scores, kept_labels = probe_cue.merge_pairs(boxes, scores, labels, ids, 0.5)
    # zebra on horse's box is the same pair's second detection of one object; car on that box is another pair's
    assert kept_labels.tolist() == [HORSE, CAR, CAR] and kept_scores.tolist() == [0.6, 0.5, 0.3]
    assert kept_boxes.tolist() == [boxes[0].tolist(), boxes[2].tolist(), boxes[3].tolist()]


def _oracle(hedge: bool):
    """detect_frames stand-in: every annotated object at its own box, named right with score 1 or, with
    `hedge`, as both members of its pair at 0.5 each (the single-frame cap's answer on an unmarked frame)."""
    def detect(detector, video, frames):
        partner_of = {HORSE: ZEBRA, ZEBRA: HORSE, CAR: BUS, BUS: CAR, BEAR: PANDA, PANDA: BEAR}
        shots = []
        for frame in frames:
            boxes, scores, labels = [], [], []
            for box, label in zip(frame.boxes, frame.labels):
                named = [int(label), partner_of.get(int(label))] if hedge else [int(label)]
                for cid in filter(None, named):
                    boxes.append(box), scores.append(0.5 if hedge else 1.0), labels.append(cid)
            shots.append(Shot(video.name, frame.frame_index, None, frame.boxes, frame.labels,
                              np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores), np.asarray(labels), ()))
        return shots
    return detect


def test_an_oracle_scores_one_everywhere_and_a_hedging_one_finds_every_pair(root, monkeypatch):
    detector = (None, None, TrainConfig())
    monkeypatch.setattr(probe_cue, "detect_frames", _oracle(hedge=False))
    right = probe_cue.window_scores(detector, root, videos=3, minival_frames=20)
    assert right["mAP"] == pytest.approx(1.0) and right["pair-merged mAP"] == pytest.approx(1.0)
    assert right["pair score, cue"] == pytest.approx(1.0) and right["pair score, no cue"] == pytest.approx(1.0)
    assert right["marked right > unmarked guess"] == pytest.approx(0.5)  # sure everywhere: ties throughout

    monkeypatch.setattr(probe_cue, "detect_frames", _oracle(hedge=True))
    hedged = probe_cue.window_scores(detector, root, videos=3, minival_frames=20)
    # each pair's two detections of one object merge into one true positive: the pair is found perfectly ...
    assert hedged["pair-merged mAP"] == pytest.approx(1.0)
    assert hedged["pair score, no cue"] == pytest.approx(1.0)
    # ... while every member's list holds as many false positives (its look-alikes) as true ones
    assert 0.3 < hedged["mAP"] < 0.9
    assert hedged["marked right > unmarked guess"] == pytest.approx(0.5)  # no surer where the marker shows


def test_the_second_table_scores_the_windows_it_is_given(root, monkeypatch):
    """The frames each val video is streamed over: its minival window by default (data.minival_frames), every frame
    with `minival_frames=None` (`--minival-frames 0`, as data.eval_protocol=full scores)."""
    streamed = []
    oracle = _oracle(hedge=False)

    def detect(detector, video, frames):
        streamed.append((video.name, [f.frame_index for f in frames]))
        return oracle(detector, video, frames)

    monkeypatch.setattr(probe_cue, "detect_frames", detect)
    probe_cue.window_scores((None, None, TrainConfig()), root, videos=3)
    assert len(streamed) == 3 and all(len(frames) == DataConfig.minival_frames for _, frames in streamed)
    streamed.clear()
    probe_cue.window_scores((None, None, TrainConfig()), root, videos=3, minival_frames=None)
    assert len(streamed) == 3 and all(frames == list(range(30)) for _, frames in streamed)


def test_right_above_guess_is_the_chance_a_right_name_outranks_a_guess():
    # the cap's oracle: right names at 1 on marked objects, 0.5 / 0.5 on unmarked ones
    assert probe_cue.right_above_guess([[1.0, 0.0]] * 3, [[0.5, 0.5]] * 4) == 1.0
    # 0.3 is under the guess 0.4 and ties 0.3; 0.6 is above both
    assert probe_cue.right_above_guess([[0.3, 0.1], [0.6, 0.0]], [[0.2, 0.4], [0.1, 0.3]]) == pytest.approx(2.5 / 4)
    # ties count half: 0.4 against 0.4 and 0.5
    assert probe_cue.right_above_guess([[0.4, 0.0]], [[0.4, 0.1], [0.2, 0.5]]) == pytest.approx(0.25)
    assert np.isnan(probe_cue.right_above_guess([], [[0.5, 0.5]]))
