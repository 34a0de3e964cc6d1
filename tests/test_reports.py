"""Reports regenerate the paper's tables from a suite's records only, beside the paper's numbers."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from reports.tables import ReportError, read_sessions, report_provenance, wall_time_text, write_index, write_report


def _row(kind, alpha, map50, seed=0, after=("conv13",), arch="lstm_ssd", alpha_lstm=None, **metrics):
    row = {"key": f"{kind}-{alpha}-{alpha_lstm}-s{seed}", "trial": seed, "state": "COMPLETE", "seed": seed,
           "value": map50, "wall_time_s": 1.0, "git_commit": "abc123", "machine": "test",
           "config.model.arch": arch, "config.model.alpha": alpha, "config.model.recurrent.type": kind,
           "config.model.recurrent.after": json.dumps(list(after)), "config.model.alpha_lstm": alpha_lstm,
           "config.train.max_steps": 300, "config.sweep.progressive": True,
           "metric.val/vid_map50": map50, "metric.val/coco_ap50": map50 + 0.01, "metric.params": 3_011_000,
           "metric.macs": 1_123_000_000, "metric.params_recurrent": 604_928, "metric.macs_recurrent": 60_364_800}
    row.update({f"metric.{k}": v for k, v in metrics.items()})
    return row


def _write(tmp_path, suite, rows):
    path = tmp_path / "runs" / suite / "results.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return tmp_path / "runs"


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| model", "| ---"))]


def test_table3_report_rows_paper_values_and_deltas(tmp_path):
    runs = _write(tmp_path, "table3_recurrent", [
        _row("bottleneck_lstm", 1.0, 0.500, seed=0), _row("bottleneck_lstm", 1.0, 0.520, seed=1),
        _row("gru", 0.5, 0.400),
    ])
    readme = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports")
    text = readme.read_text()
    rows = _table_rows(text)
    assert len(rows) == 2
    blstm = next(r for r in rows if "bottleneck_lstm" in r)
    cells = [c.strip() for c in blstm.strip("|").split("|")]
    assert cells[1] == "2"  # two seeds
    assert cells[2] == "51.0 ± 1.4"  # mean +- std of 50.0 and 52.0
    assert cells[3] == "53.5" and cells[4] == "-2.5"  # paper Table 3 and the delta
    assert cells[5] == "baseline"  # no single-frame row at alpha 1: the first row is the baseline
    assert "0.605" in blstm and "| 0.6 |" in blstm and "60.4" in blstm  # recurrent params/MACs vs paper
    gru = next(r for r in rows if "gru" in r)
    assert "| 44.5 | -4.5 | baseline |" in gru  # the only row at alpha 0.5
    assert "VID mAP@0.5" in text and "abc123" in text and "synthetic" in text


def test_occlusion_columns_come_from_records(tmp_path):
    runs = _write(tmp_path, "table6_occlusion", [
        _row("bottleneck_lstm", 1.0, 0.5, after=("conv13", "fm1", "fm2", "fm3", "fm4"), **{"occ0.5/vid_map50": 0.40}),
        _row("none", 1.0, 0.45, after=(), arch="mobilenet_ssd", **{"occ0.5/vid_map50": 0.30}),
    ])
    text = write_report("table6_occlusion", "table6", "Table 6", runs, tmp_path / "reports").read_text()
    assert "mAP p=0.5 (ours)" in text
    lstm = next(r for r in _table_rows(text) if "lstm_ssd" in r)
    assert "| 40.0 | 42.4 | -2.4 |" in lstm  # ours, paper Table 6, delta
    mobile = next(r for r in _table_rows(text) if "mobilenet_ssd" in r)
    assert "| 30.0 | 33.8 | -3.8 |" in mobile


def test_figure4_png_is_written(tmp_path):
    rows = [_row("bottleneck_lstm", 1.0, m, alpha_lstm=a, seed=0) for a, m in ((0.0625, 0.4), (0.25, 0.5), (1.0, 0.52))]
    runs = _write(tmp_path, "fig4_lstm_width", rows)
    readme = write_report("fig4_lstm_width", "fig4", "Figure 4", runs, tmp_path / "reports")
    png = readme.parent / "fig4.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Figure 4](fig4.png)" in readme.read_text()
    index = write_index([("fig4_lstm_width", "Figure 4")], tmp_path / "reports")
    assert "[Figure 4](fig4_lstm_width/README.md)" in index.read_text()


def test_missing_records_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="run `tafm run table2_placement` first"):
        write_report("table2_placement", "table2", "x", tmp_path, tmp_path / "reports")


@pytest.mark.parametrize("control", [True, False])
def test_the_baseline_line_says_how_the_single_frame_row_was_trained(tmp_path, control):
    single = _row("none", 0.5, 0.300, after=())
    single["config.sweep.single_frame_stage2"] = control
    runs = _write(tmp_path, "table3_recurrent", [single, _row("gru", 0.5, 0.400)])
    text = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports").read_text()
    line = next(line for line in text.splitlines() if line.startswith("Single-frame SSD baseline"))
    assert "30.0 mAP" in line
    assert ("same training budget" in line) == control and ("stage-1 model" in line) == (not control)
    assert ("base frozen" in line) == control  # the default stage 2 freezes the base


@pytest.mark.parametrize("control_stages, fair", [(1, False), (5, True)])
def test_the_baseline_line_says_whether_the_control_had_the_progressive_rows_budget(tmp_path, control_stages, fair):
    """Table 5's LSTM-SSD stacks 5 layers progressively (5 stages of 300 steps): a control finetuned for one
    stage's 300 steps had a fifth of its budget, and the report must say so."""
    single = _row("none", 0.5, 0.300, after=(), arch="mobilenet_ssd")
    single["config.sweep.single_frame_stage2"], single["config.sweep.control_stages"] = True, control_stages
    final = _row("bottleneck_lstm", 0.5, 0.450, after=("conv13", "fm1", "fm2", "fm3", "fm4"))
    runs = _write(tmp_path, "table5_comparison", [single, final])
    text = write_report("table5_comparison", "table5", "Table 5", runs, tmp_path / "reports").read_text()
    line = next(line for line in text.splitlines() if line.startswith("Single-frame SSD baseline"))
    assert f"for {300 * control_stages:,} steps" in line
    assert ("same training budget" in line) == fair
    assert ("the recurrent rows trained 1,500 stage-2 steps" in line) == (not fair)


