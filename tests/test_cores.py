"""ablations.cores: a worker waiting for a stage lends its core to the worker training it."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock

from ablations.cores import LendIdleCores, stage_lock, waiting_dir, waiting_for, waiting_workers


def test_waiting_workers_counts_live_markers_and_drops_dead_ones(tmp_path):
    lock = tmp_path / "stage.lock"
    assert waiting_workers(lock) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    waiting_dir(lock).mkdir()
    (waiting_dir(lock) / str(dead.pid)).touch()  # a killed worker's marker
    with waiting_for(lock):
        assert waiting_workers(lock) == 1
    assert waiting_workers(lock) == 0
    assert list(waiting_dir(lock).iterdir()) == []


def test_a_worker_blocked_on_the_stage_lock_is_counted_until_it_gets_the_lock(tmp_path):
    lock = tmp_path / "stage.lock"
    holder = FileLock(str(lock))  # the worker training the stage (flock: another lock object blocks on it)
    holder.acquire()
    got = threading.Event()

    def wait():
        with stage_lock(lock):
            got.set()

    waiter = threading.Thread(target=wait, daemon=True)
    try:
        waiter.start()
        deadline = time.time() + 30
        while waiting_workers(lock) == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert waiting_workers(lock) == 1 and not got.is_set()
    finally:
        holder.release()
    waiter.join(30)
    assert got.is_set() and waiting_workers(lock) == 0


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_training_stage_takes_one_thread_per_waiting_worker_and_gives_them_back(tmp_path, threads):
    lock = tmp_path / "stage.lock"
    said = []
    lend = LendIdleCores(lock, cores=2, every=5, log=said.append)
    trainer = SimpleNamespace(global_step=0)
    lend.on_train_start(trainer, None)
    lend.on_train_batch_start(trainer, None, None, 0)
    assert torch.get_num_threads() == 1  # nobody waits
    with waiting_for(lock):
        trainer.global_step = 3
        lend.on_train_batch_start(trainer, None, None, 3)
        assert torch.get_num_threads() == 1  # counted every 5 steps only
        trainer.global_step = 5
        lend.on_train_batch_start(trainer, None, None, 5)
        assert torch.get_num_threads() == 2
        (waiting_dir(lock) / str(os.getppid())).touch()  # a second live waiter: still at most 2 cores
        trainer.global_step = 10
        lend.on_train_batch_start(trainer, None, None, 10)
        assert torch.get_num_threads() == 2
        (waiting_dir(lock) / str(os.getppid())).unlink()
    trainer.global_step = 15
    lend.on_train_batch_start(trainer, None, None, 15)
    assert torch.get_num_threads() == 1
    assert said == ["    step 5: 2 threads, 1 lent by the workers waiting for this stage", "    step 15: back to 1 thread"]
    with waiting_for(lock):
        trainer.global_step = 20
        lend.on_train_batch_start(trainer, None, None, 20)
        lend.on_train_end(trainer, None)
    assert torch.get_num_threads() == 1


def test_a_real_stage_trains_on_the_lent_core_and_says_so(tmp_path, threads):
    """Through Lightning's Trainer, not a stand-in: its callbacks' `log` is not ours to use."""
    from ablations.config import load_config
    from lightning_modules.fit import fit

    cfg = load_config(["train.max_steps=2", "model.alpha=0.25", "model.input_size=128", "data.batch_size=2",
                       "data.clip_length=2", "train.val_every_n_epochs=1000", "data.max_val_videos=1",
                       "model.recurrent.type=none", "model.recurrent.after=[]", f"train.out_dir={tmp_path / 'stage'}"])
    lock, said = tmp_path / "stage.lock", []
    with waiting_for(lock):
        fit(cfg.model, cfg.data, cfg.train, callbacks=[LendIdleCores(lock, cores=2, log=said.append)])
    assert said == ["    step 0: 2 threads, 1 lent by the workers waiting for this stage"]
    assert torch.get_num_threads() == 1


def test_a_worker_without_trials_lends_its_core_to_the_stages_still_training(tmp_path):
    """A worker whose trials are done waits marked beside each stage lock another process holds (not the
    free ones) until the suite is done, then removes its markers."""
    from ablations.cores import lend_until

    held = tmp_path / "training.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                               f"lock = FileLock({str(held)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        free = tmp_path / "cached.lock"
        free.touch()
        seen = []

        def done():
            seen.append((waiting_workers(held), waiting_workers(free)))
            return len(seen) > 2

        assert lend_until(done, tmp_path, poll_s=0.01) == 1
    finally:
        holder.kill()
    assert seen == [(0, 0), (1, 0), (1, 0)]  # marked after the first look, on the held lock only
    assert waiting_workers(held) == 0  # and unmarked when the suite is done


@pytest.mark.parametrize("lend", [True, False])
@pytest.mark.parametrize("worker_only", [True, False])
def test_tafm_run_lends_a_finished_workers_core_unless_told_not_to(monkeypatch, tmp_path, lend, worker_only):
    """`tafm run --workers 2`: the main process, out of trials while a helper still trains, lends until the
    helper exits; a helper out of trials lends until no trial of the suite runs on this host."""
    import ablations.harness as harness
    import ablations.pipeline as pipeline
    from ablations.suite import load_suite

    asked = []
    monkeypatch.setattr(harness, "run_study", lambda *args, **kwargs: [])
    monkeypatch.setattr(pipeline, "_lend_until", lambda done, options: asked.append(done()))
    monkeypatch.setattr(pipeline, "join_workers", lambda helpers, suite, options: [])
    overrides = [f"sweep.lend_idle_cores={str(lend).lower()}"]
    request = pipeline.SuiteRequest("smoke", overrides, runs_dir=tmp_path, report_dir=tmp_path / "reports", workers=2)
    options = pipeline.run_options(request)
    helper = SimpleNamespace(poll=lambda: None)  # still training
    pipeline._run_and_report(request, load_suite("smoke"), options, "disabled", [] if worker_only else [helper],
                             worker_only, log=lambda line: None)
    # done() asked once here: the helper still runs (False); no trial runs on this host (True)
    assert asked == ([worker_only] if lend else [])
