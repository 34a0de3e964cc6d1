"""The sweep harness: every grid point exactly once, across reruns, kills and concurrent workers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from ablations.config import ConfigError, UserError, load_config
from ablations.harness import RunOptions, enqueue_missing, eta_seconds, is_try, open_study, run_study
from ablations.suite import PROFILE_DEFAULTS, load_suite
from lightning_modules.config import nest

WORKER = Path(__file__).parent / "helpers" / "harness_worker.py"
SUITE = """\
description: harness test suite
table: table3
metric: val/vid_map50
base: {model.input_size: 64}
grid:
  model.alpha: [0.25, 0.5, 1.0]
  model.recurrent.type: [none, bottleneck_lstm]
"""


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "harness_test.yaml"
    path.write_text(SUITE)
    return path


def _worker(suite_file, runs, *extra, wait=True):
    cmd = [sys.executable, str(WORKER), str(suite_file), str(runs), *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _calls(runs):
    log = Path(runs) / "calls.log"
    return log.read_text().split() [::2] if log.exists() else []


def _complete(suite_file, runs):
    study = open_study(load_suite(str(suite_file)), RunOptions(runs_dir=Path(runs)))
    return [t for t in study.get_trials() if t.state == TrialState.COMPLETE]


def test_grid_runs_once_records_match_study_and_rerun_skips(tmp_path, suite_file):
    runs = tmp_path / "runs"
    assert _worker(suite_file, runs).returncode == 0
    complete = _complete(suite_file, runs)
    assert len(complete) == 6 and len({t.user_attrs["key"] for t in complete}) == 6
    results = pd.read_csv(runs / "harness_test" / "results.csv")
    assert len(results) == 6
    by_key = {t.user_attrs["key"]: t.value for t in complete}
    for _, row in results.iterrows():
        assert row["value"] == by_key[row["key"]] == row["metric.val/vid_map50"]
        assert row["config.model.alpha"] * 10 == row["value"]
    for column in ("git_commit", "versions", "wall_time_s", "axis.model.alpha", "axis.model.recurrent.type"):
        assert column in results.columns
    assert _worker(suite_file, runs).returncode == 0  # rerun: nothing left to do
    assert len(_calls(runs)) == 6


def _in_process(tmp_path, suite_file, calls):
    """run(*overrides, seeds=1): the suite in this process, each trial's key appended to `calls`; its records."""
    def trial_fn(cfg, ctx):
        calls.append(ctx.key)
        return {"val/vid_map50": cfg.model.alpha, "params": 1}

    def run(*overrides, seeds=1):
        options = RunOptions(runs_dir=tmp_path / "runs", overrides=list(overrides), seeds=seeds)
        return run_study(load_suite(str(suite_file)), options, trial_fn,
                         lambda delta: load_config([], delta=nest({k: v for k, v in delta.items() if k != "seed"})),
                         log=lambda line: None)
    return run


def test_a_study_resumed_with_other_overrides_is_refused_and_with_speed_keys_resumed(tmp_path, suite_file):
    calls = []
    run = _in_process(tmp_path, suite_file, calls)
    assert len(run("train.lr=0.001", "data.root=/data/a")) == 6 and len(calls) == 6
    # the same settings (in another order and spelling), and a speed key beside them: resumed, nothing retrained
    assert len(run("data.root=/data/a", "train.lr=1e-3", "train.threads=2")) == 6 and len(calls) == 6
    with pytest.raises(UserError, match=r"was run with the overrides \[data.root=/data/a, train.lr=0.001\], this "
                                        r"run gives \[data.root=/data/b, train.lr=0.001\].*another --runs-dir"):
        run("train.lr=0.001", "data.root=/data/b")
    with pytest.raises(UserError, match=r"this run gives \[none\]"):
        run()
    assert len(calls) == 6  # refused before any trial