def test_rows_stacked_progressively_are_said_to_have_a_larger_budget(tmp_path):
    rows = [_row("bottleneck_lstm", 1.0, 0.50, after=("conv13",)),
            _row("bottleneck_lstm", 1.0, 0.55, after=("conv13", "fm1", "fm2"))]
    text = write_report("table4_multi_lstm", "table4", "Table 4", _write(tmp_path, "table4_multi_lstm", rows),
                        tmp_path / "reports").read_text()
    assert "the rows trained 300 / 900 stage-2 steps" in text
    same = _write(tmp_path / "same", "table4_multi_lstm", rows[:1])
    assert "Stage-2 budgets differ" not in write_report("table4_multi_lstm", "table4", "Table 4", same,
                                                         tmp_path / "same" / "reports").read_text()


def test_the_baseline_line_says_whether_the_base_was_trained_in_stage2(tmp_path):
    single = _row("none", 0.5, 0.300, after=())
    single["config.sweep.single_frame_stage2"], single["config.train.freeze"] = True, "none"
    runs = _write(tmp_path, "table3_recurrent", [single, _row("gru", 0.5, 0.400)])
    text = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports").read_text()
    assert "with the base trained too for 300 steps" in text


def test_synthetic_rows_sit_beside_the_single_frame_cap(tmp_path):
    runs = _write(tmp_path, "quick", [
        _row("none", 0.25, 0.400, after=(), single_frame_cap=0.70),
        _row("bottleneck_lstm", 0.25, 0.550, single_frame_cap=0.70),
    ])
    text = write_report("quick", "table3", "quick", runs, tmp_path / "reports").read_text()
    assert "vs single-frame cap" in text
    rows = _table_rows(text)
    assert "| -30.0 |" in next(r for r in rows if ", none" in r)
    assert "| -15.0 |" in next(r for r in rows if "bottleneck_lstm" in r)
    assert "Single-frame cap: 70.0 mAP" in text
    # real VID records carry no cap: no column
    runs = _write(tmp_path / "vid", "quick", [_row("none", 0.25, 0.400, after=())])
    assert "single-frame cap" not in write_report("quick", "table3", "quick", runs, tmp_path / "r2").read_text()


