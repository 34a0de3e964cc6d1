"""Training frames/s of the main job's stages, split into data / forward / loss / backward / optimiser, beside
the same stage trained by Lightning (`fit`), and with --baseline the same for another checkout measured in
the same run, steps interleaved (A, B, A, B, ...). Prints figures; it is a benchmark, not a test.

    python benchmarks/bench_training.py [--settings stage1,stage2/lstm] [--steps 4] [--repeats 3]
        [--baseline PATH] [--set key=value ...] [--compare key=value[,key=value]] [--profile paper]

Settings (synthetic profile, what `tafm run quick` trains on a CPU, read from the quick suite: alpha 0.25 @192):
`stage1` (single-frame SSD, 16 single frames) and `stage2/<type>` for none (the single-frame control),
averaging, lstm, gru, bottleneck_lstm (4 clips x 10 frames, base frozen through conv13, one layer after it).
`--profile paper`: alpha 0.5 @256 and alpha 1 @320, stage 1 and stage 2 (Bottleneck-LSTM), 4 clips x 10.

Each variant runs in its own process (benchmarks/training_worker.py) with its checkout's code: this
checkout (`current`, with --set), one more per --compare (this checkout with those keys too), and
`baseline` (--baseline PATH, e.g. `git worktree add /tmp/tafm-base <commit>`; --baseline-threads N runs it with
OMP_NUM_THREADS=N, to tell thread settings from the rest). Per setting: one warm-up step
(its time, with any compilation, is printed apart), then --repeats rounds of --steps steps of a plain loop
per variant in turn, then --fit-repeats runs of the checkout's fit() for 1 + --steps steps. Step times are
medians; [a-b] is the range of the per-round medians; a speed-up is the median of per-round ratios. The
losses of every step are compared with the first variant's (same seed, same batches).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
SYNTHETIC = ("stage1", "stage2/none", "stage2/averaging", "stage2/lstm", "stage2/gru", "stage2/bottleneck_lstm")
PAPER = tuple(f"paper/{w}/stage{k}" for w in ("0.5@256", "1.0@320") for k in (1, 2))
PHASES = ("data", "forward", "loss", "backward", "optimiser")


@dataclass
class Variant:
    """One worker process: a checkout and its config overrides."""

    name: str
    checkout: Path
    overrides: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    log: Path = field(init=False)
    process: Any = field(init=False, default=None)

    def start(self, folder: Path) -> None:
        self.log = folder / f"{self.name}.log"
        command = [sys.executable, str(HERE / "training_worker.py"), str(self.checkout)]
        command += [f"--set={item}" for item in self.overrides]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                        text=True, cwd=str(self.checkout), env={**os.environ, **self.env})

    def ask(self, **request: Any) -> Dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker exited; its log: {self.log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} ({self.checkout}): {reply['error']}; log: {self.log}")
        return reply

    def stop(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


@dataclass
class Measured:
    """One variant's figures for one setting."""

    info: Dict[str, Any]
    first_step: float = 0.0
    phases: Dict[str, List[float]] = field(default_factory=lambda: {k: [] for k in PHASES})
    rounds: List[float] = field(default_factory=list)  # median step seconds of each round
    fit_rounds: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    fit_losses: List[float] = field(default_factory=list)

    def step(self) -> float:
        return statistics.median(self.rounds)

    def fit_step(self) -> Optional[float]:
        return statistics.median(self.fit_rounds) if self.fit_rounds else None


def _median_total(phases: Dict[str, List[float]]) -> float:
    return statistics.median(sum(step) for step in zip(*phases.values()))


def measure(setting: str, variants: List[Variant], steps: int, repeats: int, fit_repeats: int) -> Dict[str, Measured]:
    """Interleaved rounds of the plain loop, then of fit(), for every variant."""
    results = {v.name: Measured(v.ask(cmd="setup", setting=setting)) for v in variants}
    for v in variants:  # warm-up: caches, allocator, any compilation
        reply = v.ask(cmd="bare", steps=1)
        results[v.name].first_step = sum(p[0] for p in reply["phases"].values())
        results[v.name].losses += reply["losses"]
    for _ in range(repeats):
        for v in variants:
            reply = v.ask(cmd="bare", steps=steps)
            measured = results[v.name]
            for key in PHASES:
                measured.phases[key] += reply["phases"][key]
            measured.rounds.append(_median_total(reply["phases"]))
            measured.losses += reply["losses"]
    for _ in range(fit_repeats):
        for v in variants:
            reply = v.ask(cmd="lightning", steps=steps + 1)
            results[v.name].fit_rounds.append(statistics.median(reply["periods"][1:] or reply["periods"]))
            results[v.name].fit_losses = reply["losses"]
    return results


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.0f}"


def _spread(values: List[float], scale: float = 1e3) -> str:
    return f"[{scale * min(values):.0f}-{scale * max(values):.0f}]" if len(values) > 1 else ""


