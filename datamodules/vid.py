"""Reader for the ILSVRC2015 VID layout (Data/, Annotations/, ImageSets/; see imagenet_vid.md).

`read_vid(root, split)` returns one `Video` per snippet with its per-frame ground truth in pixel,
0-based inclusive coordinates, plus a `DataSummary` of what was read and what was skipped.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

# The 30 VID classes (id, name, WordNet id) in the canonical alphabetical order (imagenet_vid.md).
VID_CLASSES: tuple[tuple[int, str, str], ...] = (
    (1, "airplane", "n02691156"), (2, "antelope", "n02419796"), (3, "bear", "n02131653"),
    (4, "bicycle", "n02834778"), (5, "bird", "n01503061"), (6, "bus", "n02924116"),
    (7, "car", "n02958343"), (8, "cattle", "n02402425"), (9, "dog", "n02084071"),
    (10, "domestic_cat", "n02121808"), (11, "elephant", "n02503517"), (12, "fox", "n02118333"),
    (13, "giant_panda", "n02510455"), (14, "hamster", "n02342885"), (15, "horse", "n02374451"),
    (16, "lion", "n02129165"), (17, "lizard", "n01674464"), (18, "monkey", "n02484322"),
    (19, "motorcycle", "n03790512"), (20, "rabbit", "n02324045"), (21, "red_panda", "n02509815"),
    (22, "sheep", "n02411705"), (23, "snake", "n01726692"), (24, "squirrel", "n02355227"),
    (25, "tiger", "n02129604"), (26, "train", "n04468005"), (27, "turtle", "n01662784"),
    (28, "watercraft", "n04530566"), (29, "whale", "n02062744"), (30, "zebra", "n02391049"),
)
WNID_TO_ID: dict[str, int] = {wnid: cid for cid, _, wnid in VID_CLASSES}
CLASS_NAMES: tuple[str, ...] = tuple(name for _, name, _ in VID_CLASSES)  # CLASS_NAMES[k-1] = class k

SPLITS = ("train", "val")
MAX_WARNINGS_PER_KIND = 20  # further problems of one kind are only counted (see DataSummary)
_FRAME_RE = re.compile(r"^(\d+)\.(jpeg|xml)$", re.IGNORECASE)

_SNIPPETS = {"train": "ILSVRC2015_VID_train_000N/ILSVRC2015_train_XXXXXXXX", "val": "ILSVRC2015_val_XXXXXXXX"}
_LISTS = {"train": "train_1.txt .. train_30.txt", "val": "val.txt"}


def expected_layout(split: str) -> str:
    """The ILSVRC2015 VID layout of one split, on one line (for error messages)."""
    snippets = _SNIPPETS.get(split, "<snippet>")
    return (f"expected ILSVRC2015 VID layout: <root>/Data/VID/{split}/{snippets}/%06d.JPEG and "
            f"<root>/Annotations/VID/{split}/{snippets}/%06d.xml, with the lists "
            f"<root>/ImageSets/VID/{_LISTS.get(split, '<split>.txt')} (optional: else the tree is walked)")


class VidLayoutError(ValueError):
    """The dataset root does not have the ILSVRC2015 VID folder layout."""


class VidDataError(ValueError):
    """A file of the dataset is bad (raised instead of skipping when strict=True)."""


class VidDataWarning(UserWarning):
    """A bad file or box was skipped (strict=False)."""


@dataclass(frozen=True, eq=False)
class FrameAnno:
    """Ground truth of one frame: pixel 0-based inclusive xyxy boxes, labels in 1..30."""

    image_path: Path
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float32 (xmin, ymin, xmax, ymax), inclusive pixels
    labels: np.ndarray  # [N] int64 in 1..30
    track_ids: np.ndarray  # [N] int64 (<trackid>)
    occluded: np.ndarray  # [N] bool (<occluded>)
    generated: np.ndarray  # [N] bool (<generated>: interpolated box)

    @property
    def frame_index(self) -> int:
        """Frame number in the snippet (the file name, e.g. 000042.JPEG -> 42)."""
        return int(self.image_path.stem)


@dataclass(frozen=True, eq=False)
class Video:
    """One snippet: its name (e.g. ILSVRC2015_val_00000000) and its frames in frame order."""

    name: str
    frames: tuple[FrameAnno, ...]


@dataclass
class DataSummary:
    """What a read produced and what was skipped, per problem kind."""

    videos: int = 0
    frames: int = 0
    boxes: int = 0
    list_fallback: int = 0  # splits read by walking the tree because ImageSets lists were missing
    missing_video: int = 0  # listed snippet with neither a Data nor an Annotations folder
    empty_video: int = 0  # snippet left with no readable frame (dropped)
    malformed_xml: int = 0  # frame skipped
    missing_xml: int = 0  # frame skipped
    missing_jpeg: int = 0  # frame skipped
    malformed_object: int = 0  # <object> with a missing/non-numeric field: box skipped
    unknown_wnid: int = 0  # box skipped
    box_degenerate: int = 0  # xmax < xmin or ymax < ymin: box skipped
    box_outside: int = 0  # xmin < 0, ymin < 0, xmax >= width or ymax >= height: box skipped
    corrupt_jpeg: int = 0  # clip skipped when decoding failed (counted per decode attempt)
    size_mismatch: int = 0  # decoded JPEG size differs from the XML <size>: clip skipped
    short_video: int = 0  # training videos too short for one clip (not used for training)

    PROBLEMS = ("missing_video", "empty_video", "malformed_xml", "missing_xml", "missing_jpeg",
                "malformed_object", "unknown_wnid", "box_degenerate", "box_outside",
                "corrupt_jpeg", "size_mismatch", "short_video")

    def merged(self, other: DataSummary) -> DataSummary:
        """Field-wise sum of two summaries."""
        return DataSummary(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                              for f in fields(self)})

    def problems(self) -> int:
        """Total number of skipped items of any kind."""
        return sum(getattr(self, k) for k in self.PROBLEMS)

    def format(self) -> str:
        """Multi-line human summary, e.g. to print after reading."""
        lines = [f"ImageNet VID: {self.videos} videos, {self.frames} frames, {self.boxes} boxes"]
        if self.list_fallback:
            lines.append("  ImageSets lists missing: snippets found by walking the folder tree")
        bad = [(k, getattr(self, k)) for k in self.PROBLEMS if getattr(self, k)]
        if not bad:
            lines.append("  no problems found")
        for kind, n in bad:
            lines.append(f"  skipped: {kind.replace('_', ' ')}: {n}")
        return "\n".join(lines)


class _Reporter:
    """Counts problems in a DataSummary; warns (first few per kind) or raises when strict."""

    def __init__(self, summary: DataSummary, strict: bool) -> None:
        self.summary, self.strict = summary, strict
        self.warned: dict[str, int] = {}

    def problem(self, kind: str, path: Path, detail: str) -> None:
        if self.strict:
            raise VidDataError(f"{path}: {detail}")
        setattr(self.summary, kind, getattr(self.summary, kind) + 1)
        n = self.warned.get(kind, 0)
        self.warned[kind] = n + 1
        if n < MAX_WARNINGS_PER_KIND:
            warnings.warn(f"{path}: {detail}; skipped", VidDataWarning, stacklevel=3)
        elif n == MAX_WARNINGS_PER_KIND:
            warnings.warn(f"more '{kind}' problems: only counted from now on (see DataSummary)",
                          VidDataWarning, stacklevel=3)


def _affine(boxes: Any, scale: list[float], offset: list[float], first_offset: bool) -> Any:
    """(boxes + offset) * scale or boxes * scale + offset, per xyxy column; numpy or torch."""
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded: the reader itself never imports it
    if torch is not None and isinstance(boxes, torch.Tensor):
        boxes = boxes if boxes.is_floating_point() else boxes.float()
        s, o = boxes.new_tensor(scale), boxes.new_tensor(offset)
    else:
        boxes = np.asarray(boxes)
        boxes = boxes if np.issubdtype(boxes.dtype, np.floating) else boxes.astype(np.float32)
        s, o = np.asarray(scale, boxes.dtype), np.asarray(offset, boxes.dtype)
    return (boxes + o) * s if first_offset else boxes * s + o


def pixel_to_normalized(boxes: Any, width: int, height: int) -> Any:
    """Inclusive pixel xyxy -> normalized xyxy: (xmin/W, ymin/H, (xmax+1)/W, (ymax+1)/H)."""
    return _affine(boxes, [1 / width, 1 / height, 1 / width, 1 / height], [0, 0, 1, 1], True)


def normalized_to_pixel(boxes: Any, width: int, height: int) -> Any:
    """Normalized xyxy -> inclusive pixel xyxy: (x0*W, y0*H, x1*W - 1, y1*H - 1)."""
    return _affine(boxes, [width, height, width, height], [0, 0, -1, -1], False)


def _check_layout(root: Path, split: str) -> None:
    """Raise VidLayoutError (one line) naming the first missing folder of the VID layout."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not root.exists():
        raise VidLayoutError(f"ImageNet VID root {root} does not exist; {expected_layout(split)}")
    if not root.is_dir():
        raise VidLayoutError(f"ImageNet VID root {root} is a file, not a folder; {expected_layout(split)}")
    for sub in ("Data", "Annotations"):
        folder = root / sub / "VID" / split
        if not folder.is_dir():
            raise VidLayoutError(f"ImageNet VID root {root} has no folder {sub}/VID/{split} "
                                 f"(looked for {folder}); {expected_layout(split)}")