def _matches(folder, name, hits):
    """Kept per-video matches: 8 videos, 2 gt boxes of class 1 each; `hits` true positives per video
    (score 0.9), the rest found as false positives (score 0.8)."""
    from reports.significance import VideoMatches

    video, tp, score = [], [], []
    for v in range(8):
        for j in range(2):
            video.append(v), tp.append(int(j < hits)), score.append(0.9 if j < hits else 0.8)
    matches = VideoMatches(video=np.array(video), label=np.ones(16, dtype=np.int16), score=np.array(score),
                           tp=np.array(tp, dtype=np.int8), videos=np.array([f"v{v}" for v in range(8)]),
                           npos=np.tile(np.array([[0, 2]]), (8, 1)))
    path = folder / "trials" / name / "matches" / "p0.npz"
    matches.save(path)
    return str(path.relative_to(folder))


def _with_matches(row, runs_suite, hits, axis):
    row["axis.model.recurrent.type"] = axis
    row["metric.artifact.matches.p0"] = _matches(runs_suite, row["key"], hits)
    return row


@pytest.mark.parametrize("seeds", [1, 2])
def test_rows_carry_a_paired_bootstrap_interval_against_the_baseline(tmp_path, seeds):
    suite = tmp_path / "runs" / "table3_recurrent"
    rows = []
    for seed in range(seeds):
        rows += [_with_matches(_row("none", 0.5, 0.5, after=(), seed=seed), suite, 1, "none"),
                 _with_matches(_row("gru", 0.5, 0.5, seed=seed), suite, 1, "gru"),  # the baseline's twin
                 _with_matches(_row("bottleneck_lstm", 0.5, 1.0, seed=seed), suite, 2, "bottleneck_lstm")]
    pd.DataFrame(rows).to_csv(suite / "results.csv", index=False)
    text = write_report("table3_recurrent", "table3", "Table 3", tmp_path / "runs", tmp_path / "reports").read_text()
    table = _table_rows(text)
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table}
    assert "vs baseline [95% CI]" in text and "paired bootstrap over val videos" in text
    column = 5  # model, seeds, ours, paper, delta, vs baseline
    assert cells["lstm_ssd a=0.5, none"][column] == "baseline"
    assert cells["lstm_ssd a=0.5, none"][1] == str(seeds)  # seeds pooled into one row
    assert cells["lstm_ssd a=0.5, gru after conv13"][column] == "+0.0 [+0.0, +0.0] not significant"
    blstm = cells["lstm_ssd a=0.5, bottleneck_lstm after conv13"][column]
    assert blstm.startswith("+50.0 [") and "not significant" not in blstm


