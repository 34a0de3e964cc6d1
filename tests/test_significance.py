"""The paired bootstrap over val videos (reports.significance) on hand-made detections."""
import numpy as np
import pytest

from datamodules.metrics import VidEvaluator
from reports.significance import Difference, SignificanceError, VideoMatches, paired_bootstrap

CLASSES = 3


def _scene(videos=8, frames=6, seed=0):
    """Per (video, frame): gt boxes and labels, 1-3 objects of CLASSES classes."""
    rng = np.random.default_rng(seed)
    scene = []
    for v in range(videos):
        for f in range(frames):
            n = int(rng.integers(1, 4))
            xy = rng.uniform(0, 80, size=(n, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(15, 40, size=(n, 2))], axis=1)
            scene.append((f"v{v}", f, boxes, rng.integers(1, CLASSES + 1, size=n)))
    return scene


def _evaluate(scene, hit_rate, seed=1, rename=lambda name: name):
    """A model that finds each gt with probability hit_rate (else a shifted box), plus one stray box."""
    rng = np.random.default_rng(seed)
    ev = VidEvaluator(num_classes=CLASSES)
    for video, frame, boxes, labels in scene:
        hit = rng.uniform(size=len(labels)) < hit_rate
        det = np.where(hit[:, None], boxes, boxes + 60.0)
        stray = np.array([[0.0, 0.0, 10.0, 10.0]])
        ev.update(rename(video), frame, boxes, labels, None, np.concatenate([det, stray]),
                  np.concatenate([rng.uniform(0.3, 1.0, size=len(labels)), [0.2]]),
                  np.concatenate([labels, [1]]))
    return ev


def test_all_videos_once_reproduces_the_evaluators_map():
    ev = _evaluate(_scene(), hit_rate=0.6)
    matches = VideoMatches.from_arrays(ev.per_video())
    assert matches.map50() == pytest.approx(ev.compute()["vid_map50"], abs=1e-12)


def test_a_video_drawn_twice_counts_as_two_copies_of_it():
    scene = _scene(videos=4)
    matches = VideoMatches.from_arrays(_evaluate(scene, hit_rate=0.5).per_video())
    doubled = scene + [(f"{v}_copy", f, b, lab) for v, f, b, lab in scene if v == "v2"]
    # the same model outputs on the copy: evaluate the copied frames with the same random stream
    ev = VidEvaluator(num_classes=CLASSES)
    rng = np.random.default_rng(1)
    outputs = {}
    for video, frame, boxes, labels in scene:
        hit = rng.uniform(size=len(labels)) < 0.5
        det = np.concatenate([np.where(hit[:, None], boxes, boxes + 60.0), [[0.0, 0.0, 10.0, 10.0]]])
        outputs[(video, frame)] = (det, np.concatenate([rng.uniform(0.3, 1.0, size=len(labels)), [0.2]]),
                                   np.concatenate([labels, [1]]))
    for video, frame, boxes, labels in doubled:
        det, scores, det_labels = outputs[(video.replace("_copy", ""), frame)]
        ev.update(video, frame, boxes, labels, None, det, scores, det_labels)
    counts = np.array([[1, 1, 2, 1]])
    assert matches.map50(counts)[0] == pytest.approx(ev.compute()["vid_map50"], abs=1e-12)


def _expanded_map(m: VideoMatches, counts: np.ndarray) -> float:
    """The devkit's VOCap on an explicit resample: each detection repeated as often as its video was drawn."""
    aps = []
    for c in range(1, m.npos.shape[1]):
        npos = int(counts @ m.npos[:, c])
        if npos == 0:
            continue
        sel = np.nonzero(m.label == c)[0]
        sel = np.repeat(sel, counts[m.video[sel]])  # copies stay next to each other
        order = sel[np.argsort(-m.score[sel], kind="stable")]
        tp = np.cumsum(m.tp[order])
        fp = np.cumsum(1 - m.tp[order])
        rec = np.concatenate([[0.0], tp / npos, [1.0]])
        prec = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1e-300), [0.0]])
        prec = np.maximum.accumulate(prec[::-1])[::-1]
        changed = np.nonzero(rec[1:] != rec[:-1])[0]
        aps.append(np.sum((rec[changed + 1] - rec[changed]) * prec[changed + 1]))
    return float(np.mean(aps)) if aps else 0.0


