"""Streaming clips: sharding, clip-consistent augmentation, minival, occlusion, decode errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.vid_tree import make_train_tree, make_val_tree  # noqa: E402

import datamodules.clips as clips  # noqa: E402
from datamodules.clips import (DataConfig, EvalClipDataset, EvalProtocol,  # noqa: E402
                               TrainClipDataset, VidClipDataModule, collate_clips,
                               minival_windows, training_clips)
from datamodules.transforms import (AugmentConfig, ClipAug, apply_clip_augmentation,  # noqa: E402
                                    frame_rng, occlude, sample_clip_augmentation)
from datamodules.vid import FrameAnno, Video, VidDataError, VidDataWarning, read_vid  # noqa: E402

S = 32
TURTLE = "n01662784"


def boxes_fn(i: int) -> list[dict]:
    return [{"wnid": TURTLE, "box": (8, 6, 40, 30), "trackid": 0},
            {"wnid": "n02391049", "box": (44, 20, 60, 44), "trackid": 1}]


def fake_videos(lengths: dict[str, int]) -> list[Video]:
    """Index-only videos (no files) for planning tests."""
    empty = np.zeros((0, 4), np.float32)
    return [Video(name, tuple(
        FrameAnno(Path(f"/none/{name}/{i:06d}.JPEG"), 64, 48, empty, np.zeros(0, np.int64),
                  np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
        for i in range(n))) for name, n in lengths.items()]


@pytest.fixture(scope="module")
def train_videos(tmp_path_factory: pytest.TempPathFactory) -> list[Video]:
    # 13 videos x 8 frames, clip_length 4: 26 clips; 2 ranks x 2 workers x batch 2 keep 24.
    root = make_train_tree(tmp_path_factory.mktemp("train"),
                           {f"ILSVRC2015_train_{k:08d}": 8 for k in range(13)}, boxes_fn)
    return read_vid(root, "train", progress=False)[0]


@pytest.fixture(scope="module")
def val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("val")
    return make_val_tree(root, {"ILSVRC2015_val_00000000": 5, "ILSVRC2015_val_00000001": 9},
                         boxes_fn)


def _run_shard(monkeypatch, ds: TrainClipDataset, worker: int, workers: int) -> list[dict]:
    info = SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(clips, "get_worker_info", lambda: info)
    return list(ds)


def test_training_clips_are_non_overlapping_windows_and_short_videos_are_counted() -> None:
    videos = fake_videos({"a": 25, "b": 9, "c": 10})
    found, short = training_clips(videos, clip_length=10, frame_stride=1)
    assert found == [(0, 0), (0, 10), (2, 0)] and short == 1
    found, short = training_clips(videos, clip_length=4, frame_stride=2)
    # stride 2: phases 0 and 1 interleave; a(25): 13 and 12 frames -> 3 + 3 clips
    assert found[:6] == [(0, 0), (0, 8), (0, 16), (0, 1), (0, 9), (0, 17)] and short == 0


def test_two_ranks_two_workers_yield_every_kept_clip_once_and_equal_batches(
        train_videos, monkeypatch) -> None:
    cfg = DataConfig(clip_length=4, batch_size=2, num_workers=2, seed=3)
    seen, batches = [], []
    for rank in range(2):
        ds = TrainClipDataset(train_videos, cfg, S, rank=rank, world_size=2)
        ds.set_epoch(1)
        n_batches = 0
        for worker in range(2):
            samples = _run_shard(monkeypatch, ds, worker, 2)
            seen += [(s["video"], int(s["frame_index"][0])) for s in samples]
            n_batches += math.ceil(len(samples) / cfg.batch_size)
        batches.append(n_batches)
        assert len(ds) == n_batches * cfg.batch_size
    assert batches == [6, 6]
    assert len(seen) == len(set(seen)) == 24  # 26 clips, remainder of 2 dropped
    every = {(train_videos[v].name, start) for v, start in ds.clips}
    assert set(seen) <= every and len(every) == 26
    # the plan is a function of (seed, epoch) only
    ds.set_epoch(1)
    again = ds.shard_clips(1, 2)
    ds.set_epoch(2)
    assert ds.shard_clips(1, 2) != again


def test_real_dataloader_workers_shard_the_epoch(train_videos) -> None:
    cfg = DataConfig(clip_length=4, batch_size=2, num_workers=2)
    ds = TrainClipDataset(train_videos, cfg, S)
    loader = clips.EpochDataLoader(ds, lambda: 5, batch_size=2, num_workers=2,
                                   collate_fn=collate_clips)
    starts = [(b["video"][0][i], int(b["frame_index"][0, i])) for b in loader for i in range(2)]
    assert len(starts) == len(set(starts)) == 24 == len(ds)
    assert int(ds._epoch) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skip_yields_the_rest_of_the_epoch_without_decoding_the_skipped_batches(
        train_videos, workers, monkeypatch) -> None:
    cfg = DataConfig(clip_length=4, batch_size=2, num_workers=workers)
    ds = TrainClipDataset(train_videos, cfg, S)
    loader = clips.EpochDataLoader(ds, lambda: 3, batch_size=2, num_workers=workers, collate_fn=collate_clips)

    def batches():
        return [[(b["video"][0][i], int(b["frame_index"][0, i])) for i in range(2)] for b in loader]

    full = batches()
    decoded = []
    load_clip = TrainClipDataset.load_clip
    monkeypatch.setattr(TrainClipDataset, "load_clip", lambda self, clip: decoded.append(clip) or load_clip(self, clip))
    loader.skip_batches = 5
    assert batches() == full[5:]  # workers 0/1 drop their share of the first 5 batches (3 and 2)
    if workers == 0:  # in worker processes the patch is not seen
        assert len(decoded) == 2 * (len(full) - 5)
    assert batches() == full and loader.skip_batches == 0  # the skip is for one pass only


def test_batch_format(train_videos) -> None:
    cfg = DataConfig(clip_length=4, batch_size=2)
    batch = next(iter(torch.utils.data.DataLoader(
        TrainClipDataset(train_videos, cfg, S), batch_size=2, collate_fn=collate_clips)))
    assert batch["images"].shape == (4, 2, 3, S, S) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert batch["reset"].tolist() == [[True, True]] + [[False, False]] * 3
    assert batch["frame_index"].shape == (4, 2) and batch["frame_index"].dtype == torch.int64
    assert (batch["frame_index"][1:] - batch["frame_index"][:-1] == 1).all()
    assert batch["orig_size"].shape == (4, 2, 2) and batch["orig_size"][0, 0].tolist() == [48, 64]
    assert len(batch["boxes"]) == 4 and len(batch["boxes"][0]) == 2
    for t in range(4):
        for b in range(2):
            box, lab = batch["boxes"][t][b], batch["labels"][t][b]
            assert box.dtype == torch.float32 and box.shape == (len(lab), 4)
            assert lab.dtype == torch.int64 and set(lab.tolist()) <= {27, 30}
            assert (box >= 0).all() and (box <= 1).all()
    assert batch["video"][0] == batch["video"][3]


def test_augmentation_is_identical_for_every_frame_of_a_clip(tmp_path: Path) -> None:
    root = make_train_tree(tmp_path, {"ILSVRC2015_train_00000000": 12}, boxes_fn,
                           same_image=True)
    videos, _ = read_vid(root, "train", progress=False)
    aug = AugmentConfig(photometric=True, no_crop_prob=0.0)
    cfg = DataConfig(clip_length=4, batch_size=1, augment=aug)
    ds = TrainClipDataset(videos, cfg, S)
    results = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        for sample in ds:
            for t in range(1, 4):
                torch.testing.assert_close(sample["images"][t], sample["images"][0])
                torch.testing.assert_close(sample["boxes"][t], sample["boxes"][0])
                assert sample["labels"][t].tolist() == sample["labels"][0].tolist()
            results.append(sample["images"][0])
    assert any(not torch.equal(results[0], r) for r in results[1:])  # clips differ


def test_flip_and_crop_transform_boxes_on_a_hand_case() -> None:
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, 16:32] = (255, 0, 0)  # left half of the crop red, right half blue
    pixels[:, 32:48] = (0, 0, 255)
    boxes = np.asarray([[16, 0, 31, 23], [36, 12, 55, 35], [0, 0, 9, 9]], np.float32)
    aug = ClipAug(crop=(0.25, 0.0, 0.75, 1.0), flip=True)
    image, out, labels, keep = apply_clip_augmentation(
        Image.fromarray(pixels), boxes, np.asarray([1, 2, 3]), aug, S)
    assert keep.tolist() == [True, True, False] and labels.tolist() == [1, 2]
    # crop x 16..47 (width 32), then flip: x' = 1 - x
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 1.0, 0.5],
                                                  [0.0, 0.25, 0.375, 0.75]]))
    # flipped: the crop's blue right half is now on the left, its red left half on the right
    assert image[2, :, 2].mean() > 0.9 and image[0, :, 2].mean() < -0.9
    assert image[0, :, -3].mean() > 0.9 and image[2, :, -3].mean() < -0.9
    same, boxes_same, _, _ = apply_clip_augmentation(Image.fromarray(pixels), boxes,
                                                     np.asarray([1, 2, 3]), ClipAug(), S)
    torch.testing.assert_close(boxes_same, torch.from_numpy(
        np.asarray([[16 / 64, 0, 32 / 64, 0.5], [36 / 64, 12 / 48, 56 / 64, 36 / 48],
                    [0, 0, 10 / 64, 10 / 48]], np.float32)))
    assert same.shape == (3, S, S)


def test_random_crop_respects_min_object_covered_and_ranges() -> None:
    cfg = AugmentConfig(no_crop_prob=0.0, min_object_covered=[1.0], photometric=False)
    box = np.asarray([[100, 50, 199, 149]], np.float32)
    for seed in range(30):
        aug = sample_clip_augmentation(np.random.default_rng(seed), 400, 300, cfg, box)
        x0, y0, x1, y1 = aug.crop
        if aug.crop != (0.0, 0.0, 1.0, 1.0):
            assert x0 * 400 <= 100 and y0 * 300 <= 50 and x1 * 400 >= 200 and y1 * 300 >= 150
            area = (x1 - x0) * (y1 - y0)
            ratio = (x1 - x0) * 400 / ((y1 - y0) * 300)
            assert 0.09 <= area <= 1.0 and 0.45 <= ratio <= 2.1
    assert sample_clip_augmentation(np.random.default_rng(0), 400, 300,
                                    AugmentConfig(enabled=False), box) == ClipAug()


def test_minival_windows_and_eval_stream(val_root: Path) -> None:
    videos, _ = read_vid(val_root, "val", progress=False)
    windows = minival_windows(videos, frames=6, seed=1)
    assert windows["ILSVRC2015_val_00000000"] == (0, 5)  # shorter than 6: whole
    start, length = windows["ILSVRC2015_val_00000001"]
    assert length == 6 and 0 <= start <= 3
    assert windows == minival_windows(list(reversed(videos)), frames=6, seed=1)
    assert {minival_windows(videos, 6, s)["ILSVRC2015_val_00000001"] for s in range(20)} != {
        (start, length)}
    cfg = DataConfig(clip_length=4, minival_frames=6, seed=7, minival_seed=1)  # the training seed has no say
    assert EvalClipDataset(videos, cfg, S).windows == windows
    batches = list(torch.utils.data.DataLoader(EvalClipDataset(videos, cfg, S), batch_size=1,
                                               collate_fn=collate_clips))
    frames = [(b["video"][t][0], int(b["frame_index"][t, 0]), bool(b["reset"][t, 0]))
              for b in batches for t in range(len(b["boxes"]))]
    assert len(frames) == 11 and [len(b["boxes"]) for b in batches] == [4, 1, 4, 2]
    assert [f[1] for f in frames] == list(range(5)) + list(range(start, start + 6))
    assert [f[2] for f in frames] == [True] + [False] * 4 + [True] + [False] * 5
    gt = batches[0]["gt_boxes_px"][0][0]
    assert gt.tolist() == [[8, 6, 40, 30], [44, 20, 60, 44]]
    assert batches[0]["gt_labels"][0][0].tolist() == [27, 30]
    assert batches[0]["gt_track_ids"][0][0].tolist() == [0, 1]
    full = DataConfig(clip_length=4, eval_protocol=EvalProtocol.full)
    per_rank = [EvalClipDataset(videos, full, S, rank=r, world_size=2).rank_clips()
                for r in range(2)]
    assert sorted(sum(c[2] for c in rank) for rank in per_rank) == [5, 9]
    assert {c[0] for c in per_rank[0]}.isdisjoint({c[0] for c in per_rank[1]})


def test_occlusion_is_deterministic_inside_boxes_and_sized_per_the_paper() -> None:
    image = np.full((48, 64, 3), 200, np.uint8)
    boxes = np.asarray([[2, 2, 21, 41], [30, 10, 61, 25]], np.float32)
    out = occlude(image, boxes, 1.0, frame_rng(0, "v", 3))
    np.testing.assert_array_equal(out, occlude(image, boxes, 1.0, frame_rng(0, "v", 3)))
    assert not np.array_equal(out, occlude(image, boxes, 1.0, frame_rng(0, "v", 4)))
    zero = (out == 0).all(axis=2)
    inside = np.zeros_like(zero)
    for xmin, ymin, xmax, ymax in boxes.astype(int):
        inside[ymin:ymax + 1, xmin:xmax + 1] = True
        ys, xs = np.nonzero(zero[ymin:ymax + 1, xmin:xmax + 1])
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        bh, bw = ymax - ymin + 1, xmax - xmin + 1
        assert math.ceil(bh / 2) <= h <= 3 * bh // 4 and math.ceil(bw / 2) <= w <= 3 * bw // 4
        assert zero[ymin:ymax + 1, xmin:xmax + 1].sum() == h * w  # one solid rectangle
    assert not zero[~inside].any()
    np.testing.assert_array_equal(occlude(image, boxes, 0.0, frame_rng(0, "v", 3)), image)
    assert image.min() == 200  # input untouched


def test_eval_occlusion_is_the_same_whatever_the_protocol_or_order(val_root: Path) -> None:
    videos, _ = read_vid(val_root, "val", progress=False)

    def frame(cfg: DataConfig, video: str, index: int) -> torch.Tensor:
        for b in torch.utils.data.DataLoader(EvalClipDataset(videos, cfg, S), batch_size=1,
                                             collate_fn=collate_clips):
            for t in range(len(b["boxes"])):
                if b["video"][t][0] == video and int(b["frame_index"][t, 0]) == index:
                    return b["images"][t, 0]
        raise AssertionError("frame not found")

    name = "ILSVRC2015_val_00000000"
    occluded = DataConfig(clip_length=3, occlusion_p=1.0, eval_protocol=EvalProtocol.full)
    other = DataConfig(clip_length=2, occlusion_p=1.0, minival_frames=20, seed=7)
    clean = DataConfig(clip_length=3, eval_protocol=EvalProtocol.full)
    torch.testing.assert_close(frame(occluded, name, 4), frame(other, name, 4))
    assert not torch.equal(frame(occluded, name, 4), frame(clean, name, 4))


def test_corrupt_jpeg_is_skipped_counted_and_raises_when_strict(tmp_path: Path) -> None:
    root = make_val_tree(tmp_path, {"ILSVRC2015_val_00000000": 6}, boxes_fn)
    bad = root / "Data/VID/val/ILSVRC2015_val_00000000/000001.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    videos, _ = read_vid(root, "val", progress=False)
    cfg = DataConfig(clip_length=2, eval_protocol=EvalProtocol.full)
    ds = EvalClipDataset(videos, cfg, S)
    with pytest.warns(VidDataWarning, match="000001.JPEG"):
        samples = list(ds)
    assert [s["frame_index"].tolist() for s in samples] == [[2, 3], [4, 5]]
    assert samples[0]["reset"][0]  # state restarts after the skipped clip
    assert ds.counters.summary().corrupt_jpeg == 1
    with pytest.raises(VidDataError, match=str(bad)):
        list(EvalClipDataset(videos, DataConfig(clip_length=2, strict=True), S))
    train = TrainClipDataset(videos, DataConfig(clip_length=2, batch_size=1), S)
    with pytest.warns(VidDataWarning, match="000001.JPEG"):
        got = [int(s["frame_index"][0]) for s in train]
    assert len(got) == 3 and 0 not in got and train.counters.summary().corrupt_jpeg == 1


def test_config_validation_names_the_key_and_works_with_omegaconf() -> None:
    with pytest.raises(ValueError, match=r"data.clip_length must be >= 1, got 0"):
        DataConfig(clip_length=0).validate()
    with pytest.raises(ValueError, match=r"data.occlusion_p"):
        DataConfig(occlusion_p=1.5).validate()
    with pytest.raises(ValueError, match=r"data.augment.area_min"):
        DataConfig(augment=AugmentConfig(area_min=0.0)).validate()
    conf = OmegaConf.merge(OmegaConf.structured(DataConfig),
                           {"eval_protocol": "full", "augment": {"flip_prob": 0.0}})
    cfg = OmegaConf.to_object(conf)
    assert cfg.eval_protocol is EvalProtocol.full and cfg.augment.flip_prob == 0.0
    cfg.validate()


def test_datamodule_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "vid"
    make_train_tree(root, {f"ILSVRC2015_train_{k:08d}": 6 for k in range(3)}, boxes_fn)
    make_val_tree(root, {"ILSVRC2015_val_00000000": 4}, boxes_fn)
    cfg = DataConfig(clip_length=3, batch_size=2, max_train_videos=2,
                     cache_dir=str(tmp_path / "cache"))
    dm = VidClipDataModule(cfg, S, root)
    dm.setup()
    assert [v.name for v in dm.train_videos] == ["ILSVRC2015_train_00000000",
                                                 "ILSVRC2015_train_00000001"]
    loader = dm.train_dataloader()
    epochs = [[b["video"][0] for b in loader] for _ in range(2)]
    assert len(loader) == 2 and [len(e) for e in epochs] == [2, 2]
    val = list(dm.val_dataloader())
    assert [len(b["boxes"]) for b in val] == [3, 1] and val[0]["images"].shape[1] == 1
    summary = dm.summary
    assert (summary.videos, summary.frames, summary.problems()) == (3, 16, 0)
    assert "3 videos, 16 frames" in summary.format()
    assert list((tmp_path / "cache").glob("vid_*.pkl"))


def test_a_frame_is_decoded_once_and_again_after_it_changes_on_disk(tmp_path: Path) -> None:
    root = make_val_tree(tmp_path, {"ILSVRC2015_val_00000000": 2}, boxes_fn)
    videos, _ = read_vid(root, "val", progress=False)
    frame, counters = videos[0].frames[0], clips.DecodeCounters()
    first = clips.load_frame(frame, counters, strict=True)
    assert clips.load_frame(frame, counters, strict=True) is first  # from the decode cache
    Image.new("RGB", first.size, (200, 10, 10)).save(frame.image_path)
    again = clips.load_frame(frame, counters, strict=True)
    assert again is not first and again.getpixel((0, 0))[0] > 150  # the new file, not the cached image
