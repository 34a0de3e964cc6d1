"""Paper Table 7 regenerated: our exported models' single-thread latency beside the Pixel 2 figures.

The headline runtime is the mobile one, ExecuTorch with the XNNPACK delegate; onnxruntime is a second column
where it is installed. Every model runs in every runtime in one pinned process, models interleaved, `rounds`
times (the spread is printed: these machines are shared and noisy), against the core's GEMM peak measured
before and after by the fastest runtime available (lightning_modules/deploy/latency.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ablations import paper
from lightning_modules.config import Arch, ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.markdown import markdown_table
from lightning_modules.deploy.export import SUFFIX, export_model
from lightning_modules.deploy.formats import installed as installed_format
from lightning_modules.deploy.latency import (DEFAULT_FRAMES, DEFAULT_PIN_CORE, DEFAULT_THREADS, DEFAULT_WARMUP, RUNTIME_NAMES,
                                       WEIGHTS_NOTE, GemmExports, LatencyResult, PeakResult, cpu_name, export_gemms,
                                       measure_latencies, measure_peak, placement)
from lightning_modules.network import create_model

TABLE7_ROUNDS = 3
HEADLINE = "executorch"


def table7_models() -> List[tuple]:
    """(label, paper TABLE7 key, ModelConfig) of paper Table 7's reimplemented rows: Mobilenet-SSD and LSTM-SSD
    (Bottleneck-LSTMs after conv13 and fm1..fm4, paper Sec. 4.2) at alpha=1@320 and alpha=0.5@256."""
    rows = []
    for alpha in (1.0, 0.5):
        size = paper.INPUT_SIZE[alpha]
        rows.append((f"Mobilenet-SSD (alpha={alpha:g}, {size})", ("mobilenet_ssd", alpha),
                     ModelConfig(arch=Arch.mobilenet_ssd, alpha=alpha, input_size=size,
                                 recurrent=RecurrentConfig(type=RecurrentType.none))))
        rows.append((f"LSTM-SSD (alpha={alpha:g}, {size})", ("lstm_ssd", alpha),
                     ModelConfig(arch=Arch.lstm_ssd, alpha=alpha, input_size=size,
                                 recurrent=RecurrentConfig(after=list(paper.FINAL_PLACEMENT)))))
    return rows


def installed(runtime: str) -> bool:
    """True if the runtime's Python package imports here (a dotted name whose parent is missing is not)."""
    return installed_format(runtime)


@dataclass
class Row:
    """One model of Table 7: its latency in each runtime (the headline first) and the paper's big-core ms."""

    label: str
    key: tuple
    results: Dict[str, LatencyResult]
    paper_ms: float

    @property
    def headline(self) -> LatencyResult:
        return next(iter(self.results.values()))


def _ratio(lstm: LatencyResult, mobilenet: LatencyResult) -> str:
    """LSTM-SSD / Mobilenet-SSD: the ratio of the medians, and the range of the per-round ratios."""
    per_round = [a / b for a, b in zip(lstm.rounds, mobilenet.rounds)]
    spread = f" [{min(per_round):.2f}-{max(per_round):.2f}]" if len(per_round) > 1 else ""
    return f"{lstm.median_ms / mobilenet.median_ms:.2f}{spread}"


@dataclass
class Table7:
    """Our single-thread latency beside the paper's Pixel 2 big-core figures (paper Table 7)."""

    rows: List[Row]
    peak: PeakResult

    def format(self) -> str:
        runtimes = list(self.rows[0].results)
        names = [RUNTIME_NAMES.get(r, r) for r in runtimes]
        first = self.rows[0].headline
        rounds = len(first.rounds)
        header = (["model", f"{names[0]} median ms [{rounds} runs]", "p90 ms"] + [f"{n} median ms" for n in names[1:]]
                  + ["paper big core ms", "ours / paper", "GMAC/frame", "achieved GMAC/s", "of peak"])
        rows = []
        for row in self.rows:
            result = row.headline
            rows.append([row.label, result.median_text(), f"{result.p90_ms:.1f}",
                         *(row.results[r].median_text() for r in runtimes[1:]), f"{row.paper_ms:g}",
                         f"{result.median_ms / row.paper_ms:.2f}", f"{result.macs / 1e9:.3f}",
                         f"{result.macs_per_s / 1e9:.2f}", f"{100 * result.fraction_of_peak:.1f}%"])
        lines = ["### Table 7: single-thread latency per frame", "", *markdown_table(header, rows)]
        lines += self._ratios(runtimes, names)
        lines += ["", f"Ours: {', '.join(names)}, {placement(first.threads, first.pin_core)}, {first.frames} frames "
                      f"x {rounds} rounds (models interleaved) after {first.warmup} warm-up, state fed back; {cpu_name()}. "
                      f"Peak {self.peak.describe()}; \"of peak\" is the {names[0]} column's achieved GMAC/s over it. "
                      f"Paper: Pixel 2 (Snapdragon 835) big core, single thread, custom TF. {WEIGHTS_NOTE}; "
                      f"NMS not included."]
        return "\n".join(lines)

    def _ratios(self, runtimes: List[str], names: List[str]) -> List[str]:
        by_key = {row.key: row for row in self.rows}
        rows = []
        for alpha in sorted({key[1] for key in by_key}, reverse=True):
            lstm, mobilenet = by_key.get(("lstm_ssd", alpha)), by_key.get(("mobilenet_ssd", alpha))
            if lstm is None or mobilenet is None:
                continue
            rows.append([f"alpha={alpha:g}, {paper.INPUT_SIZE[alpha]}",
                         *(_ratio(lstm.results[r], mobilenet.results[r]) for r in runtimes),
                         f"{lstm.paper_ms / mobilenet.paper_ms:.2f}", f"{lstm.headline.macs / mobilenet.headline.macs:.2f}"])
        return ["", *markdown_table(["LSTM-SSD / Mobilenet-SSD", *names, "paper", "MACs"], rows)] if rows else []