def _list_files(root: Path, split: str) -> list[Path]:
    """Official ImageSets lists of a split: train_1..30.txt or val.txt."""
    sets = root / "ImageSets" / "VID"
    if split == "train":
        return [sets / f"train_{k}.txt" for k in range(1, 31)]
    return [sets / "val.txt"]


def _read_list(path: Path) -> list[str]:
    """First column of each non-empty line of an ImageSets list; errors name file and line."""
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise VidLayoutError(f"{path}:{lineno}: expected '<name> <integer>', got {line!r}")
        out.append(parts[0])
    return out


def _snippets_from_lists(lists: list[Path], split: str) -> dict[str, list[str] | None]:
    """Snippet -> listed frame stems (val.txt) or None (train lists name snippets only)."""
    snippets: dict[str, list[str] | None] = {}
    for path in lists:
        for entry in _read_list(path):
            if split == "train":
                snippets.setdefault(entry, None)  # listed once per class it contains: dedupe
            else:
                snippet, _, stem = entry.rpartition("/")
                if not snippet:
                    raise VidLayoutError(f"{path}: expected '<snippet>/<frame> <index>', got {entry!r}")
                frames = snippets.setdefault(snippet, [])
                assert frames is not None
                frames.append(stem)
    return snippets


def _snippets_from_tree(root: Path, split: str) -> dict[str, list[str] | None]:
    """Snippets found in Data/ or Annotations/ (train has one batch-folder level, val none)."""
    depth = 2 if split == "train" else 1
    names: set[str] = set()
    for sub in ("Data", "Annotations"):
        base = root / sub / "VID" / split
        level = [base]
        for _ in range(depth):
            level = [d for parent in level for d in sorted(parent.iterdir()) if d.is_dir()]
        names.update(d.relative_to(base).as_posix() for d in level)
    return {name: None for name in sorted(names)}