def test_a_study_resumed_after_its_suite_file_changed_is_refused(tmp_path, suite_file):
    calls = []
    run = _in_process(tmp_path, suite_file, calls)
    assert len(run()) == 6 and len(calls) == 6
    # a comment, the description and a speed key in the profile change no trial: resumed, nothing retrained
    suite_file.write_text(SUITE.replace("harness test suite", "harness test suite, described again") +
                          "# a comment\nprofiles:\n  synthetic: {train.threads: 2}\n")
    assert len(run()) == 6 and len(calls) == 6
    suite_file.write_text(SUITE.replace("model.input_size: 64", "model.input_size: 96"))
    with pytest.raises(UserError, match=r"harness_test.yaml\) now gives its 'synthetic' profile \(model.input_size: "
                                        r"64 -> 96;.*Restore those settings.*another --runs-dir"):
        run()
    suite_file.write_text(SUITE + "profiles:\n  synthetic: {train.max_steps: 5}\n")
    with pytest.raises(UserError, match=rf"train.max_steps: {PROFILE_DEFAULTS['synthetic']['train.max_steps']} -> 5"):
        run()
    assert len(calls) == 6  # refused before any trial


def test_a_study_resumed_after_its_evaluations_changed_is_refused(tmp_path, suite_file):
    calls = []
    run = _in_process(tmp_path, suite_file, calls)
    suite_file.write_text(SUITE + "evaluate: {occlusion_p: [0.5]}\n")
    assert len(run()) == 6 and len(calls) == 6
    suite_file.write_text(SUITE + "evaluate:\n  occlusion_p: [0.5]  # the same block, spelt otherwise\n")
    assert len(run()) == 6 and len(calls) == 6
    suite_file.write_text(SUITE + "evaluate: {occlusion_p: [0.25, 0.5]}\n")  # finished trials have no p=0.25 score
    with pytest.raises(UserError, match=r"other evaluations than suite 'harness_test'.*occlusion_p: \[0.5\] -> "
                                        r"\[0.25, 0.5\].*Restore the `evaluate:` block to resume it"):
        run()
    suite_file.write_text(SUITE)
    with pytest.raises(UserError, match=r"occlusion_p: \[0.5\] -> unset"):
        run()
    assert len(calls) == 6  # refused before any trial


