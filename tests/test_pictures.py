"""`tafm viz` draws what checkpoints detect on consecutive val frames, side by side (paper Figure 5),
and a suite's report embeds its baseline against its best row."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ablations.cli import main
from ablations.extras.pictures import STRIP, STRIP_EXTRA, write_strip
from ablations.records import TrialRecord
from datamodules.synthetic import SynthConfig, generate
from lightning_modules.config import ModelConfig, RecurrentConfig, RecurrentType, plain_config
from lightning_modules.network import create_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    cfg = SynthConfig(videos=1, val_videos=2, frames=6, size=64, seed=0, max_objects=2)
    return generate(tmp_path_factory.mktemp("synth") / "vid", cfg, progress=False)


def _checkpoint(path: Path, kind: RecurrentType) -> Path:
    """A Lightning-style checkpoint of a random tiny network (what `fit` writes, without training)."""
    torch.manual_seed(0)
    cfg = ModelConfig(alpha=0.25, input_size=64, recurrent=RecurrentConfig(type=kind, after=["conv13"]))
    state = {f"net.{k}": v for k, v in create_model(cfg).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": plain_config(cfg)}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return [_checkpoint(folder / "none.ckpt", RecurrentType.none),
            _checkpoint(folder / "lstm.ckpt", RecurrentType.bottleneck_lstm)]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_viz_draws_one_column_per_checkpoint(root, checkpoints, tmp_path, capsys, suffix):
    out = tmp_path / f"pictures{suffix}"
    assert main(["viz", *map(str, checkpoints), "--data-root", str(root), "--frames", "3", "--video", "1",
                 "--occlusion", "0.5", "--min-score", "0", "--scale", "2", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.width > 2 * 2 * 64  # two columns of frames enlarged twice
        assert getattr(image, "n_frames", 1) == (3 if suffix == ".gif" else 1)
        assert image.convert("L").getextrema()[1] > 0  # not blank


def test_viz_errors_name_what_is_valid(root, checkpoints, tmp_path, capsys):
    assert main(["viz", str(checkpoints[0]), "--data-root", str(root), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "valid: .png, .gif, .mp4" in capsys.readouterr().err
    assert main(["viz", str(checkpoints[0]), "--data-root", str(root), "--video", "9", "--out", str(tmp_path / "x.png")]) == 2
    assert "or an index 0..1" in capsys.readouterr().err


def test_a_suite_strip_sets_the_baseline_beside_the_best_row(root, checkpoints, tmp_path):
    def record(key, kind, value, checkpoint):
        return TrialRecord(key=key, trial=0, state="COMPLETE", seed=0, value=value, axes={"type": kind},
                           config={"model.recurrent.type": kind, "data.root": str(root)},
                           metrics={0.0: {"val/vid_map50": value}}, extra={"checkpoint": str(checkpoint)})

    records = [record("a", "none", 0.2, checkpoints[0]), record("b", "bottleneck_lstm", 0.3, checkpoints[1]),
               record("c", "gru", 0.1, checkpoints[1])]
    path = write_strip(records, "val/vid_map50", True, tmp_path / "reports" / "s", tmp_path / "runs" / "s" / "extras")
    assert path == tmp_path / "reports" / "s" / STRIP and path.stat().st_size > 0
    text = (tmp_path / "runs" / "s" / "extras" / STRIP_EXTRA).read_text()
    assert f"]({STRIP})" in text and "baseline: none" in text and "best: bottleneck_lstm" in text
    lines = []
    assert write_strip(records[1:], "val/vid_map50", True, tmp_path / "r2", tmp_path / "e2", lines.append) is None
    assert "no single-frame row" in lines[0]


def test_the_strip_takes_the_best_row_by_its_mean_over_seeds_at_one_seed(root, checkpoints, tmp_path):
    def record(kind, seed, value, checkpoint):
        return TrialRecord(key=f"{kind}-s{seed}", trial=0, state="COMPLETE", seed=seed, value=value,
                           axes={"type": kind}, config={"model.recurrent.type": kind, "data.root": str(root)},
                           metrics={0.0: {"val/vid_map50": value}}, extra={"checkpoint": str(checkpoint)})

    records = [record("none", 1, 0.2, checkpoints[0]), record("none", 2, 0.2, checkpoints[0]),
               record("gru", 1, 0.1, checkpoints[1]), record("gru", 2, 0.6, checkpoints[1]),  # best single value
               record("bottleneck_lstm", 1, 0.4, checkpoints[1]), record("bottleneck_lstm", 2, 0.4, checkpoints[1])]
    write_strip(records, "val/vid_map50", True, tmp_path / "reports" / "s", tmp_path / "runs" / "s" / "extras")
    text = (tmp_path / "runs" / "s" / "extras" / STRIP_EXTRA).read_text()
    assert "baseline: none, seed 1" in text and "best: bottleneck_lstm, seed 1" in text


def test_a_box_under_a_pixel_wide_is_drawn_not_refused():
    """A detection clipped at the frame's border to zero width is x1 = x0 - 1 in inclusive pixels: the main job's
    strip failed on one ('x1 must be greater than or equal to x0') and the report went without its picture."""
    from types import SimpleNamespace

    import numpy as np

    from reports.pictures import draw_shot

    degenerate = np.array([[63.0, 10.0, 62.0, 20.0], [5.0, 30.0, 9.0, 29.0]])
    shot = SimpleNamespace(frame_index=0, image=Image.new("RGB", (64, 64)), gt_boxes=degenerate,
                           gt_labels=np.array([1, 2]), boxes=degenerate, scores=np.array([0.9, 0.8]),
                           labels=np.array([1, 2]), names=["a", "b"])
    image = draw_shot(shot, min_score=0.5, scale=2)
    assert image.size == (128, 128) and image.convert("L").getextrema()[1] > 0
