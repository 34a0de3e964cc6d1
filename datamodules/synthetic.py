"""tafm's built-in synthetic benchmark, written in the ImageNet VID 2015 on-disk format.

Lets users without ImageNet VID reproduce the paper's qualitative findings (a Bottleneck-LSTM
detector beats a single-frame SSD, more so under occlusion, paper Table 6) on a CPU in minutes.
Frames are `size` x round(3/4 * size) (width x height, 4:3). See SYNTH_MECHANISM for why temporal
context helps; scene sampling and rendering live in synthetic_render.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from datamodules.synthetic_render import (
    MARKER_BLEND, MARKER_HALF_WIDTH, MARKER_STYLE, MARKER_STYLES, MIN_VISIBLE_PX, OCCLUDED_FRACTION, ObjectFrame,
    class_appearance, marker_names, render_frame, sample_scene)
from datamodules.vid import VID_CLASSES  # the one class table (id, name, WordNet id)

GENERATOR_VERSION = 2  # bump whenever the output for a given config changes
MANIFEST = "tafm_synth.json"
MINIVAL_WINDOW = 20  # minival takes 20 consecutive frames per val video (reproduction notes, Sec. 4)
JPEG_KW = {"format": "JPEG", "quality": 92, "subsampling": 0, "optimize": False}

_BY_NAME = {name: (cid, wnid) for cid, name, wnid in VID_CLASSES}

SYNTH_MECHANISM = """\
**Why temporal context helps on the synthetic benchmark.** Classes come in look-alike pairs
(default: horse/zebra, car/bus, bear/giant_panda): both members of a pair have the same silhouette
and colour and differ only by a marker (the whole object tinted 40% of the way towards cyan vs magenta;
`marker_blend`, 0.5 before 82c475a)
that is drawn on each frame independently with probability `cue_prob` (default 0.35). On the other ~65%
of frames the two classes are pixel-identical, so a single-frame detector can at best split its
confidence between them, while a recurrent one can carry the class seen a few frames earlier
(0.65^10 = 1.3% of 10-frame windows never show the marker). Objects also fade to 35-60% opacity on
`fade_prob` of frames, whole frames flicker (brightness x0.5-0.7 or x1.3-1.6 and triple noise) on
`flicker_prob` of frames, and grey bars sweep across the scene and hide parts or all of objects
(occluded=1 when >= 25% of the in-frame silhouette is hidden); boxes always cover the whole
silhouette, so locating a half-hidden object is easier for a model that saw it move smoothly."""


@dataclass
class SynthConfig:
    """Every default of the synthetic benchmark. Consecutive classes form look-alike pairs."""
    # 96 + 32 (was 24 + 8): with 24 videos a single-frame SSD was bound by generalisation (10x the
    # videos lifted its val mAP from 13 to 23 at the same steps), and 8 val videos held one track of
    # some classes, so one seed's mAP moved by several points with a single track
    videos: int = 96                  # train snippets
    val_videos: int = 32              # val snippets
    frames: int = 40                  # frames per train snippet
    val_frames: int | None = None     # frames per val snippet; None: max(frames, 20)
    size: int = 128                   # frame width in px; height = round(size * 3 / 4)
    seed: int = 0
    classes: tuple[str, ...] = ("horse", "zebra", "car", "bus", "bear", "giant_panda")
    max_objects: int = 3              # object tracks per video: uniform in 1..max_objects
    cue_prob: float = 0.35            # per object and frame: class marker drawn
    marker_width: float = MARKER_HALF_WIDTH  # marker band half-width, fraction of the object's half-size (1: whole)
    marker_blend: float = MARKER_BLEND       # how far the marker moves towards white / black or its cue colour
    marker_style: str = MARKER_STYLE  # "colour" (cyan/magenta), "band" (light/dark band), "tint" (whole object)
    fade_prob: float = 0.15           # per object and frame: object drawn at 35-60% opacity
    flicker_prob: float = 0.15        # per frame: brightness jump and 3x noise
    noise_std: float = 0.05           # per-pixel Gaussian noise std, fraction of 255
    occluder_prob: float = 0.6        # per video, each of max_occluders bars is present with this probability
    max_occluders: int = 2

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        self.validate()

    @property
    def width(self) -> int:
        return self.size

    @property
    def height(self) -> int:
        return int(round(self.size * 3 / 4))

    @property
    def frames_val(self) -> int:
        return self.val_frames if self.val_frames is not None else max(self.frames, MINIVAL_WINDOW)

    def validate(self) -> None:
        """Raise ValueError naming the first bad key and its valid range."""
        ints = {"videos": (1, 100_000), "val_videos": (1, 100_000), "frames": (2, 100_000),
                "size": (32, 1280), "seed": (0, 2**63 - 1), "max_objects": (1, 10), "max_occluders": (0, 5)}
        for key, (lo, hi) in ints.items():
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or not lo <= val <= hi:
                raise ValueError(f"SynthConfig.{key}={val!r}: must be an integer in [{lo}, {hi}]")
        if self.val_frames is not None and (
                isinstance(self.val_frames, bool) or not isinstance(self.val_frames, (int, np.integer))
                or not MINIVAL_WINDOW <= self.val_frames <= 100_000):
            raise ValueError(f"SynthConfig.val_frames={self.val_frames!r}: must be None or an integer in "
                             f"[{MINIVAL_WINDOW}, 100000] (minival takes {MINIVAL_WINDOW} frames per val video)")
        for key in ("cue_prob", "marker_width", "marker_blend", "fade_prob", "flicker_prob", "occluder_prob",
                    "noise_std"):
            val, hi = getattr(self, key), 0.5 if key == "noise_std" else 1.0
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= val <= hi:
                raise ValueError(f"SynthConfig.{key}={val!r}: must be a number in [0, {hi}]")
        if self.marker_style not in MARKER_STYLES:
            raise ValueError(f"SynthConfig.marker_style={self.marker_style!r}: must be one of "
                             f"{', '.join(MARKER_STYLES)}")
        valid = ", ".join(_BY_NAME)
        if not 1 <= len(self.classes) <= 30:
            raise ValueError(f"SynthConfig.classes: needs 1 to 30 VID class names, got {len(self.classes)}; "
                             f"valid names: {valid}")
        for name in self.classes:
            if name not in _BY_NAME:
                raise ValueError(f"SynthConfig.classes: unknown class {name!r}; valid names: {valid}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"SynthConfig.classes: duplicate names in {self.classes}")


def config_dict(cfg: SynthConfig) -> dict:
    """JSON-ready config (tuples become lists), as stored in the manifest."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: SynthConfig) -> str:
    """Short hash of the config and generator version; names the cache folder."""
    blob = json.dumps({"version": GENERATOR_VERSION, "config": config_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def snippet_name(split: str, index: int) -> str:
    """Snippet path under Data/VID/<split> (also its XML <folder>); train has the batch level."""
    if split == "train":
        return f"ILSVRC2015_VID_train_{index // 1000:04d}/ILSVRC2015_train_{index:08d}"
    return f"ILSVRC2015_val_{index:08d}"


def render_video(cfg: SynthConfig, split: str, index: int) -> Iterator[tuple[np.ndarray, list[ObjectFrame]]]:
    """Yield (uint8 image [H, W, 3], per-object ground truth and generator state) for every frame.

    Seeded from (cfg.seed, split, index) alone, so a video does not depend on the others.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: must be 'train' or 'val'")
    split_code = 0 if split == "train" else 1
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, split_code, index])))
    frames = cfg.frames if split == "train" else cfg.frames_val
    scene = sample_scene(rng, len(cfg.classes), cfg.width, cfg.height, frames, cfg.max_objects,
                         cfg.cue_prob, cfg.fade_prob, cfg.flicker_prob, cfg.noise_std,
                         cfg.occluder_prob, cfg.max_occluders, cfg.marker_width, cfg.marker_blend,
                         cfg.marker_style)
    for t in range(frames):
        yield render_frame(scene, t, rng)


def annotation_xml(folder: str, filename: str, width: int, height: int,
                   objects: list[tuple[int, str, tuple[int, int, int, int], int]]) -> str:
    """One VID annotation file; objects are (trackid, wnid, (xmin, ymin, xmax, ymax), occluded)."""
    lines = ["<annotation>", f"\t<folder>{folder}</folder>", f"\t<filename>{filename}</filename>",
             "\t<source>", "\t\t<database>ILSVRC_2015</database>", "\t</source>",
             "\t<size>", f"\t\t<width>{width}</width>", f"\t\t<height>{height}</height>", "\t</size>"]
    for trackid, wnid, (xmin, ymin, xmax, ymax), occluded in objects:
        lines += ["\t<object>", f"\t\t<trackid>{trackid}</trackid>", f"\t\t<name>{wnid}</name>",
                  "\t\t<bndbox>", f"\t\t\t<xmax>{xmax}</xmax>", f"\t\t\t<xmin>{xmin}</xmin>",
                  f"\t\t\t<ymax>{ymax}</ymax>", f"\t\t\t<ymin>{ymin}</ymin>", "\t\t</bndbox>",
                  f"\t\t<occluded>{occluded}</occluded>", "\t\t<generated>0</generated>", "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _write_video(root: Path, cfg: SynthConfig, split: str, index: int) -> tuple[str, int, set[str], dict]:
    """Write one snippet's JPEGs and XMLs; returns (snippet, frames, class names present, counts)."""
    rel = snippet_name(split, index)
    data_dir, ann_dir = root / "Data/VID" / split / rel, root / "Annotations/VID" / split / rel
    data_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    per_frame: list[list[ObjectFrame]] = []
    for t, (img, objects) in enumerate(render_video(cfg, split, index)):
        Image.fromarray(img).save(data_dir / f"{t:06d}.JPEG", **JPEG_KW)
        per_frame.append([o for o in objects if o.annotated])
    trackid: dict[int, int] = {}  # VID track ids: 0.. in order of first annotated appearance
    for objects in per_frame:
        for o in objects:
            trackid.setdefault(o.track, len(trackid))
    present: set[str] = set()
    counts = {"boxes": 0, "occluded": 0, "cue_hidden": 0, "empty_frames": 0}
    for t, objects in enumerate(per_frame):
        rows = []
        for o in sorted(objects, key=lambda o: trackid[o.track]):
            name = cfg.classes[o.class_index]
            present.add(name)
            rows.append((trackid[o.track], _BY_NAME[name][1], o.box, int(o.occluded)))
            counts["occluded"] += int(o.occluded)
            counts["cue_hidden"] += int(not o.cue_visible)
        counts["boxes"] += len(rows)
        counts["empty_frames"] += int(not rows)
        _write_text(ann_dir / f"{t:06d}.xml", annotation_xml(rel, f"{t:06d}", cfg.width, cfg.height, rows))
    return rel, len(per_frame), present, counts


def _write_all(root: Path, cfg: SynthConfig, progress: bool) -> dict:
    """Write both splits and the ImageSets lists into root; returns summary counts."""
    totals = {"boxes": 0, "occluded": 0, "cue_hidden": 0, "empty_frames": 0, "frames": 0}
    # every class gets its list file, empty when no snippet has it: the real ImageSets ship all 30
    train_lists: dict[str, list[str]] = {name: [] for _, name, _ in VID_CLASSES}
    val_lines: list[str] = []
    jobs = [("train", i) for i in range(cfg.videos)] + [("val", i) for i in range(cfg.val_videos)]
    for n, (split, index) in enumerate(jobs):
        rel, frames, present, counts = _write_video(root, cfg, split, index)
        for key, val in counts.items():
            totals[key] += val
        totals["frames"] += frames
        if split == "train":
            for name in present:
                train_lists[name].append(f"{rel} 1")
        else:
            val_lines += [f"{rel}/{t:06d} {len(val_lines) + t + 1}" for t in range(frames)]
        if progress:
            print(f"\rtafm synth: video {n + 1}/{len(jobs)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    sets = root / "ImageSets/VID"
    for name, lines in train_lists.items():
        _write_text(sets / f"train_{_BY_NAME[name][0]}.txt", "".join(line + "\n" for line in lines))
    _write_text(sets / "val.txt", "".join(line + "\n" for line in val_lines))
    return totals


def is_complete(out: Path, cfg: SynthConfig) -> bool:
    """True if out holds a finished generation of exactly this config and generator version."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("version") == GENERATOR_VERSION and manifest.get("config") == config_dict(cfg)


def generate(out: Path, cfg: SynthConfig, progress: bool = True) -> Path:
    """Write the benchmark to `out` (VID layout + tafm_synth.json); returns out.

    Writes into `out.tmp-<pid>` and renames it to `out` when done, so an interrupted run never
    looks complete. Returns at once if `out` already holds this config; raises FileExistsError if
    it holds anything else.
    """
    out = Path(out)
    cfg.validate()
    if is_complete(out, cfg):
        return out
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise FileExistsError(f"{out} exists and is not a synthetic dataset for this config "
                                  f"(no matching {MANIFEST}); delete it or pick another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        totals = _write_all(tmp, cfg, progress)
        markers = marker_names(cfg.marker_style, cfg.marker_width)
        manifest = {
            "format": "tafm synthetic ImageNet VID", "version": GENERATOR_VERSION, "config": config_dict(cfg),
            "width": cfg.width, "height": cfg.height, "counts": totals,
            "classes": [{"id": _BY_NAME[n][0], "name": n, "wnid": _BY_NAME[n][1],
                         "shape": class_appearance(i).shape, "marker": markers[class_appearance(i).marker]}
                        for i, n in enumerate(cfg.classes)],
            "min_visible_px": MIN_VISIBLE_PX, "occluded_fraction": OCCLUDED_FRACTION}
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_complete(out, cfg):  # lost a race to another writer of the same config: use theirs
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_synthetic(root: Path | str | None) -> bool:
    """The built-in benchmark (no root) or a folder written by `tafm data synth` (it has a manifest)."""
    return root is None or (Path(root) / MANIFEST).is_file()


def synthetic_config_of(root: Path | str) -> SynthConfig | None:
    """The generator config a `tafm data synth` folder was written with; None if root has no manifest."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    except OSError:
        return None
    except ValueError as err:
        raise ValueError(f"{Path(root) / MANIFEST}: not valid JSON ({err})") from None
    try:
        cfg = SynthConfig(**manifest["config"])
        if config_dict(cfg) != manifest["config"]:  # a key this version no longer has, or lacks a new one
            raise ValueError("its keys differ from this version's")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{Path(root) / MANIFEST}: not a generator config this version reads ({err}); "
                         "write the dataset again with `tafm data synth`") from None
    return cfg


def synthetic_twin(root: Path | str | None, cue_prob: float, cache_dir: Path | None = None) -> Path:
    """A synthetic dataset (the built-in benchmark if root is None) with the class marker drawn on
    `cue_prob` of frames instead of its own rate: root itself if that is its rate, else its twin, the
    same videos generated once into the cache (`data.synthetic_cue_prob`)."""
    cfg = SynthConfig() if root is None else synthetic_config_of(root)
    if cfg is None:
        raise ValueError(f"data.synthetic_cue_prob={cue_prob}: {root} is not a synthetic dataset (no {MANIFEST}), "
                         "so it has no twin to generate; valid: the built-in benchmark (no data.root) or a folder "
                         "written by `tafm data synth`")
    if root is not None and cfg.cue_prob == cue_prob:
        return Path(root)
    return ensure_synthetic(dataclasses.replace(cfg, cue_prob=cue_prob), cache_dir, progress=False)


def default_cache_dir() -> Path:
    """$TAFM_CACHE if set, else ~/.cache/tafm."""
    env = os.environ.get("TAFM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tafm"


def _remove_stale_tmp(out: Path) -> None:
    """Delete `out.tmp-<pid>` folders whose writer process is gone on this host."""
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass


def ensure_synthetic(cfg: SynthConfig | None = None, cache_dir: Path | None = None,
                     progress: bool = True) -> Path:
    """The cached dataset folder for cfg (`<cache>/synthetic_vid-<hash>`), generated on first use.

    Safe under concurrent calls: one process generates under a file lock, the others wait and reuse it.
    """
    cfg = cfg if cfg is not None else SynthConfig()
    cfg.validate()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / f"synthetic_vid-{config_hash(cfg)}"
    if is_complete(out, cfg):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / f"{out.name}.lock"):
        if is_complete(out, cfg):
            return out
        _remove_stale_tmp(out)
        if out.exists():  # our own cache entry, but unreadable or from another version: rebuild
            shutil.rmtree(out)
        return generate(out, cfg, progress)