def _best(a: PeakResult, b: PeakResult) -> PeakResult:
    return a if a.macs_per_s >= b.macs_per_s else b


@dataclass
class Table7Exports:
    """Table 7's models and the peak's GEMMs, exported and parity-checked (`export_table7`), ready to time."""

    fmt: str
    chosen: List[tuple]
    runtimes: List[str]
    paths: Dict[tuple, Path]  # (label, runtime) -> model file
    gemms: GemmExports


def export_table7(fmt: str, folder: Union[str, Path], labels: Optional[Sequence[str]] = None,
                  second: bool = True) -> Table7Exports:
    """Export (with parity check) paper Table 7's models in `fmt` and, with `second`, in the other runtime where
    installed, and the peak's GEMMs, into `folder`. Nothing here is timed: a suite exports them while the
    other worker trains (ablations.pipeline). `labels` restricts to rows whose label starts with one of them."""
    chosen = [m for m in table7_models() if labels is None or any(m[0].startswith(x) for x in labels)]
    if not chosen:
        raise ValueError(f"table7: no model matches {list(labels or [])}; labels: {[m[0] for m in table7_models()]}")
    runtimes = [fmt] + [r for r in SUFFIX if second and r != fmt and installed(r)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, key, cfg in chosen:
        torch.manual_seed(0)
        net = create_model(cfg).eval()
        for runtime in runtimes:
            name = f"{key[0]}_a{key[1]:g}_{cfg.input_size}{SUFFIX[runtime]}"
            paths[(label, runtime)] = export_model((net, cfg), folder / name, runtime).model_path
    return Table7Exports(fmt, chosen, runtimes, paths, export_gemms(folder))


def table7(fmt: str = HEADLINE, out_dir: Optional[Union[str, Path]] = None, frames: int = DEFAULT_FRAMES,
           warmup: int = DEFAULT_WARMUP, threads: int = DEFAULT_THREADS, pin_core: Optional[int] = DEFAULT_PIN_CORE,
           labels: Optional[Sequence[str]] = None, rounds: int = TABLE7_ROUNDS, second: bool = True,
           exports: Optional[Table7Exports] = None) -> Table7:
    """Time paper Table 7's models in `fmt` and, with `second`, in the other runtime where installed, against the
    core's GEMM peak measured before and after; models exported now (kept in `out_dir` if given) unless
    `exports` (from `export_table7`) has them."""
    with tempfile.TemporaryDirectory() as scratch:
        if exports is None:
            exports = export_table7(fmt, Path(out_dir) if out_dir is not None else Path(scratch), labels, second)
        paths = exports.paths
        peak = measure_peak(exports.fmt, threads, pin_core, exported=exports.gemms)
        results = dict(zip(paths, measure_latencies(list(paths.values()), frames, warmup, threads, pin_core,
                                                    rounds=rounds)))
        peak = _best(peak, measure_peak(exports.fmt, threads, pin_core, exported=exports.gemms))
    rows = []
    for label, key, _ in exports.chosen:
        for runtime in exports.runtimes:
            results[(label, runtime)].peak = peak
        rows.append(Row(label, key, {r: results[(label, r)] for r in exports.runtimes}, paper.TABLE7[key][0]))
    return Table7(rows, peak)


def trial_latency(checkpoint: Union[str, Path], run_dir: Path, frames: int = DEFAULT_FRAMES) -> Dict[str, float]:
    """A trained trial's latency (suite key sweep.latency): the headline runtime as latency_ms_median / _p90, the
    other runtime where installed as latency_<runtime>_ms_median; models written into run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    runtimes = [HEADLINE] + [r for r in SUFFIX if r != HEADLINE and installed(r)]
    paths = [export_model(checkpoint, run_dir / f"model{SUFFIX[r]}", r).model_path for r in runtimes]
    first, *others = measure_latencies(paths, frames=frames, rounds=TABLE7_ROUNDS)
    metrics = {"latency_ms_median": first.median_ms, "latency_ms_p90": first.p90_ms}
    metrics.update({f"latency_{r.fmt}_ms_median": r.median_ms for r in others})
    return metrics