def test_resampled_maps_equal_the_devkit_on_the_expanded_resamples():
    """Random detections with tied scores, videos drawn 0, 1 or several times: every resample's mAP is
    the devkit's on the video set that resample stands for."""
    rng = np.random.default_rng(5)
    videos, detections = 6, 400
    npos = rng.integers(0, 6, size=(videos, CLASSES + 1))
    npos[:, 0] = 0
    matches = VideoMatches(video=rng.integers(0, videos, detections), label=rng.integers(1, CLASSES + 1, detections),
                           score=rng.integers(0, 40, detections) / 40.0, tp=(rng.uniform(size=detections) < 0.3)
                           .astype(np.int8), videos=np.array([f"v{v}" for v in range(videos)]), npos=npos)
    counts = rng.multinomial(videos, np.full(videos, 1.0 / videos), size=50)
    counts[0] = 0
    counts[0, 2] = 6  # one video six times
    got = matches.map50(counts)
    assert got == pytest.approx([_expanded_map(matches, row) for row in counts], abs=1e-12)


def test_identical_models_give_an_interval_around_zero():
    matches = VideoMatches.from_arrays(_evaluate(_scene(), hit_rate=0.6).per_video())
    diff = paired_bootstrap([(matches, matches)], resamples=1000, seed=0)
    assert diff.delta == 0.0 and diff.low <= 0.0 <= diff.high
    assert not diff.significant and "not significant" in str(diff)


def test_a_model_that_finds_every_box_is_significantly_better():
    scene = _scene(videos=10)
    perfect = VideoMatches.from_arrays(_evaluate(scene, hit_rate=1.0).per_video())
    weak = VideoMatches.from_arrays(_evaluate(scene, hit_rate=0.4).per_video())
    diff = paired_bootstrap([(perfect, weak)], resamples=1000, seed=0)
    assert diff.delta > 20.0 and diff.low > 0.0 and diff.significant
    assert str(diff).startswith(f"+{diff.delta:.1f} [")
    assert "not significant" not in str(diff)
    worse = paired_bootstrap([(weak, perfect)], resamples=1000, seed=0)
    assert worse.high < 0.0 and worse.significant


def test_seeds_are_pooled_as_the_mean_difference():
    pairs = []
    for seed in (0, 1):
        scene = _scene(seed=seed)
        pairs.append((VideoMatches.from_arrays(_evaluate(scene, 0.9, seed=seed).per_video()),
                      VideoMatches.from_arrays(_evaluate(scene, 0.5, seed=seed).per_video())))
    pooled = paired_bootstrap(pairs, resamples=500, seed=3)
    single = [paired_bootstrap([pair], resamples=500, seed=3).delta for pair in pairs]
    assert pooled.seeds == 2 and pooled.resamples == 500
    assert pooled.delta == pytest.approx(np.mean(single))
    assert pooled.low <= pooled.delta <= pooled.high
    assert paired_bootstrap(pairs, resamples=500, seed=3) == pooled  # seeded: the same interval again


def test_different_val_videos_and_bad_files_are_clear_errors(tmp_path):
    scene = _scene()
    a = VideoMatches.from_arrays(_evaluate(scene, 0.5).per_video())
    b = VideoMatches.from_arrays(_evaluate(scene, 0.5, rename=lambda name: name + "x").per_video())
    with pytest.raises(SignificanceError, match="different val videos"):
        paired_bootstrap([(a, b)])
    path = a.save(tmp_path / "matches.npz")
    again = VideoMatches.load(path)
    assert again.map50() == a.map50() and list(again.videos) == list(a.videos)
    (tmp_path / "broken.npz").write_text("not an archive")
    with pytest.raises(SignificanceError, match="broken.npz"):
        VideoMatches.load(tmp_path / "broken.npz")


def test_difference_text():
    assert str(Difference(2.04, 0.5, 3.9, 3, 1000)) == "+2.0 [+0.5, +3.9]"
    assert str(Difference(-0.3, -1.2, 0.6, 3, 1000)) == "-0.3 [-1.2, +0.6] not significant"
    # an end that rounds to 0.0 keeps its sign visible: it decides significance
    assert str(Difference(0.5, 0.004, 1.0, 3, 1000)) == "+0.5 [+0.004, +1.0]"
    assert str(Difference(0.4, -0.03, 0.9, 3, 1000)) == "+0.4 [-0.03, +0.9] not significant"