def test_a_broken_pipe_that_is_not_the_output_fails_its_trial_and_the_suite_goes_on(tmp_path, suite_file):
    """A BrokenPipeError from another pipe (a socket, a child's pipe) while stdout's reader is there is a trial's
    error like any other (a try, retried later), not the reader leaving (an interruption that stops the suite)."""
    broken = []

    def trial_fn(cfg, ctx):
        if not broken:
            broken.append(ctx.key)
            raise BrokenPipeError(32, "Broken pipe (a socket)")
        return {"val/vid_map50": cfg.model.alpha}

    options = RunOptions(runs_dir=tmp_path / "runs")
    records = run_study(load_suite(str(suite_file)), options, trial_fn,
                        lambda delta: load_config([], delta=nest({k: v for k, v in delta.items() if k != "seed"})),
                        log=lambda line: None)
    assert len(records) == 6 and broken[0] in {r.key for r in records}  # retried in the same run, as any error is
    failed = [t for t in open_study(load_suite(str(suite_file)), options).get_trials()
              if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs.get("key") == broken[0]
    assert is_try(failed[0].user_attrs) and "BrokenPipeError" in failed[0].user_attrs.get("error", "")


def test_a_rerun_with_fewer_seeds_leaves_the_trials_a_larger_run_queued_to_such_a_run(tmp_path, suite_file):
    calls = []
    run = _in_process(tmp_path, suite_file, calls)
    study = open_study(load_suite(str(suite_file)), RunOptions(runs_dir=tmp_path / "runs"))
    enqueue_missing(study, dict.fromkeys(_load_keys(suite_file, seeds=2)))  # a --seeds 2 run, stopped before any trial
    assert len(run()) == 6 and sorted(calls) == sorted(_load_keys(suite_file))  # seed 0's six, not a KeyError
    assert len(run(seeds=2)) == 12 and sorted(calls) == sorted(_load_keys(suite_file, seeds=2))  # the rest, once


def test_killed_worker_keeps_finished_trials_and_rerun_retries_the_interrupted_one(tmp_path, suite_file):
    runs = tmp_path / "runs"
    first = _load_keys(suite_file)
    killed = _worker(suite_file, runs, "--kill-at", first[2])
    assert killed.returncode != 0  # SIGKILL mid-trial
    assert len(_complete(suite_file, runs)) == 2  # the two finished trials are kept
    assert len(pd.read_csv(runs / "harness_test" / "results.csv")) == 2
    assert _worker(suite_file, runs).returncode == 0
    complete = _complete(suite_file, runs)
    assert sorted(t.user_attrs["key"] for t in complete) == sorted(first)
    assert sorted(_calls(runs)) == sorted(first)  # nothing ran twice to completion


def test_failed_trial_is_retried(tmp_path, suite_file):
    runs = tmp_path / "runs"
    keys = _load_keys(suite_file)
    assert _worker(suite_file, runs, "--fail-once-at", keys[1]).returncode == 0
    study = open_study(load_suite(str(suite_file)), RunOptions(runs_dir=runs))
    states = [(t.user_attrs.get("key"), t.state) for t in study.get_trials()]
    assert (keys[1], TrialState.FAIL) in states and (keys[1], TrialState.COMPLETE) in states
    assert len(_complete(suite_file, runs)) == 6


def test_two_concurrent_workers_never_duplicate_or_lose_a_trial(tmp_path, suite_file):
    runs = tmp_path / "runs"
    procs = [_worker(suite_file, runs, "--sleep", "0.3", wait=False) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    calls = _calls(runs)
    assert sorted(calls) == sorted(_load_keys(suite_file)), "each grid point exactly once"
    pids = {line.split()[1] for line in (runs / "calls.log").read_text().splitlines()}
    assert len(pids) == 2, "both workers took trials"


def test_seeds_are_spread_over_workers_like_grid_points(tmp_path, suite_file):
    runs = tmp_path / "runs"
    procs = [_worker(suite_file, runs, "--sleep", "0.3", "--seeds", "2", wait=False) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    keys = _load_keys(suite_file, seeds=2)
    assert len(keys) == 12 and sorted(_calls(runs)) == sorted(keys), "each (grid point, seed) exactly once"
    lines = (runs / "calls.log").read_text().splitlines()
    assert len({line.split()[1] for line in lines}) == 2, "both workers took trials"
    results = pd.read_csv(runs / "harness_test" / "results.csv")
    assert sorted(results["seed"]) == [0] * 6 + [1] * 6
    assert (results["config.data.seed"] == results["seed"]).all()  # each trial trained with its own seed


def test_longest_first_hands_out_the_costliest_points_first_with_their_seeds_together(suite_file):
    from ablations.harness import grid_keys, longest_first

    keys = grid_keys(load_suite(str(suite_file)), RunOptions(seeds=2))
    points = list(dict.fromkeys(point.point_id for point, _ in keys.values()))
    cost = {points[0]: 1.0, points[1]: 3.0, points[2]: 3.0}  # the rest 2.0
    ordered = longest_first(keys, lambda point: cost.get(point.point_id, 2.0))
    assert sorted(ordered) == sorted(keys) and all(ordered[k] == keys[k] for k in keys)
    order = [point.point_id for point, _ in ordered.values()]
    expected = [points[1], points[2]] + [p for p in points[3:]] + [points[0]]  # ties keep the grid's order
    assert order == [p for p in expected for _ in range(2)]


def test_trials_run_longest_first_and_are_recorded_in_grid_order(tmp_path, suite_file):
    runs = tmp_path / "runs"
    result = _worker(suite_file, runs, "--seeds", "2", "--widest-first")
    assert result.returncode == 0, result.stderr[-2000:]
    results = pd.read_csv(runs / "harness_test" / "results.csv")
    ran = [results.set_index("key").loc[key, "config.model.alpha"] for key in _calls(runs)]
    assert ran == sorted(ran, reverse=True) and ran[0] == 1.0  # the widest (the costliest here) first
    assert list(results["key"]) == _load_keys(suite_file, seeds=2)  # the records: the grid's order, seeds ascending


def test_the_eta_weighs_each_trial_by_its_work_and_a_shared_stage_once(suite_file):
    from ablations.harness import GridPoints, Work

    def work(delta):  # seed 1's trials twice seed 0's; each seed's stage 1 (10) shared by its trials
        return Work(float(delta["seed"] + 1), (f"stage1-s{delta['seed']}", 10.0))

    points = GridPoints(load_suite(str(suite_file)), RunOptions(seeds=2), None, lambda line: None, work)
    seed0 = [key for key in points.keys if key.endswith("-s0")]
    assert points.amount(seed0[:1]) == 1 + 10 and points.amount(seed0[:2]) == 2 + 10  # stage 1 counted once
    assert points.amount(points.keys) == len(seed0) * (1 + 2) + 2 * 10
    assert list(points.keys)[:len(seed0) * 2:2] == [key for key in seed0]  # equal own work: the grid's order
    # the first trial, which trained its seed's stage 1, stands for 11 of the grid's 38: 10 minutes for it
    # leave 24.5 minutes, not the 50 that counting trials (1 of 12) would say
    assert eta_seconds(600.0, points.amount(seed0[:1]), 0.0, points.amount(points.keys)) == 600.0 / 11 * 27
    assert eta_seconds(600.0, 1, 0, 12) == 600.0 * 11


def _load_keys(suite_file, seeds=1):
    from ablations.harness import grid_keys

    return list(grid_keys(load_suite(str(suite_file)), RunOptions(seeds=seeds)))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("description: x\ntable: t\nmetric: m\ngrid: {model.alpah: [1]}\n", "model.alpah"),
        ("description: x\ntable: t\nmetric: m\nbogus: 1\n", "unknown suite key"),
        ("description: x\ntable: t\nmetric: m\ngrid: {model.alpha: []}\n", "non-empty list"),
        ("description: x\ntable: t\nmetric: m\nprofiles: {laptop: {}}\n", "unknown profile 'laptop'"),
        ("description: x\nmetric: m\n", "missing required key 'table'"),
        ("description: [x\n", "not valid YAML"),
    ],
)
def test_bad_suite_files_name_the_problem(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as error:
        load_suite(str(path))
    assert expected in str(error.value)


def test_unknown_suite_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown suite 'nope'; valid:"):
        load_suite("nope")


def test_the_suite_eta_is_the_rate_since_this_worker_started():
    """Every worker's finished trials count (parallel workers, trials sharing a stage 1); trials finished
    by an earlier run do not, and there is no ETA before the first trial of this run finishes."""
    assert eta_seconds(elapsed=600.0, done=4, done_at_start=0, total=10) == 900.0
    assert eta_seconds(elapsed=600.0, done=7, done_at_start=5, total=10) == 900.0  # 5 were done by a killed run
    assert eta_seconds(elapsed=600.0, done=5, done_at_start=5, total=10) is None
    assert eta_seconds(elapsed=600.0, done=10, done_at_start=0, total=10) is None


def test_search_workers_sample_different_points_and_a_rerun_the_same(tmp_path):
    """Two workers are two processes, each with its own sampler: seeded alike they drew the same point
    (search_alpha_lstm's first two trials were one point twice). Seeded by trial number they differ, and a
    search run again from scratch samples the same points."""
    from ablations.harness import SearchPoints

    path = tmp_path / "search.yaml"
    path.write_text("description: search\ntable: search\nmetric: val/vid_map50\nbase: {}\nsearch:\n  trials: 6\n"
                    "  space:\n    model.alpha_lstm: {low: 0.03, high: 0.5, log: true}\n")
    suite = load_suite(str(path))

    def sampled(runs):
        options = RunOptions(runs_dir=runs)
        workers = [SearchPoints(suite, options, open_study(suite, options), print) for _ in range(2)]  # own samplers
        points = []
        for i in range(6):
            worker = workers[i % 2]
            trial = worker.claim()
            points.append(worker.prepare(trial).ctx.labels["model.alpha_lstm"])
            worker.study.tell(trial, 0.5)
        return points

    first = sampled(tmp_path / "a")
    assert len(set(first)) == 6
    assert sampled(tmp_path / "b") == first
