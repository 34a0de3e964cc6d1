"""Streaming video clips of ImageNet VID for LSTM-SSD training and online evaluation.

Training: each video is cut into non-overlapping clips of `clip_length` frames (stride
`frame_stride`); clips are shuffled per epoch and every frame of a clip gets the same augmentation
(lstm_ssd_reproduction.md Sec. 4). Evaluation: frames in order, one video at a time (B = 1),
state reset at the first frame of each video; the "minival" protocol keeps one random window of
`minival_frames` consecutive frames per val video.

Batches (see `collate_clips`) are time-major: images [T, B, 3, S, S].
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.data_config import DataConfig, EvalProtocol  # noqa: F401  (EvalProtocol: re-exported)
from datamodules.transforms import (apply_clip_augmentation, occlude_frame,
                                    sample_clip_augmentation, to_model_input)
from datamodules.vid import (DataSummary, FrameAnno, Video, VidDataError,
                             VidDataWarning, pixel_to_normalized, read_vid)


class DecodeCounters:
    """Image decode problems found while streaming, shared with DataLoader worker processes."""

    KINDS = ("corrupt_jpeg", "size_mismatch")

    def __init__(self) -> None:
        self.counts = torch.zeros(len(self.KINDS), dtype=torch.int64).share_memory_()

    def problem(self, kind: str, path: Path, detail: str, strict: bool) -> None:
        """Raise (strict) or warn and count."""
        if strict:
            raise VidDataError(f"{path}: {detail}")
        self.counts[self.KINDS.index(kind)] += 1
        warnings.warn(f"{path}: {detail}; clip skipped", VidDataWarning, stacklevel=3)

    def summary(self) -> DataSummary:
        return DataSummary(**{k: int(n) for k, n in zip(self.KINDS, self.counts.tolist())})


#: Decoded frames kept in the main process, up to this many bytes of pixels (the synthetic benchmark's 1,280
#: frames take 47 MB; ImageNet VID does not fit, so its first frames stay and the rest are decoded every time).
DECODE_CACHE_BYTES = 512 << 20


class DecodeCache:
    """Decoded RGB frames by (path, mtime, size): with data.num_workers=0 a clip is decoded once per process,
    not once per epoch and evaluation. DataLoader workers do not cache (they live one epoch, in which each
    frame is read once). Callers never modify a returned image (PIL crop/resize/transpose make new ones)."""

    def __init__(self, max_bytes: int = DECODE_CACHE_BYTES) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.images: dict[tuple, Image.Image] = {}

    def get(self, path: Path) -> tuple[tuple, Image.Image | None]:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        return key, self.images.get(key)

    def put(self, key: tuple, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if key not in self.images and self.bytes + size <= self.max_bytes and get_worker_info() is None:
            self.images[key] = image
            self.bytes += size


_DECODED = DecodeCache()


def load_frame(frame: FrameAnno, counters: DecodeCounters, strict: bool) -> Image.Image | None:
    """Decode one frame as RGB (or take it from the decode cache); None (warned, counted) if the JPEG is
    corrupt or has the wrong size."""
    try:
        key, image = _DECODED.get(Path(frame.image_path))
        if image is None:
            with Image.open(frame.image_path) as im:
                image = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        counters.problem("corrupt_jpeg", frame.image_path, f"cannot decode JPEG ({err})", strict)
        return None
    if image.size != (frame.width, frame.height):
        counters.problem("size_mismatch", frame.image_path,
                         f"image is {image.size[0]}x{image.size[1]} but its XML <size> says "
                         f"{frame.width}x{frame.height}", strict)
        return None
    _DECODED.put(key, image)
    return image


def _name_rng(*parts: Any) -> np.random.Generator:
    """Generator seeded from a hash of its arguments (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _rank_world(rank: int, world_size: int) -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the given values."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank, world_size


def training_clips(videos: list[Video], clip_length: int,
                   frame_stride: int) -> tuple[list[tuple[int, int]], int]:
    """Non-overlapping training clips as (video index, first frame position), and the number of
    videos too short for any clip (these are skipped, never padded).

    With frame_stride s, frame positions p, p+s, ... form s interleaved sequences (p = 0..s-1);
    each is cut into windows of clip_length, so every frame is in at most one clip and a trailing
    remainder shorter than clip_length is dropped.
    """
    clips, short = [], 0
    for v, video in enumerate(videos):
        n = len(video.frames)
        found = 0
        for phase in range(frame_stride):
            usable = len(range(phase, n, frame_stride)) // clip_length
            for k in range(usable):
                clips.append((v, phase + k * clip_length * frame_stride))
            found += usable
        short += found == 0
    return clips, short


def minival_window(name: str, length: int, frames: int, seed: int) -> tuple[int, int]:
    """Minival protocol for one video of `length` frames: a random window (start, length) of
    `frames` consecutive frames, seeded by (seed, video name); a shorter video is taken whole."""
    start = int(_name_rng("minival", seed, name).integers(0, length - frames + 1)) if length > frames else 0
    return start, min(length, frames)


def minival_windows(videos: list[Video], frames: int, seed: int) -> dict[str, tuple[int, int]]:
    """`minival_window` of every video, by name."""
    return {video.name: minival_window(video.name, len(video.frames), frames, seed) for video in videos}


class TrainClipDataset(IterableDataset):
    """Shuffled training clips, sharded over (rank, DataLoader worker).

    Each epoch the clips are permuted by (seed, epoch) and split into world_size * num_workers
    equal shards of floor(N / (world_size * num_workers * batch_size)) * batch_size clips: the
    remainder (< world_size*num_workers*batch_size clips, different each epoch) is DROPPED, so
    every rank yields the same number of full batches. A clip whose JPEG fails to decode is
    skipped and replaced by re-yielding an earlier good clip of the same shard (same count).
    `num_workers` must equal the DataLoader's num_workers (0 and 1 both mean one shard).
    """

    def __init__(self, videos: list[Video], cfg: DataConfig, input_size: int, rank: int = 0,
                 world_size: int = 1, counters: DecodeCounters | None = None) -> None:
        self.videos, self.cfg, self.input_size = list(videos), cfg, input_size
        self.clips, self.short_videos = training_clips(self.videos, cfg.clip_length,
                                                       cfg.frame_stride)
        # resolved here, in the main process: spawned workers do not see torch.distributed
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.counters = counters if counters is not None else DecodeCounters()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by live workers
        self._skip = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation of this epoch (and hand out every batch of it)."""
        self._epoch.fill_(epoch)
        self._skip.zero_()

    def set_skip_batches(self, batches: int) -> None:
        """Start the current epoch after its first `batches` batches, without decoding them (resume).

        The DataLoader takes batch b from worker b % num_workers and always starts at worker 0, so
        worker w plays shard (w + batches) % num_workers and drops that shard's share of the first
        `batches`. The rest of the epoch is exactly what an uninterrupted run yields unless
        a JPEG in the dropped part is corrupt (an uninterrupted run would have replaced that clip)."""
        self._skip.fill_(max(0, int(batches)))

    def _clips_per_shard(self, shards: int) -> int:
        per = len(self.clips) // (shards * self.cfg.batch_size) * self.cfg.batch_size
        if per == 0:
            raise ValueError(
                f"{len(self.clips)} training clips cannot fill one batch of "
                f"data.batch_size={self.cfg.batch_size} for each of {shards} shards "
                f"(ranks x data.num_workers); use more videos or smaller batch_size/num_workers")
        return per

    def __len__(self) -> int:
        """Clips this rank yields per epoch (assumes the DataLoader uses cfg.num_workers)."""
        _, world = _rank_world(self.rank, self.world_size)
        workers = max(1, self.cfg.num_workers)
        return self._clips_per_shard(world * workers) * workers

    def shard_clips(self, worker_id: int, num_workers: int) -> list[tuple[int, int]]:
        """Clips (video index, start) of this rank's worker `worker_id` for the current epoch."""
        rank, world = _rank_world(self.rank, self.world_size)
        shards = world * num_workers
        per = self._clips_per_shard(shards)
        order = np.random.default_rng([self.cfg.seed, int(self._epoch)]).permutation(len(self.clips))
        shard = rank * num_workers + worker_id
        return [self.clips[i] for i in order[shard * per:(shard + 1) * per]]

    def load_clip(self, clip: tuple[int, int]) -> dict[str, Any] | None:
        """Decode and augment one clip (same ClipAug for all frames); None if a JPEG is bad."""
        v, start = clip
        video, cfg = self.videos[v], self.cfg
        frames = [video.frames[start + j * cfg.frame_stride] for j in range(cfg.clip_length)]
        rng = np.random.default_rng([cfg.seed, int(self._epoch), v, start])
        aug = sample_clip_augmentation(rng, frames[0].width, frames[0].height, cfg.augment,
                                       frames[0].boxes)
        images, boxes, labels = [], [], []
        for frame in frames:
            image = load_frame(frame, self.counters, cfg.strict)
            if image is None:
                return None
            tensor, b, lab, _ = apply_clip_augmentation(image, frame.boxes, frame.labels, aug,
                                                        self.input_size)
            images.append(tensor)
            boxes.append(b)
            labels.append(lab)
        reset = torch.zeros(len(frames), dtype=torch.bool)
        reset[0] = True  # training clips always start from a zero state
        return _sample(video.name, frames, torch.stack(images), boxes, labels, reset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != max(1, self.cfg.num_workers):
            raise ValueError(f"TrainClipDataset was built for data.num_workers="
                             f"{self.cfg.num_workers} but runs in {num_workers} workers")
        skip = int(self._skip)
        # a resumed pass's first batch comes from worker 0 but is global batch `skip`: rotate the shards
        shard = (worker_id + skip) % num_workers
        planned = self.shard_clips(shard, num_workers)
        dropped = len(range(shard, skip, num_workers)) * self.cfg.batch_size
        good = planned[:dropped]  # handed out before a resume: assumed decodable, usable as refills
        for clip in planned[dropped:]:
            sample = self.load_clip(clip)
            if sample is not None:
                good.append(clip)
                yield sample
        missing, attempts = len(planned) - len(good), 0
        while missing:  # refill skipped clips so that every rank yields the same batch count
            if not good or attempts > 2 * len(good):
                raise RuntimeError(f"worker {worker_id} of rank {self.rank}: no decodable clip "
                                   f"left to replace {missing} skipped clips")
            sample = self.load_clip(good[attempts % len(good)])
            attempts += 1
            if sample is not None:
                missing -= 1
                yield sample


def _sample(name: str, frames: list[FrameAnno], images: torch.Tensor, boxes: list[torch.Tensor],
            labels: list[torch.Tensor], reset: torch.Tensor) -> dict[str, Any]:
    """One clip as a dict of per-frame entries (collate_clips makes them [T, B])."""
    return {"images": images, "boxes": boxes, "labels": labels, "reset": reset, "video": name,
            "frame_index": torch.tensor([f.frame_index for f in frames], dtype=torch.int64),
            "orig_size": torch.tensor([[f.height, f.width] for f in frames], dtype=torch.int64)}


def _balance_videos(videos: list[Video], lengths: dict[str, int], world: int) -> list[list[int]]:
    """Assign whole videos to ranks, longest first to the least loaded rank (ties: lower rank)."""
    load, owned = [0] * world, [[] for _ in range(world)]
    for v in sorted(range(len(videos)), key=lambda i: (-lengths[videos[i].name], videos[i].name)):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += lengths[videos[v].name]
        owned[r].append(v)
    return [sorted(o, key=lambda i: videos[i].name) for o in owned]


class EvalClipDataset(IterableDataset):
    """Val frames in order as clips of <= clip_length frames of one video (B = 1 stream).

    reset is True at the first evaluated frame of each video and at the first frame after a
    skipped (undecodable) clip. Videos are assigned whole to ranks (balanced by frame count); the
    stream must be read by at most one DataLoader worker so its order is kept.
    """

    def __init__(self, videos: list[Video], cfg: DataConfig, input_size: int, rank: int = 0,
                 world_size: int = 1, counters: DecodeCounters | None = None) -> None:
        self.videos, self.cfg, self.input_size = list(videos), cfg, input_size
        if cfg.eval_protocol is EvalProtocol.minival:
            self.windows = minival_windows(self.videos, cfg.minival_frames, cfg.minival_seed)
        else:
            self.windows = {v.name: (0, len(v.frames)) for v in self.videos}
        self.rank, self.world_size = _rank_world(rank, world_size)  # in the main process
        self.counters = counters if counters is not None else DecodeCounters()

    def rank_clips(self) -> list[tuple[int, int, int]]:
        """(video index, first position, length) of this rank's clips, in stream order."""
        rank, world = _rank_world(self.rank, self.world_size)
        lengths = {name: n for name, (_, n) in self.windows.items()}
        out = []
        for v in _balance_videos(self.videos, lengths, world)[rank]:
            start, n = self.windows[self.videos[v].name]
            for s in range(start, start + n, self.cfg.clip_length):
                out.append((v, s, min(self.cfg.clip_length, start + n - s)))
        return out

    def load_clip(self, v: int, start: int, length: int, reset_first: bool) -> dict[str, Any] | None:
        """Decode, optionally occlude (deterministic per frame), resize; None if a JPEG is bad."""
        video, cfg = self.videos[v], self.cfg
        frames = list(video.frames[start:start + length])
        images, boxes = [], []
        for frame in frames:
            image = load_frame(frame, self.counters, cfg.strict)
            if image is None:
                return None
            if cfg.occlusion_p > 0:
                image = Image.fromarray(occlude_frame(
                    np.asarray(image), frame.boxes, cfg.occlusion_p, cfg.occlusion_seed,
                    video.name, frame.frame_index))
            images.append(to_model_input(image, self.input_size))
            boxes.append(torch.from_numpy(pixel_to_normalized(frame.boxes, frame.width,
                                                              frame.height)))
        reset = torch.zeros(length, dtype=torch.bool)
        reset[0] = reset_first
        sample = _sample(video.name, frames, torch.stack(images), boxes,
                         [torch.from_numpy(f.labels) for f in frames], reset)
        sample["gt_boxes_px"] = [torch.from_numpy(f.boxes) for f in frames]
        sample["gt_labels"] = [torch.from_numpy(f.labels) for f in frames]
        sample["gt_track_ids"] = [torch.from_numpy(f.track_ids) for f in frames]
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("EvalClipDataset is an ordered stream: read it with num_workers <= 1")
        previous, skipped = -1, False
        for v, start, length in self.rank_clips():
            reset_first = v != previous or skipped
            previous = v
            sample = self.load_clip(v, start, length, reset_first)
            skipped = sample is None
            if sample is not None:
                yield sample


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack clips time-major: images [T,B,3,S,S], reset/frame_index [T,B], orig_size [T,B,2];
    boxes/labels (and eval gt_boxes_px/gt_labels/gt_track_ids) as lists [T][B] of tensors."""
    lengths = {len(s["boxes"]) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"clips of one batch must have equal length, got {sorted(lengths)}")
    steps = range(lengths.pop())
    batch: dict[str, Any] = {
        key: torch.stack([s[key] for s in samples], dim=1)
        for key in ("images", "reset", "frame_index", "orig_size")}
    batch["video"] = [[s["video"] for s in samples] for _ in steps]
    for key in ("boxes", "labels", "gt_boxes_px", "gt_labels", "gt_track_ids"):
        if key in samples[0]:
            batch[key] = [[s[key][t] for s in samples] for t in steps]
    return batch


class EpochDataLoader(DataLoader):
    """DataLoader that tells its dataset the epoch (Lightning only does so for samplers)."""

    def __init__(self, dataset: TrainClipDataset, epoch_fn: Callable[[], int | None],
                 **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_fn, self._iterations = epoch_fn, 0
        self.skip_batches = 0  # the next pass starts after this many batches (resume); then 0 again

    def __iter__(self) -> Any:
        epoch = self.epoch_fn()
        self.dataset.set_epoch(self._iterations if epoch is None else epoch)
        self.dataset.set_skip_batches(self.skip_batches)
        self._iterations, self.skip_batches = self._iterations + 1, 0
        return super().__iter__()


class VidClipDataModule(pl.LightningDataModule):
    """Training clips and the online evaluation stream of one VID-layout root."""

    def __init__(self, cfg: DataConfig, input_size: int, root: Path | str) -> None:
        super().__init__()
        cfg.validate()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        self.cfg, self.input_size, self.root = cfg, int(input_size), Path(root)
        self.counters = DecodeCounters()
        self.train_videos: list[Video] | None = None
        self.val_videos: list[Video] | None = None
        self._summaries: dict[str, DataSummary] = {}

    def _read(self, split: str, limit: int | None) -> list[Video]:
        """read_vid (cached on disk with data.cache_dir, and in this process), keeping the first `limit`
        videos by name."""
        videos, summary = read_vid(self.root, split, strict=self.cfg.strict,
                                   cache_dir=self.cfg.cache_dir, memo=True)
        videos = videos[:limit] if limit is not None else videos
        kept = DataSummary(videos=len(videos), frames=sum(len(v.frames) for v in videos),
                           boxes=sum(len(f.labels) for v in videos for f in v.frames))
        summary = DataSummary(**{**vars(summary), **{k: getattr(kept, k)
                                                     for k in ("videos", "frames", "boxes")}})
        self._summaries[split] = summary
        return videos

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_videos is None:
            self.train_videos = self._read(self.cfg.train_split, self.cfg.max_train_videos)
            _, short = training_clips(self.train_videos, self.cfg.clip_length, self.cfg.frame_stride)
            self._summaries[self.cfg.train_split].short_video = short
        if stage in (None, "fit", "validate", "test") and self.val_videos is None:
            self.val_videos = self._read(self.cfg.val_split, self.cfg.max_val_videos)

    @property
    def summary(self) -> DataSummary:
        """All splits read so far plus decode problems found while streaming."""
        total = self.counters.summary()
        for s in self._summaries.values():
            total = total.merged(s)
        return total

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> DataLoader:
        if self.train_videos is None:
            self.setup("fit")
        dataset = TrainClipDataset(self.train_videos, self.cfg, self.input_size,
                                   counters=self.counters)
        return EpochDataLoader(dataset, self._current_epoch, batch_size=self.cfg.batch_size,
                               collate_fn=collate_clips, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_videos is None:
            self.setup("validate")
        dataset = EvalClipDataset(self.val_videos, self.cfg, self.input_size,
                                  counters=self.counters)
        return DataLoader(dataset, batch_size=1, collate_fn=collate_clips,
                          num_workers=min(self.cfg.num_workers, 1))
