"""User errors end in one clear line naming what was wrong, where, and what is valid, with exit status 2,
before any study is opened or anything trained; only unexpected errors are retried."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ablations.runner as runner
from ablations.cli import main
from datamodules.vid import VidDataError
from tests.fixtures.vid_tree import make_train_tree, make_val_tree

SUITE = """description: one tiny trial
table: table3
metric: val/vid_map50
base: {model.alpha: 0.25, model.input_size: 64}
grid:
  model.recurrent.type: [none, bottleneck_lstm]
"""
HEAVY = ("torch", "pytorch_lightning", "lightning", "optuna", "pandas")


def _one_line_error(capsys) -> str:
    """The command's stderr ends with exactly one `tafm: error:` line and shows no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("tafm: error: ") and err.count("tafm: error:") == 1, err
    return last


def _run(capsys, *args: str) -> tuple:
    code = main(["run", *args])
    return code, _one_line_error(capsys)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.alpha=0", ["model.alpha", "> 0", "0.0"]),
        ("model.alpha=-0.5", ["model.alpha", "> 0"]),
        ("model.recurrent.after=[conv13,fm9]", ["model.recurrent.after", "'fm9'", "conv3, conv13, fm1"]),
        ("model.recurrent.type=rnn", ["model.recurrent.type", "'rnn'", "bottleneck_lstm"]),
        ("model.alpah=1", ["unknown config key 'model.alpah'", "model.alpha"]),
        ("model.input_size=300", ["model.input_size", "multiple of 32", "300"]),
        ("model.input_size=0", ["model.input_size", "multiple of 32"]),
        ("alpha", ["not key=value"]),
    ],
)
def test_user_error_is_one_line(capsys, override, expected):
    assert main(["cost", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tafm: error:") and "\n" not in err
    for text in expected:
        assert text in err


def test_no_traceback_from_console_script():
    proc = subprocess.run([sys.executable, "-m", "ablations.cli", "cost", "--set", "model.recurrent.type=rnn"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "model.recurrent.type" in proc.stderr


# ---- tafm run: arguments and suites, checked before the training stack is imported ----

def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`tafm ARGS` in a fresh interpreter that also reports which heavy libraries it imported."""
    code = ("import sys; from ablations.cli import main; rc = main(sys.argv[1:]); "
            f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["nosuch_suite"], "unknown suite 'nosuch_suite'; valid: fig4_lstm_width, quick"),
        (["smoke", "--seeds", "-1"], "--seeds must be >= 1 (seeds per grid point), got -1"),
        (["smoke", "--set", "model.alpah=1"], "unknown config key 'model.alpah' (in --set); valid keys here: model.arch"),
        (["smoke", "--set", "data.minival_seed=-1"], "data.minival_seed must be >= 0, got -1"),
        (["smoke", "--profile", "vid"], "--profile vid trains at the paper's settings on ImageNet VID: pass --data-root PATH"),
    ],
)
def test_argument_and_suite_errors_fail_fast_without_importing_the_training_stack(tmp_path, args, expected):
    proc = _cli("run", *args, "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tafm: error: ") and "\n" not in proc.stderr.strip() and expected in proc.stderr
    assert "imported: []" in proc.stdout  # torch, Lightning, Optuna, pandas: none loaded to say this
    assert not (tmp_path / "runs").exists()  # no study opened


@pytest.mark.parametrize(
    "text,expected",
    [
        ("seeds: many\n", "bad.yaml: 'seeds' must be a positive integer, e.g. seeds: 3; got 'many'"),
        ("base: [model.alpha]\n", "bad.yaml: 'base' must be a mapping, e.g. base: {model.alpha: 0.5}; got list"),
        ("grid: [model.alpha]\n", "bad.yaml: 'grid' must be a mapping"),
        ("profiles: {synthetic: [1]}\n", "bad.yaml: profile 'synthetic' must be a mapping"),
        ("base: {model.alpah: 1}\n", "unknown config key 'model.alpah' (in "),
    ],
)
def test_bad_suite_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text("description: x\ntable: table3\nmetric: val/vid_map50\n" + text)
    code, line = _run(capsys, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and expected in line and str(path) in line


def test_a_suite_file_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- description\n- table\n")
    code, line = _run(capsys, str(path))
    assert code == 2 and f"{path}: a suite file is a mapping with the keys" in line and "got list" in line


# ---- tafm run / status: the storage URL, parsed and connected before the study is opened ----

@pytest.mark.parametrize(
    "url,expected",
    [
        ("garbage://x", "--storage 'garbage://x': unknown database 'garbage'; valid: sqlite:///PATH.db or postgresql"),
        ("not a url", "--storage 'not a url' is not a database URL; valid: sqlite:///PATH.db or postgresql"),
        ("postgresql+psycopg2://u@127.0.0.1:1/db", "--storage postgresql+psycopg2://u@127.0.0.1:1/db: cannot connect ("),
    ],
)
def test_bad_storage_is_one_line_before_anything_runs(tmp_path, capsys, url, expected):
    pytest.importorskip("psycopg2")
    start = time.monotonic()
    code, line = _run(capsys, "smoke", "--storage", url, "--runs-dir", str(tmp_path / "runs"))
    assert code == 2 and expected in line
    assert time.monotonic() - start < 10  # a server that is not there is given a few seconds, not forever
    assert not (tmp_path / "runs").exists()


def test_sqlite_storage_in_a_missing_folder_names_the_url(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/no/such/folder/optuna.db"
    code, line = _run(capsys, "smoke", "--storage", url)
    assert code == 2 and f"--storage {url}: cannot connect (unable to open database file)" in line


def test_status_checks_the_storage_too(capsys):
    assert main(["status", "smoke", "--storage", "garbage://x"]) == 2
    assert "unknown database 'garbage'" in _one_line_error(capsys)


# ---- tafm run --data-root: the layout and the splits, read once before any trial ----

def _airplane(i):
    return [{"wnid": "n02691156", "box": (5, 5, 30, 30)}]


@pytest.fixture
def vid_root(tmp_path):
    """A tiny, valid ILSVRC2015 VID tree (one train and one val snippet of 6 frames)."""
    root = tmp_path / "vid"
    make_train_tree(root, {"ILSVRC2015_train_00000000": 6}, _airplane)
    make_val_tree(root, {"ILSVRC2015_val_00000000": 6}, _airplane)
    return root


def _damage(root: Path, tmp_path: Path, how: str) -> Path:
    """The root (or a path in place of one) broken in one of the ways a new user breaks it."""
    val_xml = root / "Annotations/VID/val/ILSVRC2015_val_00000000"
    if how == "missing":
        return tmp_path / "no_such_root"
    if how == "file":
        (tmp_path / "a_file").write_text("not a folder")
        return tmp_path / "a_file"
    if how == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if how == "no_annotations":
        shutil.rmtree(root / "Annotations")
    elif how == "garbage_val_list":
        (root / "ImageSets/VID/val.txt").write_text("this is not a list\n")
    elif how in ("strict_corrupt_xml", "strict_zero_byte_xml"):
        (val_xml / "000001.xml").write_text("<annotation><size>" if how == "strict_corrupt_xml" else "")
    elif how == "all_val_xml_malformed":
        for xml in val_xml.glob("*.xml"):
            xml.write_text("not xml <<")
    return root


@pytest.mark.filterwarnings("ignore::datamodules.vid.VidDataWarning")  # the skipped files, as documented
@pytest.mark.parametrize(
    "how,extra,expected",
    [
        ("missing", [], ["data.root: ImageNet VID root ", "no_such_root does not exist; expected ILSVRC2015 VID layout: "
                         "<root>/Data/VID/train/ILSVRC2015_VID_train_000N/ILSVRC2015_train_XXXXXXXX/%06d.JPEG"]),
        ("file", [], ["a_file is a file, not a folder; expected ILSVRC2015 VID layout: "]),
        ("empty", [], ["empty has no folder Data/VID/train (looked for ", "expected ILSVRC2015 VID layout: "]),
        ("no_annotations", [], ["has no folder Annotations/VID/train", "<root>/Annotations/VID/train/"]),
        ("garbage_val_list", [], ["ImageSets/VID/val.txt:1: expected '<name> <integer>', got 'this is not a list'"]),
        ("strict_corrupt_xml", ["--set", "data.strict=true"],
         ["data.strict=true stops at the first bad file: ", "000001.xml: malformed annotation XML",
          "set data.strict=false to skip and count bad files"]),
        ("strict_zero_byte_xml", ["--set", "data.strict=true"], ["000001.xml: malformed annotation XML"]),
        ("all_val_xml_malformed", [], ["has no val frame with both an image and a readable annotation "
                                       "(skipped: empty video: 1, malformed xml: 6)", "pass another --data-root"]),
    ],
)
def test_a_bad_data_root_is_one_line_before_any_trial(tmp_path, vid_root, capsys, how, extra, expected):
    root = _damage(vid_root, tmp_path, how)
    runs = tmp_path / "runs"
    code, line = _run(capsys, "smoke", "--data-root", str(root), "--runs-dir", str(runs), *extra)
    assert code == 2
    for text in expected:
        assert text in line
    assert not runs.exists()  # no study, no trial, no retry


def test_a_missing_stage1_data_root_is_one_line_naming_its_key(tmp_path, vid_root, capsys):
    runs = tmp_path / "runs"
    code, line = _run(capsys, "smoke", "--data-root", str(vid_root), "--runs-dir", str(runs),
                      "--set", f"sweep.stage1_data_root={tmp_path / 'no_such_root'}")
    assert code == 2 and "sweep.stage1_data_root: ImageNet VID root " in line
    assert "no_such_root does not exist" in line and not runs.exists()


def test_data_synth_into_a_foreign_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("my own files")
    assert main(["data", "synth", str(tmp_path)]) == 2
    line = _one_line_error(capsys)
    assert f"{tmp_path} exists and is not a synthetic dataset" in line and "pick another folder" in line


def test_data_synth_marker_style_reaches_the_manifest(tmp_path, capsys):
    out = tmp_path / "colour"
    assert main(["data", "synth", str(out), "--videos", "1", "--val-videos", "1", "--frames", "2",
                 "--size", "32", "--marker-style", "band", "--marker-width", "0.3"]) == 0
    manifest = json.loads((out / "tafm_synth.json").read_text())
    assert (manifest["config"]["marker_style"], manifest["config"]["marker_width"]) == ("band", 0.3)
    assert [c["marker"] for c in manifest["classes"][:2]] == ["light horizontal band", "dark vertical band"]
    default = tmp_path / "default"
    assert main(["data", "synth", str(default), "--videos", "1", "--val-videos", "1", "--frames", "2",
                 "--size", "32"]) == 0
    manifest = json.loads((default / "tafm_synth.json").read_text())
    assert [c["marker"] for c in manifest["classes"][:2]] == ["cyan tint", "magenta tint"]  # the whole object


def test_a_synthetic_twin_of_a_real_dataset_is_one_line_naming_its_key(tmp_path, vid_root, capsys):
    runs = tmp_path / "runs"
    code, line = _run(capsys, "smoke", "--data-root", str(vid_root), "--runs-dir", str(runs),
                      "--set", "data.synthetic_cue_prob=1.0")
    assert code == 2 and f"data.synthetic_cue_prob=1.0: data.root {vid_root} is not a synthetic dataset" in line
    assert "tafm data synth" in line and not runs.exists()


# ---- inside a trial: user errors stop the suite at once, unexpected ones are retried ----

@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    return path


def _trial_calls(monkeypatch, error=None, metrics=None):
    """Stand-ins for training and evaluation: each call is recorded, then raises `error` or returns `metrics`."""
    calls = []

    def trained_stage(cfg, runs_dir, log=print, callbacks=(), tracking=None):
        calls.append(cfg.model.recurrent.type.value)
        if error is not None:
            raise error
        return runs_dir / "last.ckpt"

    monkeypatch.setattr(runner, "trained_stage", trained_stage)
    monkeypatch.setattr(runner, "evaluate_variants", lambda cfg, checkpoint, variants, *where: dict(metrics or {}))
    return calls


def test_a_data_error_inside_a_trial_stops_the_suite_at_once(tmp_path, suite_file, capsys, monkeypatch):
    calls = _trial_calls(monkeypatch, VidDataError("/data/val/000003.JPEG: corrupt JPEG (cannot identify image file)"))
    code, line = _run(capsys, str(suite_file), "--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled",
                      "--set", "data.strict=true")
    assert code == 2 and len(calls) == 1  # not retried, and the second grid point is not started
    assert "data.strict=true stops at the first bad file: /data/val/000003.JPEG: corrupt JPEG" in line
    assert "trial failed" not in capsys.readouterr().out


def test_nothing_evaluated_is_a_user_error_not_a_key_error(tmp_path, suite_file, capsys, monkeypatch):
    calls = _trial_calls(monkeypatch, metrics={})
    code, line = _run(capsys, str(suite_file), "--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled")
    assert code == 2 and len(calls) == 1
    assert "nothing was evaluated: every val clip of the synthetic benchmark was skipped" in line
    assert "'val/vid_map50' cannot be computed" in line


def test_a_suite_metric_no_trial_produces_names_the_valid_ones(tmp_path, suite_file, capsys, monkeypatch):
    suite_file.write_text(SUITE.replace("metric: val/vid_map50", "metric: val/vid_map5O"))
    _trial_calls(monkeypatch, metrics={"val/vid_map50": 0.5, "val/coco_ap50": 0.4})
    code, line = _run(capsys, str(suite_file), "--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled")
    assert code == 2
    assert f"{suite_file}: the suite's metric 'val/vid_map5O' is not among trial " in line
    assert "valid: " in line and "val/vid_map50" in line


def test_unexpected_errors_are_retried_and_the_last_line_names_the_first_cause(tmp_path, suite_file, capsys,
                                                                                monkeypatch):
    calls = _trial_calls(monkeypatch, RuntimeError("CUDA out of memory"))
    code = main(["run", str(suite_file), "--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled",
                 "--report-dir", str(tmp_path / "reports")])
    line = _one_line_error(capsys)
    assert code == 1 and len(calls) == 2 * 3  # each grid point tried MAX_RETRIES times
    assert "2 trial(s) of suite tiny not finished" in line
    assert "failed 3 times; first cause: trial " in line and ": RuntimeError: CUDA out of memory" in line
    assert not (tmp_path / "reports").exists()  # no report of nothing (and no pandas message about it)


def test_a_user_error_does_not_use_up_the_retries(tmp_path, suite_file, capsys, monkeypatch):
    runs = ["--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled", "--report-dir", str(tmp_path / "reports")]
    for _ in range(4):  # more reruns than MAX_RETRIES, each stopped by the same data error
        _trial_calls(monkeypatch, VidDataError("x.JPEG: corrupt"))
        assert main(["run", str(suite_file), *runs]) == 2
    calls = _trial_calls(monkeypatch, metrics={"val/vid_map50": 0.5})  # the user fixed the data
    assert main(["run", str(suite_file), *runs]) == 0
    assert sorted(calls) == ["bottleneck_lstm", "none"]  # each once (the longest first: the order is the harness's)


def test_seeds_of_a_search_suite_are_named_as_unused(tmp_path, capsys, monkeypatch):
    """A TPE search trains each sampled point once (seed 0): --seeds says so instead of silently doing nothing."""
    suite_file = tmp_path / "tiny_search.yaml"
    suite_file.write_text(SUITE.split("grid:")[0] + "search:\n  trials: 1\n  space:\n"
                          "    model.alpha_lstm: {low: 0.1, high: 0.5}\n")
    _trial_calls(monkeypatch, metrics={"val/vid_map50": 0.5})
    runs = ["--runs-dir", str(tmp_path / "runs"), "--wandb", "disabled", "--report-dir", str(tmp_path / "reports")]
    assert main(["run", str(suite_file), "--seeds", "3", *runs]) == 0
    out = capsys.readouterr().out
    assert "a search trains each point TPE samples once, at seed 0: --seeds 3 repeats the points of grid" in out
    assert main(["run", str(suite_file), *runs]) == 0
    assert "--seeds" not in capsys.readouterr().out
