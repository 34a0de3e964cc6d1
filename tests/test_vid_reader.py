"""ImageNet VID reader: devkit XML/list parsing, fallback, cache, and every kind of bad input."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.vid_tree import (FIXTURES, TRAIN_BATCH, add_video, make_train_tree,  # noqa: E402
                               make_val_tree, write_jpeg, write_train_lists, write_val_list)

from datamodules.vid import (CLASS_NAMES, VID_CLASSES, WNID_TO_ID, VidDataError,  # noqa: E402
                             VidDataWarning, VidLayoutError, normalized_to_pixel,
                             pixel_to_normalized, read_vid)

TURTLE, ZEBRA = "n01662784", "n02391049"


def one_box(i: int) -> list[dict]:
    return [{"wnid": TURTLE, "box": (4 + i, 5, 30 + i, 40), "trackid": 2}]


def test_class_table_is_canonical() -> None:
    assert [c[0] for c in VID_CLASSES] == list(range(1, 31))
    assert list(CLASS_NAMES) == sorted(CLASS_NAMES)
    assert CLASS_NAMES[0] == "airplane" and CLASS_NAMES[26] == "turtle"
    assert WNID_TO_ID[TURTLE] == 27 and WNID_TO_ID[ZEBRA] == 30 and len(WNID_TO_ID) == 30


def test_handwritten_val_xml_with_empty_frame(tmp_path: Path) -> None:
    snippet = "ILSVRC2015_val_00000000"
    ann = tmp_path / "Annotations" / "VID" / "val" / snippet
    ann.mkdir(parents=True)
    shutil.copy(FIXTURES / "val_000000.xml", ann / "000000.xml")
    shutil.copy(FIXTURES / "val_000001_empty.xml", ann / "000001.xml")
    for i in range(2):
        write_jpeg(tmp_path / "Data" / "VID" / "val" / snippet / f"{i:06d}.JPEG", 64, 48, i)
    write_val_list(tmp_path, {snippet: 2})
    videos, summary = read_vid(tmp_path, "val", progress=False)
    assert [v.name for v in videos] == [snippet]
    first, empty = videos[0].frames
    assert (first.width, first.height, first.frame_index) == (64, 48, 0)
    np.testing.assert_array_equal(first.boxes, [[0, 7, 40, 30], [50, 40, 63, 47]])
    assert first.boxes.dtype == np.float32
    np.testing.assert_array_equal(first.labels, [27, 30])
    np.testing.assert_array_equal(first.track_ids, [0, 3])
    np.testing.assert_array_equal(first.occluded, [True, False])
    np.testing.assert_array_equal(first.generated, [False, True])
    assert first.image_path == tmp_path / "Data/VID/val" / snippet / "000000.JPEG"
    assert empty.boxes.shape == (0, 4) and empty.boxes.dtype == np.float32
    assert empty.labels.shape == (0,) and empty.labels.dtype == np.int64
    assert empty.track_ids.dtype == np.int64 and empty.occluded.dtype == bool
    assert empty.generated.shape == (0,) and empty.frame_index == 1
    assert (summary.videos, summary.frames, summary.boxes, summary.problems()) == (1, 2, 2, 0)


def test_train_lists_dedupe_snippets_across_classes_and_batches(tmp_path: Path) -> None:
    a = add_video(tmp_path, "train", "ILSVRC2015_train_00000000", 3, one_box)
    b = add_video(tmp_path, "train", "ILSVRC2015_train_00010000", 2, batch="ILSVRC2015_VID_train_0001")
    write_train_lists(tmp_path, {27: [a], 30: [a, b], 1: [b]})
    videos, summary = read_vid(tmp_path, "train", progress=False)
    assert [v.name for v in videos] == ["ILSVRC2015_train_00000000", "ILSVRC2015_train_00010000"]
    assert [len(v.frames) for v in videos] == [3, 2]
    assert [f.frame_index for f in videos[0].frames] == [0, 1, 2]
    np.testing.assert_array_equal(videos[0].frames[2].boxes, [[6, 5, 32, 40]])
    assert videos[1].frames[0].image_path.parent.parent.name == "ILSVRC2015_VID_train_0001"
    assert (summary.videos, summary.frames, summary.boxes) == (2, 5, 3)


def test_val_list_selects_the_listed_frames_in_order(tmp_path: Path) -> None:
    make_val_tree(tmp_path, {"ILSVRC2015_val_00000001": 4})
    write_val_list(tmp_path, {"ILSVRC2015_val_00000001": 3})  # frame 3 exists but is not listed
    videos, _ = read_vid(tmp_path, "val", progress=False)
    assert [f.frame_index for f in videos[0].frames] == [0, 1, 2]


def test_missing_lists_fall_back_to_the_folder_tree_with_a_warning(tmp_path: Path) -> None:
    make_train_tree(tmp_path, {"ILSVRC2015_train_00000000": 2, "ILSVRC2015_train_00000001": 3})
    listed, _ = read_vid(tmp_path, "train", progress=False)
    shutil.rmtree(tmp_path / "ImageSets")
    with pytest.warns(VidDataWarning, match=r"train_1\.txt not found"):
        walked, summary = read_vid(tmp_path, "train", progress=False)
    assert [(v.name, len(v.frames)) for v in walked] == [(v.name, len(v.frames)) for v in listed]
    assert summary.list_fallback == 1 and "walking the folder tree" in summary.format()


def test_index_cache_is_reused_and_invalidated_by_the_list_mtime(tmp_path: Path) -> None:
    root = make_val_tree(tmp_path / "vid", {"ILSVRC2015_val_00000000": 3}, one_box)
    cache = tmp_path / "cache"
    first, _ = read_vid(root, "val", cache_dir=cache, progress=False)
    xml = root / "Annotations/VID/val/ILSVRC2015_val_00000000/000001.xml"
    xml.unlink()  # the cached index does not look at the files again
    cached, summary = read_vid(root, "val", cache_dir=cache, progress=False)
    assert len(cached[0].frames) == 3 and summary.missing_xml == 0
    np.testing.assert_array_equal(cached[0].frames[2].boxes, first[0].frames[2].boxes)
    assert cached[0].frames[2].image_path == first[0].frames[2].image_path
    assert cached[0].frames[1].labels.dtype == np.int64
    listing = root / "ImageSets/VID/val.txt"
    os.utime(listing, ns=(listing.stat().st_atime_ns, listing.stat().st_mtime_ns + 10**9))
    with pytest.warns(VidDataWarning, match="000001.xml"):
        reread, summary = read_vid(root, "val", cache_dir=cache, progress=False)
    assert len(reread[0].frames) == 2 and summary.missing_xml == 1


def test_memo_reuses_the_index_in_process_until_a_list_changes(tmp_path: Path) -> None:
    root = make_val_tree(tmp_path / "vid", {"ILSVRC2015_val_00000000": 3}, one_box)
    first, _ = read_vid(root, "val", progress=False, memo=True)
    (root / "Annotations/VID/val/ILSVRC2015_val_00000000/000001.xml").unlink()
    assert read_vid(root, "val", progress=False, memo=True)[0] is first  # not read again
    with pytest.warns(VidDataWarning, match="000001.xml"):
        plain, _ = read_vid(root, "val", progress=False)  # without memo: read from disk
    assert len(plain[0].frames) == 2
    listing = root / "ImageSets/VID/val.txt"
    os.utime(listing, ns=(listing.stat().st_atime_ns, listing.stat().st_mtime_ns + 10**9))
    with pytest.warns(VidDataWarning, match="000001.xml"):
        reread, summary = read_vid(root, "val", progress=False, memo=True)
    assert len(reread[0].frames) == 2 and summary.missing_xml == 1


def test_progress_counter_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_val_tree(tmp_path, {"ILSVRC2015_val_00000000": 2})
    read_vid(tmp_path, "val", progress=True)
    assert "read_vid(val): 1/1 videos, 2 frames" in capsys.readouterr().err


@pytest.mark.parametrize("remove", [None, "Data", "Annotations"])
def test_layout_errors_show_the_wrong_path_and_the_expected_tree(tmp_path: Path, remove) -> None:
    root = tmp_path / "missing_root"
    if remove is not None:
        root = make_val_tree(tmp_path / "vid", {"ILSVRC2015_val_00000000": 1})
        shutil.rmtree(root / remove)
    with pytest.raises(VidLayoutError) as err:
        read_vid(root, "val", progress=False)
    message = str(err.value)
    assert str(root if remove is None else root / remove / "VID" / "val") in message
    assert "Annotations/VID/val/ILSVRC2015_val_XXXXXXXX/%06d.xml" in message
    assert isinstance(err.value, ValueError)


def _break(root: Path, kind: str) -> Path:
    """Damage frame 1 of the only val video; return the file the problem must name."""
    snippet = "ILSVRC2015_val_00000000"
    xml = root / "Annotations/VID/val" / snippet / "000001.xml"
    jpeg = root / "Data/VID/val" / snippet / "000001.JPEG"
    text = xml.read_text()
    if kind == "malformed_xml":
        xml.write_text(text.replace("</annotation>", ""))
    elif kind == "missing_xml":
        xml.unlink()
    elif kind == "missing_jpeg":
        jpeg.unlink()
        return jpeg
    elif kind == "box_outside":
        xml.write_text(text.replace("<xmax>31</xmax>", "<xmax>64</xmax>"))
    elif kind == "box_degenerate":
        xml.write_text(text.replace("<xmax>31</xmax>", "<xmax>4</xmax>"))
    elif kind == "unknown_wnid":
        xml.write_text(text.replace(TURTLE, "n99999999"))
    elif kind == "malformed_object":
        xml.write_text(text.replace("<trackid>2</trackid>", "<trackid>two</trackid>"))
    return xml


FRAME_PROBLEMS = ["malformed_xml", "missing_xml", "missing_jpeg"]
BOX_PROBLEMS = ["box_outside", "box_degenerate", "unknown_wnid", "malformed_object"]


@pytest.mark.parametrize("kind", FRAME_PROBLEMS + BOX_PROBLEMS)
def test_bad_input_is_skipped_with_a_warning_and_counted(tmp_path: Path, kind: str) -> None:
    root = make_val_tree(tmp_path, {"ILSVRC2015_val_00000000": 3}, one_box)
    bad = _break(root, kind)
    with pytest.warns(VidDataWarning, match=str(bad.name)):
        videos, summary = read_vid(root, "val", progress=False)
    assert getattr(summary, kind) == 1 and summary.problems() == 1
    frames = videos[0].frames
    if kind in FRAME_PROBLEMS:
        assert [f.frame_index for f in frames] == [0, 2]
    else:  # only the box goes: the frame stays, with no objects
        assert [f.frame_index for f in frames] == [0, 1, 2]
        assert frames[1].boxes.shape == (0, 4) and len(frames[0].labels) == 1
    assert f"{kind.replace('_', ' ')}: 1" in summary.format()


@pytest.mark.parametrize("kind", FRAME_PROBLEMS + BOX_PROBLEMS)
def test_bad_input_raises_with_the_file_path_when_strict(tmp_path: Path, kind: str) -> None:
    root = make_val_tree(tmp_path, {"ILSVRC2015_val_00000000": 3}, one_box)
    bad = _break(root, kind)
    with pytest.raises(VidDataError, match=str(bad).replace("\\", "\\\\")):
        read_vid(root, "val", strict=True, progress=False)


def test_pixel_and_normalized_boxes_follow_the_convention() -> None:
    px = np.asarray([[0, 0, 63, 47], [10, 20, 19, 29]], np.float32)
    norm = pixel_to_normalized(px, 64, 48)
    np.testing.assert_allclose(norm, [[0, 0, 1, 1], [10 / 64, 20 / 48, 20 / 64, 30 / 48]])
    np.testing.assert_allclose(normalized_to_pixel(norm, 64, 48), px, atol=1e-5)
    t = pixel_to_normalized(torch.from_numpy(px), 64, 48)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.from_numpy(norm))
    torch.testing.assert_close(normalized_to_pixel(t, 64, 48), torch.from_numpy(px))
    np.testing.assert_allclose(pixel_to_normalized(px.astype(np.int64), 64, 48), norm)
    torch.testing.assert_close(pixel_to_normalized(torch.tensor([[0, 0, 63, 47]]), 64, 48),
                               torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_listed_snippet_without_folders_is_counted(tmp_path: Path) -> None:
    a = add_video(tmp_path, "train", "ILSVRC2015_train_00000000", 2)
    write_train_lists(tmp_path, {1: [a, f"{TRAIN_BATCH}/ILSVRC2015_train_00000009"]})
    with pytest.warns(VidDataWarning, match="ILSVRC2015_train_00000009"):
        videos, summary = read_vid(tmp_path, "train", progress=False)
    assert len(videos) == 1 and summary.missing_video == 1
    with pytest.raises(VidDataError, match="ILSVRC2015_train_00000009"):
        read_vid(tmp_path, "train", strict=True, progress=False)


def test_empty_train_batch_folder_and_the_batch_level_are_handled(tmp_path: Path) -> None:
    make_train_tree(tmp_path, {"ILSVRC2015_train_00000000": 1})
    (tmp_path / "Data/VID/train/ILSVRC2015_VID_train_0003").mkdir()
    shutil.rmtree(tmp_path / "ImageSets")
    with pytest.warns(VidDataWarning):
        videos, _ = read_vid(tmp_path, "train", progress=False)
    assert [v.name for v in videos] == ["ILSVRC2015_train_00000000"]
    assert videos[0].frames[0].image_path.parent.parent.name == TRAIN_BATCH
