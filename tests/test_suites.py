"""Every suite file is valid; `smoke` runs end to end through the CLI, as a user runs a suite."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from ablations.cli import main
from ablations.harness import RunOptions, open_study
from ablations.suite import PROFILE_DEFAULTS, PROFILES, available_suites, load_suite
from ablations.tracking import read_offline_run

EXPECTED = {"table2_placement", "table3_recurrent", "fig4_lstm_width", "table4_multi_lstm", "table5_comparison",
            "table6_occlusion", "table7_latency", "search_alpha_lstm", "smoke", "quick"}


def test_every_paper_table_has_a_suite():
    assert EXPECTED <= set(available_suites())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_suite_is_valid_in_both_profiles(name):
    suite = load_suite(name)  # validates every grid point's keys against the structured config
    assert suite.description and suite.table and suite.metric
    assert suite.search or suite.points
    # the paper's ReLU cell diverged over 10-frame clips (h ~30x a frame); the suites train the released relu6
    assert suite.base.get("model.recurrent.activation") == "relu6"
    for profile in PROFILES:
        suite.delta(profile)


def test_a_grid_axis_on_a_recipe_default_varies_while_the_suites_own_profile_still_scales(tmp_path):
    path = tmp_path / "axes.yaml"
    path.write_text("description: d\ntable: table3\nmetric: val/vid_map50\n"
                    "base: {model.alpha: 0.5, model.input_size: 256}\n"
                    "grid: {model.recurrent.init: [identity, random], train.lr: [0.001, 0.004]}\n"
                    "profiles: {synthetic: {model.input_size: 192}}\n")
    suite = load_suite(str(path))
    assert {"model.recurrent.init", "train.lr"} <= set(PROFILE_DEFAULTS["synthetic"])  # what the test is about
    deltas = [suite.delta("synthetic", point.overrides) for point in suite.points]
    # the recipe's one init and lr used to replace every point's: four trials of one config
    assert {(d["model.recurrent.init"], d["train.lr"]) for d in deltas} == {
        ("identity", 0.001), ("identity", 0.004), ("random", 0.001), ("random", 0.004)}
    assert {d["model.input_size"] for d in deltas} == {192}  # the suite's own profile block still wins
    assert suite.delta("synthetic")["train.lr"] == PROFILE_DEFAULTS["synthetic"]["train.lr"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("smoke") / "runs"
    reports = runs.parent / "reports"
    assert main(["run", "smoke", "--runs-dir", str(runs), "--wandb", "offline", "--report-dir", str(reports)]) == 0
    assert "bottleneck_lstm" in (reports / "smoke" / "README.md").read_text()  # the run writes its report
    return runs


def test_smoke_records_are_complete_and_match_the_study(smoke_run):
    frame = pd.read_csv(smoke_run / "smoke" / "results.csv")
    assert len(frame) == 2 and set(frame["state"]) == {"COMPLETE"}
    study = open_study(load_suite("smoke"), RunOptions(runs_dir=smoke_run))
    values = {t.user_attrs["key"]: t.value for t in study.trials if t.state.name == "COMPLETE"}
    for _, row in frame.iterrows():
        assert row["value"] == values[row["key"]] == row["metric.val/vid_map50"]
        assert 0.0 <= row["metric.val/vid_map50"] <= 1.0 and row["metric.params"] > 0 and row["metric.macs"] > 0
        assert "metric.occ0.5/vid_map50" in row and row["git_commit"] and json.loads(row["versions"])["torch"]
    kinds = set(frame["config.model.recurrent.type"])
    assert kinds == {"none", "bottleneck_lstm"}
    sessions = [json.loads(line) for line in (smoke_run / "smoke" / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 1 and sessions[0]["wall_s"] > 0 and sessions[0]["trials_recorded"] == 2
    assert not list((smoke_run / "smoke" / "sessions.open").glob("*"))  # the finished run's clock moved out
    assert "Wall time: " in (smoke_run.parent / "reports" / "smoke" / "README.md").read_text()


def test_smoke_shares_one_stage1_checkpoint(smoke_run):
    stages = [p for p in (smoke_run / "_stages").iterdir() if p.is_dir()]
    assert len(stages) == 2  # the single-frame SSD (trained once, reused by the LSTM trial) and the LSTM stage
    configs = [json.loads((p / "config.json").read_text()) for p in stages]
    assert sorted(c["model.recurrent.type"] for c in configs) == ["bottleneck_lstm", "none"]
    stage2 = next(c for c in configs if c["model.recurrent.type"] == "bottleneck_lstm")
    assert stage2["train.init_checkpoint"].startswith(str(smoke_run / "_stages"))


def test_smoke_wandb_offline_runs_hold_config_and_summary(smoke_run):
    runs = [read_offline_run(p) for p in sorted((smoke_run / "smoke" / "wandb").glob("offline-run-*"))]
    trials = [r for r in runs if r["job_type"] == "trial"]
    assert any(r["job_type"] == "report" for r in runs)  # the suite's table, as a wandb.Table
    assert len(trials) == 2 and {r["group"] for r in trials} == {"smoke"}
    for run in trials:
        assert "model.recurrent.type" in run["config"] and "val/vid_map50" in run["summary"]
        assert any(tag.startswith("model.recurrent.type=") for tag in run["tags"])


def test_rerun_skips_finished_trials_and_status_and_report_work(smoke_run, capsys, tmp_path):
    before = sorted(p.stat().st_mtime for p in (smoke_run / "_stages").glob("*/done.json"))
    assert main(["run", "smoke", "--runs-dir", str(smoke_run), "--wandb", "disabled", "--report-dir", str(tmp_path)]) == 0
    assert sorted(p.stat().st_mtime for p in (smoke_run / "_stages").glob("*/done.json")) == before
    assert len(pd.read_csv(smoke_run / "smoke" / "results.csv")) == 2
    capsys.readouterr()
    assert main(["status", "smoke", "--runs-dir", str(smoke_run)]) == 0
    assert "2/2 done" in capsys.readouterr().out
    assert main(["report", "smoke", "--runs-dir", str(smoke_run), "--out-dir", str(tmp_path), "--wandb", "disabled"]) == 0
    report = (tmp_path / "smoke" / "README.md").read_text()
    assert "bottleneck_lstm" in report and "| 42.8 |" not in report  # alpha 0.25: no paper cell to compare
    # `tafm run`'s own option works for `tafm report` too (it was only --out-dir: a usage error)
    assert main(["report", "smoke", "--runs-dir", str(smoke_run), "--report-dir", str(tmp_path / "again"),
                 "--wandb", "disabled"]) == 0
    assert (tmp_path / "again" / "smoke" / "README.md").is_file()


def test_a_suite_given_as_a_file_path_runs_and_writes_its_report(tmp_path):
    suite = tmp_path / "my_suite.yaml"
    suite.write_text("""description: "one tiny trial from a user's own file"
table: table3
metric: val/vid_map50
base: {model.alpha: 0.25, model.input_size: 64, model.recurrent.after: [conv13]}
grid:
  model.recurrent.type: [bottleneck_lstm]
profiles:
  synthetic: {train.max_steps: 2, train.max_epochs: null, sweep.stage1_max_steps: 2, data.batch_size: 2, data.clip_length: 2}
""")
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    assert main(["run", str(suite), "--runs-dir", str(runs), "--wandb", "disabled", "--report-dir", str(reports)]) == 0
    assert "bottleneck_lstm" in (reports / "my_suite" / "README.md").read_text()
    index = (reports / "README.md").read_text()  # the run rewrote the index: the user's suite and the built-in ones
    assert "[one tiny trial from a user's own file](my_suite/README.md)" in index
    assert "| table3_recurrent | not run yet: no report |" in index