def _frame_files(folder: Path) -> dict[str, str]:
    """Stem -> file name of the numbered frame files (%06d.JPEG or %06d.xml) in a folder."""
    if not folder.is_dir():
        return {}
    out = {}
    with os.scandir(folder) as it:
        for entry in it:
            m = _FRAME_RE.match(entry.name)
            if m:
                out[m.group(1)] = entry.name
    return out


def _int_field(elem: ET.Element, tag: str) -> int:
    """Integer text of a child element; ValueError names the tag when missing or bad."""
    text = elem.findtext(tag)
    if text is None:
        raise ValueError(f"missing <{tag}>")
    try:
        return int(round(float(text)))
    except ValueError:
        raise ValueError(f"<{tag}> is {text!r}, not a number") from None


def parse_annotation(xml_path: Path, image_path: Path, rep: _Reporter) -> FrameAnno | None:
    """One VID annotation XML -> FrameAnno; bad boxes are skipped, a bad file gives None."""
    try:
        root = ET.parse(xml_path).getroot()
        if root.tag != "annotation":
            raise ValueError(f"root element is <{root.tag}>, expected <annotation>")
        size = root.find("size")
        if size is None:
            raise ValueError("missing <size>")
        width, height = _int_field(size, "width"), _int_field(size, "height")
        if width <= 0 or height <= 0:
            raise ValueError(f"<size> is {width}x{height}, must be positive")
    except (ET.ParseError, OSError, ValueError) as err:
        rep.problem("malformed_xml", xml_path, f"malformed annotation XML ({err})")
        return None
    boxes, labels, tracks, occluded, generated = [], [], [], [], []
    for k, obj in enumerate(root.findall("object")):
        try:
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError("missing <bndbox>")
            xmin, ymin = _int_field(bb, "xmin"), _int_field(bb, "ymin")
            xmax, ymax = _int_field(bb, "xmax"), _int_field(bb, "ymax")
            track = _int_field(obj, "trackid")
            occ = _int_field(obj, "occluded") if obj.find("occluded") is not None else 0
            gen = _int_field(obj, "generated") if obj.find("generated") is not None else 0
            wnid = (obj.findtext("name") or "").strip()
        except ValueError as err:
            rep.problem("malformed_object", xml_path, f"object {k}: {err}")
            continue
        where = f"object {k} (trackid {track}, box {xmin},{ymin},{xmax},{ymax})"
        if wnid not in WNID_TO_ID:
            rep.problem("unknown_wnid", xml_path,
                        f"{where}: WordNet id {wnid!r} is not one of the 30 VID classes")
            continue
        if xmax < xmin or ymax < ymin:
            rep.problem("box_degenerate", xml_path, f"{where}: zero-size box (xmax<xmin or ymax<ymin)")
            continue
        if xmin < 0 or ymin < 0 or xmax >= width or ymax >= height:
            rep.problem("box_outside", xml_path,
                        f"{where}: outside the {width}x{height} image (valid: 0<=x<={width - 1}, "
                        f"0<=y<={height - 1})")
            continue
        boxes.append((xmin, ymin, xmax, ymax))
        labels.append(WNID_TO_ID[wnid])
        tracks.append(track)
        occluded.append(bool(occ))
        generated.append(bool(gen))
    return FrameAnno(
        image_path=image_path, width=width, height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64), track_ids=np.asarray(tracks, np.int64),
        occluded=np.asarray(occluded, bool), generated=np.asarray(generated, bool))