def test_grid_points_building_the_same_model_stay_apart(tmp_path):
    first, second = _row("gru", 0.5, 0.40), _row("gru", 0.5, 0.60)
    first["axis.train.lr"], second["axis.train.lr"] = "0.001", "0.01"
    second["key"] = "gru-other"
    runs = _write(tmp_path, "table3_recurrent", [first, second])
    rows = _table_rows(write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports").read_text())
    assert len(rows) == 2 and "train.lr=0.001" in rows[0] and "| 40.0 |" in rows[0] and "| 60.0 |" in rows[1]
    assert "train.lr=0.01)" in rows[1]  # the last of them too (Figure 4's alpha_lstm=1 row once lost it)


def test_wall_time_seeds_and_commit_reach_the_report_and_the_index(tmp_path):
    runs = _write(tmp_path, "table3_recurrent", [_row("none", 0.5, 0.30, after=(), seed=s) for s in (0, 1)]
                  + [_row("gru", 0.5, 0.40, seed=s) for s in (0, 1)])
    frame = pd.read_csv(runs / "table3_recurrent" / "results.csv")
    frame["config.model.width_scale"] = 0.5
    frame.to_csv(runs / "table3_recurrent" / "results.csv", index=False)
    sessions = runs / "table3_recurrent" / "sessions.jsonl"
    sessions.write_text("\n".join(json.dumps({"wall_s": w, "workers": 2, "seeds": 2}) for w in (1500.0, 1260.0)) + "\n")
    readme = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports")
    text = readme.read_text()
    assert "Wall time: 46 min (2 runs, 2 workers)" in text
    assert "model.width_scale 0.5" in text
    suites = [("table3_recurrent", "Table 3"), ("table6_occlusion", "Table 6")]
    index = write_index(suites, tmp_path / "reports").read_text()
    row = next(line for line in index.splitlines() if line.startswith("| table3_recurrent"))
    assert "| 0, 1 | 4 | 46 min (2 runs, 2 workers) | abc123 |" in row
    assert "| table6_occlusion | not run yet: no report |" in index
    frame["git_commit"] = "0123456789abcdef0123+dirty"
    frame.to_csv(runs / "table3_recurrent" / "results.csv", index=False)
    write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports")
    assert "| 0123456789ab+dirty |" in write_index(suites, tmp_path / "reports").read_text()


def test_the_index_lists_reports_written_from_different_runs_dirs(tmp_path):
    """Each suite's row comes from its report, so a report written from another runs dir keeps its row when
    the next suite's report is written."""
    from ablations.pipeline import report_suites

    first = _write(tmp_path / "a", "table3_recurrent", [_row("none", 0.5, 0.30, after=()), _row("gru", 0.5, 0.40)])
    second = _write(tmp_path / "b", "table2_placement", [_row("none", 1.0, 0.30, after=()), _row("gru", 1.0, 0.40)])
    (second / "table2_placement" / "sessions.jsonl").write_text(json.dumps({"wall_s": 600.0, "workers": 1}) + "\n")
    out = tmp_path / "reports"
    report_suites(["table3_recurrent"], first, out, "disabled", log=lambda message: None)
    report_suites(["table2_placement"], second, out, "disabled", log=lambda message: None)
    rows = {line.split(" | ")[0][2:]: line for line in (out / "README.md").read_text().splitlines()[4:]}
    assert "| 0 | 2 | not recorded | abc123 |" in rows["table3_recurrent"]
    assert "| 0 | 2 | 10 min (1 run, 1 worker) | abc123 |" in rows["table2_placement"]
    assert "not run yet: no report" in rows["table5_comparison"]
    assert "](table3_recurrent/README.md)" in rows["table3_recurrent"]


def test_report_provenance_of_a_report_without_provenance_lines_is_unknown():
    assert report_provenance("# a report\n") == {"seeds": "unknown", "trials": "unknown", "wall": "unknown",
                                                 "commits": "unknown"}


def test_a_suite_without_sessions_says_its_wall_time_was_not_recorded(tmp_path):
    runs = _write(tmp_path, "table3_recurrent", [_row("none", 0.5, 0.30, after=())])
    text = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports").read_text()
    assert "Wall time: not recorded" in text and "width_scale" not in text and "Stage 1:" not in text


def test_a_stage1_on_the_cue_every_frame_twin_is_named_in_the_provenance(tmp_path):
    runs = _write(tmp_path, "table3_recurrent", [_row("none", 0.5, 0.30, after=()), _row("gru", 0.5, 0.40)])
    frame = pd.read_csv(runs / "table3_recurrent" / "results.csv")
    frame["config.sweep.stage1_cue_prob"] = 1.0
    frame.to_csv(runs / "table3_recurrent" / "results.csv", index=False)
    text = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports").read_text()
    line = next(line for line in text.splitlines() if line.startswith("- Stage 1:"))
    assert "class marker on 100% of frames (`sweep.stage1_cue_prob` 1:" in line and "stage 2 and every row" in line


def test_stacked_rows_are_compared_with_a_one_layer_row_of_their_steps(tmp_path):
    """Table 4 with same-steps baselines: the 3-layer row (900 stage-2 steps) is compared with the one-layer
    row given sweep.extra_stages=2 (900), not with the 300-step one; the budget line says so."""
    suite = tmp_path / "runs" / "table4_multi_lstm"

    def row(key, map50, hits, after=("conv13",), extra=0):
        record = _row("bottleneck_lstm", 1.0, map50, after=after)
        record["key"], record["config.sweep.extra_stages"] = key, extra
        return _with_matches(record, suite, hits, key)

    one, longer, deep = row("one", 0.5, 1), row("longer", 1.0, 2, extra=2), row("deep", 1.0, 2, ("conv13", "fm1", "fm2"))
    pd.DataFrame([one, deep, longer]).to_csv(suite / "results.csv", index=False)  # the same-steps row recorded last
    text = write_report("table4_multi_lstm", "table4", "Table 4", tmp_path / "runs", tmp_path / "reports").read_text()
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in _table_rows(text)]
    # rows by steps, one layer first; the 900-step one-layer row against the first (what 600 more steps buy),
    # the 3-layer row against it
    assert [row[5] for row in cells] == ["baseline", "+50.0 [+50.0, +50.0]", "+0.0 [+0.0, +0.0] not significant"]
    assert "each row of several layers is compared with a one-layer row of the same steps" in text
    assert cells[1][0] == "lstm_ssd a=1, bottleneck_lstm after conv13, 2 stages more (900 steps)"
    pd.DataFrame([one, deep]).to_csv(suite / "results.csv", index=False)  # without it: the 300-step row, said so
    text = write_report("table4_multi_lstm", "table4", "Table 4", tmp_path / "runs", tmp_path / "reports").read_text()
    assert [[c.strip() for c in r.strip("|").split("|")][5] for r in _table_rows(text)][1].startswith("+50.0")
    assert "the rows of 900 steps have no one-layer row of their steps" in text


