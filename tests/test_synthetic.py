"""Tests for the synthetic VID-format benchmark (datamodules/synthetic.py, synthetic_render.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.synthetic as synth
from datamodules.synthetic import (
    MANIFEST, SYNTH_MECHANISM, VID_CLASSES, SynthConfig, default_cache_dir, ensure_synthetic, generate,
    render_video)
from datamodules.synthetic_render import (
    BG_PAD, OCCLUDED_FRACTION, Scene, Track, class_appearance, paint_object, render_frame)

TINY = dict(videos=3, val_videos=2, frames=6, size=48, occluder_prob=1.0)
WNID = {name: wnid for _, name, wnid in VID_CLASSES}
CID = {name: cid for cid, name, _ in VID_CLASSES}


def tiny(**kw) -> SynthConfig:
    return SynthConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SynthConfig]:
    cfg = tiny()
    return generate(tmp_path_factory.mktemp("synth") / "ds", cfg, progress=False), cfg


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def annotations(root: Path, split: str) -> dict[str, list[ET.Element]]:
    """snippet path -> parsed XML roots in frame order."""
    out: dict[str, list[ET.Element]] = {}
    for xml in sorted((root / "Annotations/VID" / split).rglob("*.xml")):
        snippet = str(xml.parent.relative_to(root / "Annotations/VID" / split))
        out.setdefault(snippet, []).append(ET.parse(xml).getroot())
    return out


def box_of(obj: ET.Element) -> tuple[int, int, int, int]:
    b = obj.find("bndbox")
    return tuple(int(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path, dataset):
    root, cfg = dataset
    again = tree_bytes(generate(tmp_path / "again", tiny(), progress=False))
    assert again == tree_bytes(root)
    other = tree_bytes(generate(tmp_path / "other", tiny(seed=1), progress=False))
    assert other.keys() - {MANIFEST} == again.keys() - {MANIFEST}
    jpegs = [k for k in again if k.endswith(".JPEG")]
    assert sum(other[k] != again[k] for k in jpegs) > len(jpegs) // 2
    assert any(other[k] != again[k] for k in again if k.endswith(".xml"))


def test_layout_frame_names_and_image_size(dataset):
    root, cfg = dataset
    train = sorted((root / "Data/VID/train").glob("*/*"))
    assert [str(p.relative_to(root / "Data/VID/train")) for p in train] == [
        f"ILSVRC2015_VID_train_0000/ILSVRC2015_train_{i:08d}" for i in range(cfg.videos)]
    val = sorted((root / "Data/VID/val").iterdir())
    assert [p.name for p in val] == [f"ILSVRC2015_val_{i:08d}" for i in range(cfg.val_videos)]
    for snippet, n in [(p, cfg.frames) for p in train] + [(p, max(cfg.frames, 20)) for p in val]:
        assert sorted(f.name for f in snippet.iterdir()) == [f"{t:06d}.JPEG" for t in range(n)]
        ann = root / "Annotations" / snippet.relative_to(root / "Data")
        assert sorted(f.name for f in ann.iterdir()) == [f"{t:06d}.xml" for t in range(n)]
    with Image.open(train[0] / "000000.JPEG") as im:
        assert im.format == "JPEG" and im.size == (48, 36)


def test_xml_is_exactly_vid_format(dataset):
    root, cfg = dataset
    for split in ("train", "val"):
        for xml in (root / "Annotations/VID" / split).rglob("*.xml"):
            text = xml.read_text()
            assert text.startswith("<annotation>\n\t<folder>") and "<?xml" not in text
            for line in text.splitlines():  # tab indentation, one level per nesting depth
                indent = len(line) - len(line.lstrip("\t"))
                assert line[indent:] == line.lstrip(), repr(line)
            ann = ET.fromstring(text)
            tags = [c.tag for c in ann]
            assert tags[:4] == ["folder", "filename", "source", "size"] and set(tags[4:]) <= {"object"}
            snippet = str(xml.parent.relative_to(root / "Annotations/VID" / split))
            assert ann.findtext("folder") == snippet and ann.findtext("filename") == xml.stem
            assert [c.tag for c in ann.find("source")] == ["database"]
            assert ann.findtext("source/database") == "ILSVRC_2015"
            assert [(c.tag, c.text) for c in ann.find("size")] == [("width", "48"), ("height", "36")]
            for obj in ann.findall("object"):
                assert [c.tag for c in obj] == ["trackid", "name", "bndbox", "occluded", "generated"]
                assert [c.tag for c in obj.find("bndbox")] == ["xmax", "xmin", "ymax", "ymin"]
                assert obj.findtext("name") in {WNID[n] for n in cfg.classes}
                assert obj.findtext("occluded") in {"0", "1"} and obj.findtext("generated") == "0"
                xmin, ymin, xmax, ymax = box_of(obj)
                assert 0 <= xmin <= xmax <= 47 and 0 <= ymin <= ymax <= 35


def test_image_set_lists(dataset):
    root, cfg = dataset
    sets = root / "ImageSets/VID"
    assert sorted(p.name for p in sets.iterdir()) == sorted(
        [f"train_{i}.txt" for i in range(1, 31)] + ["val.txt"])  # all 30 lists, as the real ImageSets
    unused = set(range(1, 31)) - {CID[n] for n in cfg.classes}
    assert all((sets / f"train_{i}.txt").read_text() == "" for i in unused)
    contains = {s: {o.findtext("name") for a in anns for o in a.findall("object")}
                for s, anns in annotations(root, "train").items()}
    for name in cfg.classes:
        lines = (sets / f"train_{CID[name]}.txt").read_text().splitlines()
        assert all(re.fullmatch(r"ILSVRC2015_VID_train_0000/ILSVRC2015_train_\d{8} 1", ln) for ln in lines)
        assert [ln.split()[0] for ln in lines] == sorted(s for s, w in contains.items() if WNID[name] in w)
    val_lines = (sets / "val.txt").read_text().splitlines()
    expected = [f"ILSVRC2015_val_{v:08d}/{t:06d}" for v in range(cfg.val_videos) for t in range(20)]
    assert val_lines == [f"{p} {i + 1}" for i, p in enumerate(expected)]


def test_objects_move_and_some_are_occluded(dataset):
    root, _ = dataset
    moved, occluded = 0, 0
    for anns in annotations(root, "train").values():
        for prev, cur in zip(anns, anns[1:]):
            before = {o.findtext("trackid"): box_of(o) for o in prev.findall("object")}
            moved += sum(box_of(o) != before[o.findtext("trackid")] for o in cur.findall("object")
                         if o.findtext("trackid") in before)
        occluded += sum(o.findtext("occluded") == "1" for a in anns for o in a.findall("object"))
    assert moved > 0 and occluded > 0


def test_occluded_flag_matches_hidden_silhouette_share():
    cfg = tiny(videos=2, frames=20)
    objs = [o for v in range(cfg.videos) for _, fr in render_video(cfg, "train", v) for o in fr if o.annotated]
    assert any(o.occluded for o in objs) and any(not o.occluded for o in objs)
    assert all(o.occluded == (o.occluded_frac >= OCCLUDED_FRACTION) for o in objs)


def test_boxes_are_tight_inclusive_and_clipped():
    """A still object on a noise-free frame: box == extent of changed pixels, clipped at the border."""
    w, h = 40, 30
    track = Track(class_index=0, p_in=(33.0, 12.0), direction=(1.0, 0.0), s0=0.0, speed=0.0,
                  wobble_amp=0.0, wobble_period=20.0, wobble_phase=0.0, h0=12.0, growth=0.0,
                  aspect=1.2, colour=(250.0, 10.0, 10.0))
    bg = np.full((h + 2 * BG_PAD, w + 2 * BG_PAD, 3), 100.0, np.float32)
    scene = Scene(w, h, 1, [track], [], bg, (0.0, 0.0), np.array([[False]]), np.ones((1, 1)),
                  np.ones(1), np.zeros(1))
    img, objs = render_frame(scene, 0, np.random.default_rng(0))
    ys, xs = np.nonzero((img != 100).any(axis=2))
    assert len(objs) == 1 and objs[0].box == (xs.min(), ys.min(), xs.max(), ys.max())
    assert objs[0].box[2] == w - 1 and objs[0].occluded_frac == 0.0  # cut by the border, not occluded


def test_paired_classes_look_identical_without_cue():
    """Pair members (positions 0, 1) differ only by the marker; without it their pixels are equal."""
    a, b = class_appearance(0), class_appearance(1)
    assert (a.shape, a.colour) == (b.shape, b.colour) and a.marker != b.marker
    assert class_appearance(2).shape != a.shape

    def draw(look, cue):
        img, owner = np.full((30, 40, 3), 90.0, np.float32), np.full((30, 40), -1, np.int32)
        paint_object(img, owner, 0, look, look.colour, 20.0, 15.0, 10.0, 9.0, cue, 1.0)
        return img

    assert np.array_equal(draw(a, False), draw(b, False))
    assert not np.array_equal(draw(a, True), draw(b, True))


def test_marker_width_and_blend_set_the_band():
    """A wider band covers more of the object; blend 0 draws no marker at all."""
    look = class_appearance(0)  # light horizontal band

    def changed(**marker):
        img, owner = np.full((40, 40, 3), 90.0, np.float32), np.full((40, 40), -1, np.int32)
        plain = img.copy()
        paint_object(plain, owner.copy(), 0, look, look.colour, 20.0, 20.0, 15.0, 15.0, False, 1.0)
        paint_object(img, owner, 0, look, look.colour, 20.0, 20.0, 15.0, 15.0, True, 1.0, **marker)
        return int((np.abs(img - plain).sum(-1) > 0).sum())

    assert changed() > 0
    assert changed(marker_width=0.4, marker_blend=0.75) > 1.5 * changed(marker_width=0.22, marker_blend=0.75)
    assert changed(marker_width=0.4, marker_blend=0.0) == 0
    bold = [o for _, fr in render_video(tiny(marker_width=0.4, marker_blend=0.9), "train", 0) for o in fr]
    assert [o.box for o in bold] == [o.box for _, fr in render_video(tiny(), "train", 0) for o in fr]


def test_marker_styles():
    """`tint` changes every pixel of the object (member 0 lighter, member 1 darker), `band` only a band,
    `colour` the same band towards cyan / magenta; without the cue every style draws the same object."""
    a, b = class_appearance(0), class_appearance(1)

    def draw(look, cue, style, width=0.22):
        img, owner = np.full((40, 40, 3), 90.0, np.float32), np.full((40, 40), -1, np.int32)
        mask = paint_object(img, owner, 0, look, look.colour, 20.0, 20.0, 15.0, 15.0, cue, 1.0,
                            marker_width=width, marker_blend=0.5, marker_style=style)
        return img, mask

    plain, mask = draw(a, False, "tint")
    assert np.array_equal(plain, draw(a, False, "band")[0])
    light, dark = draw(a, True, "tint")[0], draw(b, True, "tint")[0]
    assert (light[mask] > plain[mask]).any(-1).all() and (dark[mask] < plain[mask]).any(-1).all()
    assert np.array_equal(light[~mask], plain[~mask])
    band = draw(a, True, "band")[0]
    assert 0 < (np.abs(band - plain).sum(-1) > 0).sum() < 0.5 * mask.sum()
    cyan, magenta = draw(a, True, "colour")[0], draw(b, True, "colour")[0]
    assert np.array_equal(cyan != plain, band != plain)  # the band's pixels, in another colour
    moved = cyan != plain
    assert (cyan[..., 1][moved[..., 1]] > plain[..., 1][moved[..., 1]]).all()  # towards cyan: more green
    assert (magenta[..., 2] >= plain[..., 2]).all() and (magenta[..., 1] <= plain[..., 1]).all()
    whole = draw(a, True, "colour", width=1.0)[0]  # the benchmark's default: every pixel of the object
    assert (whole[mask] != plain[mask]).any(-1).all() and np.array_equal(whole[~mask], plain[~mask])
    with pytest.raises(ValueError, match=r"SynthConfig\.marker_style='dots': must be one of band, tint, colour"):
        SynthConfig(marker_style="dots")


def test_class_cue_hidden_on_many_frames_but_not_all():
    cfg = tiny(videos=4, frames=20)
    objs = [o for v in range(cfg.videos) for _, fr in render_video(cfg, "train", v) for o in fr if o.annotated]
    hidden = np.mean([not o.cue_visible for o in objs])
    assert 0.45 < hidden < 0.85  # cue_prob = 0.35
    by_track: dict[tuple[int, int], set[bool]] = {}
    for v in range(cfg.videos):
        for _, fr in render_video(cfg, "train", v):
            for o in fr:
                by_track.setdefault((v, o.track), set()).add(o.cue_visible)
    assert any(s == {True, False} for s in by_track.values())  # a track shows and hides its class
    always = [o for _, fr in render_video(tiny(cue_prob=1.0), "train", 0) for o in fr]
    assert always and all(o.cue_visible for o in always)


def test_some_frames_have_no_object():
    cfg = tiny(videos=6, frames=30)
    counts = [sum(o.annotated for o in fr) for v in range(cfg.videos) for _, fr in render_video(cfg, "train", v)]
    assert 0 in counts and max(counts) >= 2


def test_generate_existing_folder(tmp_path, dataset, monkeypatch):
    root, cfg = dataset
    monkeypatch.setattr(synth, "_write_all", lambda *a: pytest.fail("regenerated a complete folder"))
    assert generate(root, tiny(), progress=False) == root
    with pytest.raises(FileExistsError, match="delete it"):
        generate(root, tiny(seed=5), progress=False)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = synth._write_video

    def fail_on_second(root, cfg, split, index):
        if index == 1:
            raise KeyboardInterrupt
        return real(root, cfg, split, index)

    monkeypatch.setattr(synth, "_write_video", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "ds", tiny(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_synthetic_caches_and_ignores_tmp(tmp_path, monkeypatch):
    cfg = tiny(videos=1, val_videos=1, frames=3)
    name = f"synthetic_vid-{synth.config_hash(cfg)}"
    dead, live = tmp_path / f"{name}.tmp-999999999", tmp_path / f"{name}.tmp-{os.getppid()}"
    for partial in (dead, live):  # half-written folders, as left by a killed / a running writer
        (partial / "Data/VID/train").mkdir(parents=True)
    out = ensure_synthetic(cfg, tmp_path, progress=False)
    assert out == tmp_path / name and json.loads((out / MANIFEST).read_text())["config"]["frames"] == 3
    assert not dead.exists() and live.exists()
    monkeypatch.setattr(synth, "_write_all", lambda *a: pytest.fail("regenerated a cached dataset"))
    assert ensure_synthetic(tiny(videos=1, val_videos=1, frames=3), tmp_path, progress=False) == out
    monkeypatch.setenv("TAFM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path and ensure_synthetic(cfg, progress=False) == out


def test_synthetic_twin_is_the_same_videos_with_the_marker_on_every_frame(tmp_path, dataset, monkeypatch):
    root, cfg = dataset
    twin = synth.synthetic_twin(root, 1.0, tmp_path)
    assert twin.parent == tmp_path and twin != root
    twin_cfg = synth.synthetic_config_of(twin)
    assert twin_cfg == dataclasses.replace(cfg, cue_prob=1.0)
    first = sorted((twin / "Data/VID/train").rglob("*.JPEG"))
    assert [p.relative_to(twin) for p in first] == [p.relative_to(root) for p in
                                                   sorted((root / "Data/VID/train").rglob("*.JPEG"))]
    assert synth.synthetic_twin(root, cfg.cue_prob, tmp_path) == root  # already that rate: itself
    monkeypatch.setattr(synth, "_write_all", lambda *a: pytest.fail("regenerated a cached twin"))
    assert synth.synthetic_twin(root, 1.0, tmp_path) == twin
    from datamodules.data_config import DataConfig
    from lightning_modules.fit import resolve_root

    monkeypatch.setenv("TAFM_CACHE", str(tmp_path))  # where a training run finds it (data.synthetic_cue_prob)
    assert resolve_root(DataConfig(root=str(root), synthetic_cue_prob=1.0)) == twin
    assert resolve_root(DataConfig(root=str(root))) == root
    with pytest.raises(ValueError, match=r"data\.synthetic_cue_prob=1\.0: .* is not a synthetic dataset"):
        synth.synthetic_twin(tmp_path / "real", 1.0, tmp_path)


def test_a_manifest_from_another_version_has_no_twin(tmp_path, dataset):
    root, _ = dataset
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["config"]["marker_style"]  # written before the key existed: its default has since changed
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"not a generator config this version reads .*tafm data synth"):
        synth.synthetic_config_of(old)


def test_ensure_synthetic_concurrent_calls_generate_once(tmp_path, monkeypatch):
    cfg, calls, real = tiny(videos=1, val_videos=1, frames=3), [], synth._write_all
    monkeypatch.setattr(synth, "_write_all", lambda *a: calls.append(1) or real(*a))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_synthetic(cfg, tmp_path, False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1


@pytest.mark.parametrize("key, value, valid", [
    ("videos", 0, r"\[1, "), ("frames", 1, r"\[2, "), ("size", 8, r"\[32, 1280\]"),
    ("val_frames", 10, r"\[20, "), ("cue_prob", 1.5, r"\[0, 1.0\]"),
    ("marker_width", 1.2, r"\[0, 1.0\]"), ("marker_blend", -0.1, r"\[0, 1.0\]"), ("noise_std", -0.1, r"\[0, 0.5\]"),
    ("max_objects", 0, r"\[1, 10\]"), ("seed", -1, r"\[0, "), ("classes", ("horse", "unicorn"), "zebra"),
    ("classes", (), "valid names"), ("classes", ("car", "car"), "duplicate")])
def test_bad_config_names_key_and_valid_range(key, value, valid):
    with pytest.raises(ValueError, match=rf"SynthConfig\.{key}") as err:
        SynthConfig(**{key: value})
    assert re.search(valid, str(err.value))


def test_mechanism_text_matches_defaults():
    cfg = SynthConfig()
    assert 5 <= len(SYNTH_MECHANISM.splitlines()) <= 12
    assert f"`cue_prob` (default {cfg.cue_prob})" in SYNTH_MECHANISM
    pairs = [f"{a}/{b}" for a, b in zip(cfg.classes[::2], cfg.classes[1::2])]
    assert all(p in SYNTH_MECHANISM for p in pairs)
    marker = synth.marker_names(cfg.marker_style, cfg.marker_width)
    assert all(name.split()[0] in SYNTH_MECHANISM for name in marker)  # the default marker's colours
