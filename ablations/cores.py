"""Idle cores lent to the stage other workers wait for (`sweep.lend_idle_cores`).

With `tafm run --workers N` every trial that needs a stage another worker is training (every trial of a
suite needs its stage 1) waits on that stage's lock, and each worker trains on one thread
(`train.threads`): on a 2-core laptop a suite's first stage 1 runs on one core while the other sits
idle. A waiting worker leaves a marker (its pid) beside the lock; the worker training the stage counts
the live markers every few steps and trains on one more thread per waiting worker, never more than
the machine's cores, and back to its own count when they are gone. Threads change float rounding
only, so the stage cache ignores them (`ablations.runner._NOT_TRAINING`).

A worker with no trial left to claim does the same for the stages still training (`lend_until`): it
waits marked beside every stage lock another process holds until the suite's last trial is done, so a
suite's last trial does not train on one core while the others sit idle.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from filelock import FileLock, Timeout
from pytorch_lightning import Callback

from ablations.harness import pid_alive

#: Steps between two counts of the waiting workers.
CHECK_EVERY = 20


def waiting_dir(lock_path: Path) -> Path:
    return Path(lock_path).with_suffix(".waiting")


@contextlib.contextmanager
def waiting_for(lock_path: Path) -> Iterator[None]:
    """Mark this process as waiting on `lock_path` (a file named by its pid) for the block's length."""
    marker = waiting_dir(lock_path) / str(os.getpid())
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def waiting_workers(lock_path: Path) -> int:
    """Live processes waiting on `lock_path`; markers of dead ones (a killed worker) are removed."""
    directory = waiting_dir(lock_path)
    if not directory.is_dir():
        return 0
    count = 0
    for marker in directory.iterdir():
        if marker.name.isdigit() and pid_alive(int(marker.name)):
            count += 1
        else:
            marker.unlink(missing_ok=True)
    return count


@contextlib.contextmanager
def stage_lock(lock_path: Path, mark_waiting: bool = True) -> Iterator[None]:
    """Hold `lock_path`; while another process holds it, wait marked (`waiting_for`) when `mark_waiting`."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        with waiting_for(lock_path) if mark_waiting else contextlib.nullcontext():
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def held_by_another(lock_path: Path) -> bool:
    """Whether another process holds `lock_path` now (a stage being trained)."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def lend_until(done: Callable[[], bool], stages_dir: Path, poll_s: float = 5.0) -> int:
    """For a worker with no trial left: wait marked beside every stage lock in `stages_dir` that another
    process holds (the stages train on one more thread each, `LendIdleCores`), following them as they
    start and end, until `done()`. Returns how many stages it was lent to."""
    marked: Dict[Path, contextlib.ExitStack] = {}  # lock -> its `waiting_for` marker, open
    lent = 0
    try:
        while not done():
            held = {p for p in Path(stages_dir).glob("*.lock") if held_by_another(p)}
            for lock in held - marked.keys():
                marked[lock] = contextlib.ExitStack()
                marked[lock].enter_context(waiting_for(lock))
                lent += 1
            for lock in marked.keys() - held:
                marked.pop(lock).close()
            time.sleep(poll_s)
    finally:
        for mark in marked.values():
            mark.close()
    return lent


class LendIdleCores(Callback):
    """Train on one more thread per worker waiting on `lock_path` (at most `cores`), counted every
    `every` steps; the stage's own thread count is restored when training ends."""

    def __init__(self, lock_path: Path, cores: Optional[int] = None, every: int = CHECK_EVERY,
                 log: Any = None) -> None:
        self.lock_path = Path(lock_path)
        self.cores = cores or os.cpu_count() or 1
        self.every = every
        self.say = log  # not `self.log`: under a Trainer that call reached LightningModule.log (tests/test_cores.py)
        self.own: Optional[int] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.own = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.own is None or trainer.global_step % self.every:
            return
        want = min(self.cores, self.own + waiting_workers(self.lock_path))
        if want != torch.get_num_threads():
            if self.say:
                lent = want - self.own
                self.say(f"    step {trainer.global_step}: " + (f"{want} threads, {lent} lent by the workers waiting "
                         f"for this stage" if lent else f"back to {want} thread{'s' if want > 1 else ''}"))
            torch.set_num_threads(want)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.own is not None:
            torch.set_num_threads(self.own)