def _read_snippet(root: Path, split: str, name: str, listed: list[str] | None,
                  rep: _Reporter) -> Video | None:
    """Frames of one snippet that have both a JPEG and a readable XML, in frame order."""
    data_dir = root / "Data" / "VID" / split / name
    ann_dir = root / "Annotations" / "VID" / split / name
    jpegs, xmls = _frame_files(data_dir), _frame_files(ann_dir)
    if not jpegs and not xmls and not data_dir.is_dir() and not ann_dir.is_dir():
        rep.problem("missing_video", data_dir, "listed snippet has no Data or Annotations folder")
        return None
    stems = listed if listed is not None else sorted(set(jpegs) | set(xmls), key=int)
    frames = []
    for stem in stems:
        image_path = data_dir / jpegs.get(stem, f"{stem}.JPEG")
        if stem not in jpegs:
            rep.problem("missing_jpeg", image_path, "frame image missing")
            continue
        if stem not in xmls:
            rep.problem("missing_xml", ann_dir / f"{stem}.xml", "frame annotation missing")
            continue
        anno = parse_annotation(ann_dir / xmls[stem], image_path, rep)
        if anno is not None:
            frames.append(anno)
    if not frames:
        rep.problem("empty_video", data_dir, "snippet has no readable frame")
        return None
    frames.sort(key=lambda f: f.frame_index)
    return Video(name=name.rpartition("/")[2], frames=tuple(frames))


def _index_key(root: Path, split: str, strict: bool, lists: list[Path]) -> tuple:
    """What an index is valid for: resolved root, split, strict and the lists' (or tree's) mtimes."""
    stamps = [p for p in lists if p.is_file()] or [root / "Annotations" / "VID" / split]
    return (str(root.resolve()), split, strict, max(p.stat().st_mtime_ns for p in stamps))


def _cache_path(cache_dir: Path, key: tuple) -> Path:
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    return cache_dir / f"vid_{key[1]}_{digest}.pkl"


# Indexes read in this process, by _index_key (memo=True): a suite evaluates each trial up to three
# times, and ImageNet VID's val index alone is 176k XML files.
_MEMO: dict[tuple, tuple[list[Video], DataSummary]] = {}
_MEMO_SIZE = 4


_CACHE_VERSION = 1
_ARRAYS = ("boxes", "labels", "track_ids", "occluded", "generated")