def _ratio(reference: List[float], other: List[float]) -> str:
    """Median and range of other/reference over paired rounds: how many times faster the reference is."""
    ratios = [o / r for r, o in zip(reference, other)]
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def _relative(reference: List[float], other: List[float]) -> List[float]:
    return [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, other)]


def _loss_diff(reference: List[float], other: List[float], first: int = 3) -> str:
    """Relative loss differences of the first steps one by one, then the largest of the rest (from the same
    weights the first step compares the forward pass alone; later steps add every earlier update, and the
    hard-negative top-k amplifies float rounding into different selections within a few steps)."""
    diffs = _relative(reference, other)
    text = ", ".join(f"{d:.0e}" for d in diffs[:first])
    return text + (f"; then <= {max(diffs[first:]):.0e}" if diffs[first:] else "")


def report(setting: str, results: Dict[str, Measured]) -> List[str]:
    """The setting's table: per variant the plain loop's split and frames/s, then fit()'s step, frames/s and
    Lightning's overhead (fit step - plain step, and fit / plain); then the ratios and loss differences."""
    (first_name, first), *others = results.items()
    lines = [f"\n{setting}: {first.info['frames']} frames/step",
             f"{'variant':<12}{'threads':>8}{'1st ms':>8}" + "".join(f"{k[:8]:>9}" for k in PHASES)
             + f"{'step ms':>9}{'':>12}{'frames/s':>9}{'fit ms':>8}{'':>12}{'frames/s':>9}{'Lightning':>16}"]
    for name, m in results.items():
        phases = "".join(f"{_ms(statistics.median(m.phases[k])):>9}" for k in PHASES)
        fit = m.fit_step()
        overhead = f"{_ms(fit - m.step())} ms {fit / m.step():.2f}x" if fit else ""
        fit_cols = f"{_ms(fit):>8}{_spread(m.fit_rounds):>12}{m.info['frames'] / fit:>9.1f}{overhead:>16}" if fit else ""
        lines.append(f"{name:<12}{m.info['threads']:>8}{_ms(m.first_step):>8}{phases}{_ms(m.step()):>9}"
                     f"{_spread(m.rounds):>12}{m.info['frames'] / m.step():>9.1f}{fit_cols}")
    for name, m in others:
        lines.append(f"{first_name} vs {name}: plain loop {_ratio(first.rounds, m.rounds)}, "
                     f"fit {_ratio(first.fit_rounds, m.fit_rounds)} faster; loss relative differences by step: "
                     f"{_loss_diff(first.losses, m.losses)}")
    for name, m in results.items():
        fit_text = f"fit vs plain loop losses: {_loss_diff(m.losses, m.fit_losses)}; " if m.fit_losses else ""
        lines.append(f"{name}: {fit_text}applied: {', '.join(m.info['applied']) or 'nothing'}")
    return lines


def _variants(args: argparse.Namespace) -> List[Variant]:
    checkout = HERE.parent
    variants = [Variant("current", checkout, list(args.overrides))]
    for index, compare in enumerate(args.compare, start=1):
        variants.append(Variant(f"compare{index}", checkout, list(args.overrides) + compare.split(",")))
    if args.baseline is not None:
        threads = {"OMP_NUM_THREADS": str(args.baseline_threads)} if args.baseline_threads else {}
        variants.append(Variant("baseline", args.baseline.resolve(), list(args.baseline_overrides), threads))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["synthetic", "paper"], default="synthetic")
    parser.add_argument("--settings", default=None, help=f"comma-separated; synthetic: {', '.join(SYNTHETIC)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the plain loop")
    parser.add_argument("--fit-repeats", type=int, default=1, help="interleaved fit() runs (0: skip Lightning)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout, measured in the same run")
    parser.add_argument("--baseline-set", action="append", default=[], dest="baseline_overrides", metavar="KEY=VALUE")
    parser.add_argument("--baseline-threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the baseline (a checkout without train.threads); 0: its default")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config override for this checkout's variants")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one more variant: this checkout with these overrides too")
    args = parser.parse_args()
    settings = args.settings.split(",") if args.settings else list(SYNTHETIC if args.profile == "synthetic" else PAPER)
    variants = _variants(args)
    folder = Path(tempfile.mkdtemp(prefix="bench-training-"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; variants: "
          + "; ".join(f"{v.name} = {v.checkout} {' '.join(v.overrides)} {' '.join(f'{k}={x}' for k, x in v.env.items())}"
                      .rstrip() for v in variants))
    for v in variants:
        v.start(folder)
    try:
        for setting in settings:
            results = measure(setting, variants, args.steps, args.repeats, args.fit_repeats)
            print("\n".join(report(setting, results)), flush=True)
    finally:
        for v in variants:
            v.stop()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; worker logs in {folder}")


if __name__ == "__main__":
    main()
