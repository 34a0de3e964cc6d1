"""A smoke run's offline W&B files hold what a researcher plots: one run per training stage (stage 1
included, trained once) with training curves and validation metrics, trial runs that name their stage's
run, and a terminal that shows only tafm's own lines."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from ablations.cli import main
from ablations.tracking import read_offline_run, recorded_run_id, stage_run_id

OUR_LINES = ("[smoke]", "  training ", "    step ", "stage 2 init from ", "wrote ", "| ")


@pytest.fixture(scope="module")
def curves_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("curves") / "runs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "smoke", "--runs-dir", str(runs), "--wandb", "offline", "--report-dir",
                     str(runs.parent / "reports"), "--set", "train.log_every_n_steps=1"])
    assert code == 0
    wandb_runs = [read_offline_run(p) for p in sorted((runs / "smoke" / "wandb").glob("offline-run-*"))]
    return runs, out.getvalue(), wandb_runs


def _values(run, key):
    return [json.loads(row[key]) for row in run["history"] if key in row]


def test_every_stage_is_a_run_with_training_curves_and_validation_metrics(curves_run):
    _, _, runs = curves_run
    stages = {r["job_type"]: r for r in runs if r["job_type"] in ("stage1", "stage2", "control")}
    assert set(stages) == {"stage1", "stage2"}  # stage 1 once, shared by both trials
    for run in stages.values():
        steps = _values(run, "trainer/global_step")
        assert len(set(_values(run, "train/loss"))) >= 3 and len(set(steps)) >= 3  # a curve, not a point
        for key in ("train/lr", "train/grad_norm", "train/frames_per_s", "train/cls_loss", "train/loc_loss"):
            assert _values(run, key), key
        assert all(v > 0 for v in _values(run, "train/frames_per_s"))
        assert _values(run, "val/vid_map50") and _values(run, "val/loss")
        assert run["group"] == "smoke"
    assert _values(stages["stage2"], "train/distill")  # stage 2's warm start is a curve too
    assert json.loads(stages["stage2"]["config"]["parent_run_id"]) == stages["stage1"]["id"]


def test_trial_runs_point_at_the_stage_run_that_trained_them(curves_run):
    runs_dir, _, runs = curves_run
    ids = {r["id"] for r in runs if r["job_type"] in ("stage1", "stage2")}
    trials = [r for r in runs if r["job_type"] == "trial"]
    assert len(trials) == 2
    for trial in trials:
        stage_id = json.loads(trial["config"]["stage_run_id"])
        assert stage_id in ids
        assert recorded_run_id(runs_dir / "_stages" / json.loads(trial["config"]["stage_hash"])) == stage_id
    assert {json.loads(t["config"]["stage"]) for t in trials} == {"stage1", "stage2"}


def test_one_report_run_holds_the_results_and_the_report_tables(curves_run):
    _, _, runs = curves_run
    reports = [r for r in runs if r["job_type"] == "report"]
    assert len(reports) == 1 and reports[0]["group"] == "smoke"
    logged = {key: value for row in reports[0]["history"] for key, value in row.items()}
    for table in ("results", "report/main"):
        assert json.loads(logged[f"{table}/_type"]) == "table-file"
    assert json.loads(logged["pictures/strip/_type"]) == "image-file"  # the baseline beside the best row


def test_the_report_embeds_the_strip_of_the_baseline_and_the_best_row(curves_run):
    runs_dir, out, _ = curves_run
    report = (runs_dir.parent / "reports" / "smoke" / "README.md").read_text()
    assert "## What the detector sees (paper Figure 5)" in report and "](strip.png)" in report
    assert (runs_dir.parent / "reports" / "smoke" / "strip.png").stat().st_size > 0


def test_the_terminal_shows_only_tafm_lines(curves_run):
    _, out, _ = curves_run
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith(OUR_LINES)] == []
    assert sum("val/vid_map50" in line and "trial" in line for line in lines) == 2  # one line per trial result
    assert "torchvision" not in out


def test_a_stage_keeps_its_run_id_when_resumed(tmp_path):
    first = stage_run_id(tmp_path / "abc123", "stage1")
    assert first.startswith("stage1-abc123-") and stage_run_id(tmp_path / "abc123", "stage1") == first
    assert recorded_run_id(tmp_path / "abc123") == first and recorded_run_id(tmp_path / "none") is None


@pytest.mark.parametrize("overrides, kind", [
    (["model.recurrent.type=none", "sweep.single_frame_stage2=false"], "stage1"),
    (["model.recurrent.type=none", "sweep.single_frame_stage2=true"], "control"),  # not tagged stage2
    (["model.recurrent.type=gru", "sweep.single_frame_stage2=true"], "stage2"),
])
def test_the_stage_runs_job_type_names_what_it_trains(overrides, kind):
    from ablations.config import load_config
    from ablations.runner import stage_kind

    assert stage_kind(load_config(overrides)) == kind