def _save_index(path: Path, key: tuple, videos: list[Video], summary: DataSummary) -> None:
    """Pickle the index column-wise per video (few large arrays: fast to write and load)."""
    packed = []
    for v in videos:
        fr = v.frames
        packed.append((v.name, str(fr[0].image_path.parent), [f.image_path.name for f in fr],
                       np.asarray([(f.width, f.height) for f in fr], np.int64),
                       np.asarray([len(f.labels) for f in fr], np.int64),
                       *(np.concatenate([getattr(f, a) for f in fr]) for a in _ARRAYS)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        pickle.dump({"version": _CACHE_VERSION, "key": key, "videos": packed,
                     "summary": summary}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written cache


def _load_index(path: Path, key: tuple) -> tuple[list[Video], DataSummary] | None:
    """Index from a cache written by _save_index with the same key, else None."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            payload = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
        warnings.warn(f"{path}: unreadable VID index cache ({err}); re-reading the dataset",
                      VidDataWarning, stacklevel=3)
        return None
    if payload.get("version") != _CACHE_VERSION or payload.get("key") != key:
        return None
    videos = []
    for name, folder, files, sizes, counts, *arrays in payload["videos"]:
        split_at = np.cumsum(counts)[:-1]
        per_frame = [np.split(a, split_at) for a in arrays]
        frames = tuple(
            FrameAnno(Path(folder, fname), int(w), int(h), *(col[i] for col in per_frame))
            for i, (fname, (w, h)) in enumerate(zip(files, sizes)))
        videos.append(Video(name, frames))
    return videos, payload["summary"]


def read_vid(root: Path | str, split: str = "train", strict: bool = False,
             cache_dir: Path | str | None = None,
             progress: bool = True, memo: bool = False) -> tuple[list[Video], DataSummary]:
    """Read the ILSVRC2015 VID index of one split ("train" or "val"), videos sorted by name.

    Uses ImageSets/VID/train_1..30.txt (snippets, deduplicated) or val.txt (frames); if a list
    is missing, walks the folder tree instead (with a warning). Bad files and boxes are skipped
    with a VidDataWarning and counted in the DataSummary; strict=True raises VidDataError.
    With cache_dir, the parsed index is pickled there and reused by the next call; with memo, it is
    also kept in this process (the same objects are returned: do not modify them). Both are keyed by
    the list files' mtimes: touch a list after editing annotations.
    """
    root = Path(root)
    _check_layout(root, split)
    lists = _list_files(root, split)
    key = _index_key(root, split, strict, lists)
    if memo and key in _MEMO:
        return _MEMO[key]
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_path(Path(cache_dir), key)
        cached = _load_index(cache_file, key)
        if cached is not None:
            return _remember(key, cached) if memo else cached
    summary = DataSummary()
    rep = _Reporter(summary, strict)
    missing = [p for p in lists if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more list files)" if len(missing) > 1 else ""
        warnings.warn(f"{missing[0]} not found{more}: listing {split} snippets by walking "
                      f"{root / 'Data' / 'VID' / split}", VidDataWarning, stacklevel=2)
        summary.list_fallback = 1
        snippets = _snippets_from_tree(root, split)
    else:
        snippets = _snippets_from_lists(lists, split)
    videos: list[Video] = []
    names = sorted(snippets)
    last_print = time.monotonic()
    for i, name in enumerate(names, start=1):
        video = _read_snippet(root, split, name, snippets[name], rep)
        if video is not None:
            videos.append(video)
            summary.frames += len(video.frames)
            summary.boxes += sum(len(f.labels) for f in video.frames)
        if progress and (i == len(names) or time.monotonic() - last_print > 2.0):  # a line every 2 s, then done
            last_print = time.monotonic()
            print(f"read_vid({split}): {i}/{len(names)} videos, {summary.frames} frames",
                  file=sys.stderr, flush=True)
    summary.videos = len(videos)
    if cache_file is not None:
        _save_index(cache_file, key, videos, summary)
    return _remember(key, (videos, summary)) if memo else (videos, summary)


def _remember(key: tuple, index: tuple[list[Video], DataSummary]) -> tuple[list[Video], DataSummary]:
    while len(_MEMO) >= _MEMO_SIZE:
        del _MEMO[next(iter(_MEMO))]  # the oldest
    _MEMO[key] = index
    return index