def test_a_searchs_pruned_trials_are_listed_with_their_reason_and_points_read_short(tmp_path):
    kept = _row("bottleneck_lstm", 1.0, 0.40)
    kept["axis.model.alpha_lstm"] = "0.14050388998463584"
    over = _row("bottleneck_lstm", 1.0, 0.0)
    over.update({"key": "search-0001", "state": "PRUNED", "axis.model.alpha_lstm": "0.4557067425415698", "value": None,
                 "metric.pruned": "1.230B MACs over the budget 1.150B", "metric.val/vid_map50": None,
                 "metric.val/coco_ap50": None})
    twin = dict(kept, key="search-0002", **{"axis.model.alpha_lstm": "0.2"})
    runs = _write(tmp_path, "search_alpha_lstm", [kept, over, twin])
    text = write_report("search_alpha_lstm", "search", "Search", runs, tmp_path / "reports").read_text()
    assert "Pruned: 1 of 3 trials, in no row above:" in text
    assert "- search-0001 (model.alpha_lstm=0.456): 1.230B MACs over the budget 1.150B" in text
    assert "(model.alpha_lstm=0.141)" in text and "(model.alpha_lstm=0.2)" in text  # rows of one model, told apart
    assert len(_table_rows(text)) == 2


def test_a_killed_run_keeps_its_time_and_a_finished_one_moves_to_the_sessions_file(tmp_path):
    """The clock of a `tafm run` is on disk while it runs: a run killed mid-suite still counts in the report's
    wall time, marked unfinished; a finished one is one line of sessions.jsonl and leaves no open file."""
    from ablations.pipeline import SessionClock, SuiteRequest

    folder = tmp_path / "runs" / "table3_recurrent"
    killed = SessionClock(folder, SuiteRequest("table3_recurrent", workers=2), heartbeat_s=0.05)
    killed.started -= 1200  # as if it had run 20 minutes
    time.sleep(0.3)
    killed._stopped.set()  # the process dies: no stop(), no finish()
    killed._thread.join()
    (wall,) = [json.loads(p.read_text())["wall_s"] for p in (folder / "sessions.open").glob("*.json")]
    assert 1200 <= wall < 1210  # the heartbeat wrote the time so far
    finished = SessionClock(folder, SuiteRequest("table3_recurrent", workers=2))
    finished.started -= 600
    finished.finish(trials=4)
    assert len(list((folder / "sessions.open").glob("*.json"))) == 1  # only the killed run's
    (line,) = (folder / "sessions.jsonl").read_text().splitlines()
    assert json.loads(line)["trials_recorded"] == 4 and 600 <= json.loads(line)["wall_s"] < 610
    sessions = read_sessions(folder)
    assert sorted(bool(s.get("unfinished")) for s in sessions) == [False, True]
    assert wall_time_text(sessions) == "30 min (2 runs, 1 unfinished, 2 workers)"
    runs = _write(tmp_path / "r", "table3_recurrent", [_row("none", 0.5, 0.30, after=()), _row("gru", 0.5, 0.40)])
    shutil.copytree(folder, runs / "table3_recurrent", dirs_exist_ok=True)
    text = write_report("table3_recurrent", "table3", "Table 3", runs, tmp_path / "reports").read_text()
    assert "Wall time: 30 min (2 runs, 1 unfinished, 2 workers)" in text
    assert report_provenance(text)["wall"] == "30 min (2 runs, 1 unfinished, 2 workers)"
