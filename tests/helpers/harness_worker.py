"""A worker process for the harness tests: runs a suite's grid with a cheap trial function.

    python harness_worker.py SUITE_YAML RUNS_DIR [--kill-at KEY_PREFIX] [--sleep S] [--fail-once-at KEY_PREFIX]
        [--storage URL] [--seeds K]
"""
from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from ablations.config import load_config
from ablations.harness import RunOptions, Work, run_grid
from ablations.suite import load_suite
from lightning_modules.config import nest as _nest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("runs")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--fail-once-at", default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--storage", default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--widest-first", action="store_true", help="order the grid by model.alpha, largest first")
    args = parser.parse_args()
    marker = Path(args.runs) / "failed-once"

    def trial_fn(cfg, ctx):
        if args.kill_at and ctx.key.startswith(args.kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # as if the machine died mid-trial
        if args.fail_once_at and ctx.key.startswith(args.fail_once_at) and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("transient failure")
        time.sleep(args.sleep)
        with open(Path(args.runs) / "calls.log", "a") as log:
            log.write(f"{ctx.key} {os.getpid()}\n")
        return {"val/vid_map50": cfg.model.alpha * 10 + cfg.data.seed, "params": 1}

    def make_config(delta):
        seed = delta.pop("seed")
        return load_config([f"data.seed={seed}"], delta=_nest(delta))

    cost = (lambda delta: Work(float(delta.get("model.alpha", 1.0)))) if args.widest_first else None
    run_grid(load_suite(args.suite), RunOptions(runs_dir=Path(args.runs), storage=args.storage, seeds=args.seeds), trial_fn,
             make_config, log=lambda s: None, cost=cost)


if __name__ == "__main__":
    main()
