"""Stopping `tafm run`: SIGTERM to the main process stops its helper workers too, and an interrupted trial is
recorded as such and retried without counting as a try."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from ablations.harness import MAX_RETRIES, RunOptions, enqueue_missing, is_try, open_study, pid_alive
from ablations.suite import load_suite


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_tafm_run_stops_its_helper_and_records_both_trials_as_interrupted(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "ablations.cli", "run", "smoke", "--workers", "2", "--wandb", "disabled",
           "--runs-dir", str(runs), "--report-dir", str(tmp_path / "reports"),
           "--set", "sweep.stage1_max_steps=100000"]  # stage 1 outlasts the test: both trials stay running
    log = tmp_path / "run.log"  # a file, not a pipe: a helper left running would hold a pipe open
    main = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    study = None
    pids: set = set()
    helper = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and main.poll() is None:
            time.sleep(1.0)
            if not (runs / "smoke").is_dir():
                continue
            study = study or open_study(load_suite("smoke"), RunOptions(runs_dir=runs))
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            pids = {t.user_attrs.get("pid") for t in running} - {None}
            if len(pids) == 2:
                break
        assert len(pids) == 2 and main.pid in pids, log.read_text()[-3000:]
        helper = (pids - {main.pid}).pop()
        main.send_signal(signal.SIGTERM)
        main.wait(timeout=120)
        deadline = time.time() + 30
        while pid_alive(helper) and time.time() < deadline:
            time.sleep(0.2)
        assert not pid_alive(helper), "the helper worker outlived the main process"
    finally:
        for pid in (main.pid, helper):
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    out = log.read_text()
    assert main.returncode == 130 and "tafm: interrupted" in out, out[-3000:]  # as Ctrl-C
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    ended = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["pid"] for t in ended} == pids  # each worker recorded its own trial
    assert all(t.user_attrs.get("error") == "interrupted" and not is_try(t.user_attrs) for t in ended)


def test_an_interrupted_trial_is_requeued_however_often_a_failed_one_is_not(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    for key, attrs in (("stopped", {"error": "interrupted", "interrupted": True}), ("broken", {"error": "boom"})):
        for _ in range(MAX_RETRIES):
            assert enqueue_missing(study, {key: ()}) == [key]
            trial = study.ask()
            for name, value in attrs.items():
                trial.set_user_attr(name, value)
            study.tell(trial, state=TrialState.FAIL)
    assert enqueue_missing(study, {"stopped": (), "broken": ()}) == ["stopped"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_tafm_run_whose_output_is_closed_stops_as_interrupted_not_as_success(tmp_path):
    """`tafm run quick | head`: when the reader goes, the run stops with status 141 (a shell's SIGPIPE status), not
    0, and the trial that was running is recorded as interrupted (retried, not a try)."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "ablations.cli", "run", "smoke", "--workers", "1", "--wandb", "disabled",
           "--runs-dir", str(runs), "--report-dir", str(tmp_path / "reports"),
           "--set", "sweep.stage1_max_steps=100000"]  # stage 1 outlasts the test
    errors = tmp_path / "stderr.log"
    main = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors.open("w"), text=True)
    try:
        seen = []
        for line in main.stdout:  # until stage 1 trains (its progress lines follow every 15 s); the CLI writes
            # each line into the pipe as it prints it
            seen.append(line)
            if "training stage 1" in line:
                break
        assert any("training stage 1" in line for line in seen), "".join(seen)[-3000:]
        main.stdout.close()  # the reader goes away, as `head` does after its lines
        main.wait(timeout=120)
    finally:
        if main.poll() is None:
            main.kill()
    err = errors.read_text()
    assert main.returncode == 141 and "tafm: output closed" in err, err[-3000:]
    trials = open_study(load_suite("smoke"), RunOptions(runs_dir=runs)).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    ended = [t for t in trials if t.state == TrialState.FAIL]  # the other grid point was queued, never started
    assert len(ended) == 1 and ended[0].user_attrs.get("error") == "interrupted" and not is_try(ended[0].user_attrs)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
def test_a_broken_pipe_that_is_not_the_output_is_not_reported_as_the_output_closed():
    """A BrokenPipeError from another pipe (a socket, a child's pipe) while stdout's reader is still there is an
    error with its traceback, not "output closed" with status 141."""
    script = ("import sys\nfrom ablations import cli\n"
              "def broken(args):\n    raise BrokenPipeError(32, 'Broken pipe (a socket)')\n"
              "cli._cmd_run = broken\nsys.exit(cli.main(['run', 'smoke']))\n")
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "BrokenPipeError: [Errno 32] Broken pipe (a socket)" in done.stderr
    assert "output closed" not in done.stderr
