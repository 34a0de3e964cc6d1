"""Single-threaded latency of exported models, the core's roofline peak, and paper Table 7 rows (paper Sec. 4.5).

The paper times single-threaded inference on one Pixel 2 core. Here an exported model (export.py)
runs through its own runtime (ExecuTorch/XNNPACK or onnxruntime) with `threads` threads, this process
pinned to as many cores from `pin_core` (restored afterwards), a warm-up, then `frames` frames with the
state fed back; `rounds` > 1 repeats that, models interleaved, and reports the spread. Achieved MAC/s =
MACs per frame (lightning_modules/deploy/cost.py) / median time. The peak is the core's ceiling: the best
single-core GEMM throughput any available runtime reaches on the same pinned cores (torch's MKL/oneDNN
sgemm, ExecuTorch's XNNPACK, onnxruntime's MLAS; the report names the winner), so a model's share of it
says how far its depthwise-heavy layers sit below what the core can do, and stays below 100%.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from lightning_modules.deploy.export import FORMATS, SUFFIX, format_of, load_runtime, lower_to_file, read_sidecar
from lightning_modules.deploy.formats import EXPORT_FORMATS
from lightning_modules.markdown import markdown_row, markdown_table

#: Defaults of the measurement (one place).
DEFAULT_FRAMES = 200
DEFAULT_WARMUP = 20
DEFAULT_THREADS = 1
DEFAULT_PIN_CORE = 0
# Peak: square GEMMs n x n x n for each n of PEAK_SIZES (the best of PEAK_REPEATS calls each), in every runtime
# of PEAK_RUNTIMES that is installed. A runtime's 1x1-conv stack measured ~25-60% below the core's GEMM
# ceiling here, and exported models then scored "above 100%" of it.
PEAK_SIZES = (256, 512, 1024)
PEAK_REPEATS = 10
PEAK_RUNTIMES = ("torch", *EXPORT_FORMATS)
DEFAULT_ROUNDS = 1
CLIP_FRAMES = 8  # distinct random frames cycled through during timing
WEIGHTS_NOTE = "random-init weights: latency does not depend on weight values"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the report."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


@contextlib.contextmanager
def pinned(pin_core: Optional[int], threads: int) -> Iterator[None]:
    """Pin this process to cores pin_core .. pin_core+threads-1 (None: no pinning); restore on exit."""
    if pin_core is None:
        yield
        return
    allowed = os.sched_getaffinity(0)
    cores = set(range(pin_core, pin_core + threads))
    if not cores <= allowed:
        raise ValueError(f"latency: cannot pin to cores {sorted(cores)} (pin_core={pin_core}, threads={threads}); "
                         f"this process may use cores {sorted(allowed)}")
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def available_runtimes() -> List[str]:
    """The runtimes of PEAK_RUNTIMES installed here (torch always)."""
    found = ["torch"]
    for runtime in EXPORT_FORMATS:
        with contextlib.suppress(ImportError):
            importlib.import_module(EXPORT_FORMATS[runtime].runtime)
            found.append(runtime)
    return found


@contextlib.contextmanager
def _measuring(runtimes: Sequence[str], threads: int, pin_core: Optional[int]) -> Iterator[None]:
    """Pin, then size torch's threads and (ExecuTorch) its global threadpool inside the pin so its workers start
    pinned; on exit unpin first, then restore both, so the restored workers are not left on the pinned cores."""
    previous, torch_threads = {}, torch.get_num_threads()
    pools = {r: EXPORT_FORMATS[r].set_threads for r in runtimes if r in EXPORT_FORMATS and EXPORT_FORMATS[r].set_threads}
    try:
        with pinned(pin_core, threads):
            torch.set_num_threads(threads)
            for runtime, set_threads in pools.items():
                previous[runtime] = set_threads(threads)
            yield
    finally:
        torch.set_num_threads(torch_threads)
        for runtime, size in previous.items():
            pools[runtime](size)


def _threads(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}"


def placement(threads: int, pin_core: Optional[int]) -> str:
    """e.g. "1 thread on core 0"."""
    where = "unpinned" if pin_core is None else (f"on core {pin_core}" if threads == 1
                                                  else f"on cores {pin_core}-{pin_core + threads - 1}")
    return f"{_threads(threads)} {where}"


def _time_calls(call, count: int) -> List[float]:
    """Wall-clock milliseconds of `count` calls of `call(i)`."""
    times = []
    for i in range(count):
        start = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - start) * 1e3)
    return times


RUNTIME_NAMES = {"torch": "torch (MKL/oneDNN sgemm)", **{f.name: f.label for f in EXPORT_FORMATS.values()}}


@dataclass
class PeakResult:
    """The core's compute ceiling: the best GEMM throughput of the fastest runtime, and every runtime's best."""

    runtime: str
    threads: int
    macs: int
    best_ms: float
    what: str  # the GEMM timed
    runtimes: Dict[str, float] = field(default_factory=dict)  # runtime -> its best MAC/s

    @property
    def macs_per_s(self) -> float:
        return self.macs / (self.best_ms / 1e3)

    def describe(self) -> str:
        """e.g. "84.9 GMAC/s: torch (MKL/oneDNN sgemm), 1024x1024x1024 GEMM, 1 thread (ExecuTorch (XNNPACK) 70.2, ...)"."""
        others = ", ".join(f"{RUNTIME_NAMES.get(r, r)} {v / 1e9:.1f}" for r, v in self.runtimes.items() if r != self.runtime)
        return (f"{self.macs_per_s / 1e9:.1f} GMAC/s: {RUNTIME_NAMES.get(self.runtime, self.runtime)}, {self.what}, "
                f"best of {PEAK_REPEATS} calls, {_threads(self.threads)}" + (f" (others: {others})" if others else ""))

    def format(self) -> str:
        return markdown_row([f"peak ({RUNTIME_NAMES.get(self.runtime, self.runtime)}, {self.what}, {_threads(self.threads)})",
                             f"{self.best_ms:.2f} ms", f"{self.macs / 1e9:.3f} GMAC", f"{self.macs_per_s / 1e9:.1f} GMAC/s"])


def _export_gemm(runtime: str, n: int, folder: Path) -> Optional[Path]:
    """An n x n x n GEMM exported for `runtime` as a bias-free Linear on an [n, n] input (None for torch)."""
    if runtime == "torch":
        return None
    path = folder / f"gemm{n}{SUFFIX[runtime]}"
    with torch.no_grad():
        lower_to_file(nn.Linear(n, n, bias=False).eval(), (torch.randn(n, n),), path, runtime, ["x"], ["y"])
    return path


def _gemm(runtime: str, n: int, path: Optional[Path], threads: int) -> Callable[[int], object]:
    """A call multiplying two n x n float matrices in `runtime` (loaded now: call it inside the pin)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    if runtime == "torch":
        out = torch.empty(n, n)
        return lambda i: torch.mm(a, b, out=out)
    run = load_runtime(path, threads)
    return lambda i: run([a])


GemmExports = Dict[Tuple[str, int], Optional[Path]]


def export_gemms(folder: Union[str, Path], sizes: Sequence[int] = PEAK_SIZES,
                 runtimes: Optional[Sequence[str]] = None) -> GemmExports:
    """The peak's square GEMMs exported once into `folder` for every available runtime (`measure_peak(exported=)`
    times them as often as asked without exporting them again)."""
    present = available_runtimes()
    return {(r, n): _export_gemm(r, n, Path(folder)) for r in (runtimes or PEAK_RUNTIMES) if r in present for n in sizes}


def measure_peak(fmt: Optional[str] = None, threads: int = DEFAULT_THREADS, pin_core: Optional[int] = DEFAULT_PIN_CORE,
                 sizes: Optional[Sequence[int]] = None, repeats: int = PEAK_REPEATS, warmup: int = 2,
                 runtimes: Optional[Sequence[str]] = None, exported: Optional[GemmExports] = None) -> PeakResult:
    """The core's GEMM ceiling: square GEMMs of each size in every available runtime (`fmt`, the runtime of the
    model being judged, must be one of them), the same threads and pinning as the models, the best of
    `repeats` calls each; the fastest runtime's best is the peak. `exported` (from `export_gemms`): the GEMMs
    to time, exported before, all of them or those of `sizes` / `runtimes` where given; otherwise they are
    exported now (`sizes` PEAK_SIZES unless given)."""
    present = available_runtimes()
    if exported is not None:
        given = dict(exported)
        exported = {(r, n): path for (r, n), path in given.items()
                    if (sizes is None or n in sizes) and (runtimes is None or r in runtimes)}
        if not exported:
            raise ValueError(f"measure_peak: none of the exported GEMMs {sorted(given)} is of sizes "
                             f"{list(sizes) if sizes else 'any'} and runtimes {list(runtimes) if runtimes else 'any'}: "
                             "export those with export_gemms")
    sizes = PEAK_SIZES if sizes is None else sizes
    chosen = sorted({r for r, _ in exported}, key=PEAK_RUNTIMES.index) if exported else \
        [r for r in (runtimes or PEAK_RUNTIMES) if r in present]
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"measure_peak: format {fmt!r} is not supported; valid: {', '.join(FORMATS)}")
    if fmt is not None and fmt not in chosen:
        raise ValueError(f"measure_peak: runtime {fmt!r} is not installed here (found: {', '.join(present)})")
    if repeats < 1 or warmup < 0 or not sizes:
        raise ValueError(f"measure_peak: need sizes, repeats >= 1 and warmup >= 0, got {list(sizes)}, {repeats}, {warmup}")
    rates: Dict[str, float] = {}
    best: Dict[str, tuple] = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = exported or export_gemms(folder, sizes, chosen)
        with _measuring(chosen, threads, pin_core):
            for (runtime, n), path in paths.items():
                call = _gemm(runtime, n, path, threads)
                _time_calls(call, warmup)
                ms = min(_time_calls(call, repeats))
                if n ** 3 / (ms / 1e3) > rates.get(runtime, 0.0):
                    rates[runtime], best[runtime] = n ** 3 / (ms / 1e3), (n, ms)
    winner = max(rates, key=rates.get)
    n, ms = best[winner]
    return PeakResult(winner, threads, n ** 3, ms, f"{n}x{n}x{n} GEMM", rates)


@dataclass
class LatencyResult:
    """Per-frame latency of one exported model, state fed back."""

    model: str
    fmt: str
    frames: int
    warmup: int
    threads: int
    pin_core: Optional[int]
    median_ms: float  # median of the rounds' medians
    p90_ms: float
    macs: int
    peak: Optional[PeakResult] = None
    rounds: List[float] = field(default_factory=list)  # each round's median ms

    @property
    def macs_per_s(self) -> float:
        """Achieved MAC/s at the median latency."""
        return self.macs / (self.median_ms / 1e3)

    @property
    def fraction_of_peak(self) -> Optional[float]:
        return None if self.peak is None else self.macs_per_s / self.peak.macs_per_s

    def median_text(self) -> str:
        """e.g. "4.51 [4.44-4.63]": the median and the range of the rounds' medians."""
        spread = f" [{min(self.rounds):.2f}-{max(self.rounds):.2f}]" if len(self.rounds) > 1 else ""
        return f"{self.median_ms:.2f}{spread}"

    HEADER = ("model", "runtime", "median ms", "p90 ms", "GMAC/frame", "achieved GMAC/s", "of peak")

    def cells(self) -> List[str]:
        fraction = "n/a" if self.fraction_of_peak is None else f"{100 * self.fraction_of_peak:.1f}%"
        return [self.model, f"{self.fmt}, {placement(self.threads, self.pin_core)}", self.median_text(),
                f"{self.p90_ms:.2f}", f"{self.macs / 1e9:.3f}", f"{self.macs_per_s / 1e9:.2f}", fraction]

    def row(self) -> str:
        return markdown_row(self.cells())

    def as_dict(self) -> dict:
        """Plain values for JSON: the fields plus achieved MAC/s and the fraction of peak."""
        return {**asdict(self), "macs_per_s": self.macs_per_s, "fraction_of_peak": self.fraction_of_peak,
                "peak_macs_per_s": None if self.peak is None else self.peak.macs_per_s, "cpu": cpu_name()}

    def format(self) -> str:
        lines = markdown_table(self.HEADER, [self.cells()])
        if self.peak is not None:
            lines.append(f"\npeak: {self.peak.describe()}")
        rounds = f" x {len(self.rounds)} rounds" if len(self.rounds) > 1 else ""
        lines.append(f"{self.frames} timed frames{rounds} after {self.warmup} warm-up, state fed back; {cpu_name()}")
        return "\n".join(lines)


class _Stream:
    """An exported model loaded for timing: its runtime, a clip of random frames, the state fed back."""

    def __init__(self, path: Union[str, Path], threads: int, seed: int) -> None:
        self.meta = read_sidecar(path)
        size = self.meta["input_size"]
        generator = torch.Generator().manual_seed(seed)
        self.clip = [torch.rand(1, 3, size, size, generator=generator) * 2 - 1 for _ in range(CLIP_FRAMES)]
        self.state = [torch.zeros(spec["shape"]) for spec in self.meta["state"]]
        self.run = load_runtime(path, threads)

    def time(self, frames: int) -> List[float]:
        def step(i: int) -> None:
            self.state = self.run([self.clip[i % len(self.clip)], *self.state])[2:]
        return _time_calls(step, frames)


def measure_latencies(model_paths: Sequence[Union[str, Path]], frames: int = DEFAULT_FRAMES, warmup: int = DEFAULT_WARMUP,
                      threads: int = DEFAULT_THREADS, pin_core: Optional[int] = DEFAULT_PIN_CORE,
                      peak: Optional[PeakResult] = None, seed: int = 0, rounds: int = DEFAULT_ROUNDS) -> List[LatencyResult]:
    """Median and p90 ms per frame of each exported model (its sidecar gives shapes and MACs), all loaded at once
    with `threads` threads pinned from `pin_core` (None: unpinned): `warmup` frames each, then `rounds` rounds of
    `frames` frames, the models interleaved in each round; the state is fed back every frame."""
    if frames < 1 or warmup < 0 or threads < 1 or rounds < 1:
        raise ValueError(f"measure_latency: need frames >= 1, warmup >= 0, threads >= 1, rounds >= 1; "
                         f"got frames={frames}, warmup={warmup}, threads={threads}, rounds={rounds}")
    fmts = [format_of(path) for path in model_paths]
    for path in model_paths:
        read_sidecar(path)  # a clear error before pinning anything
    times: List[List[float]] = [[] for _ in model_paths]
    medians: List[List[float]] = [[] for _ in model_paths]
    with _measuring(fmts, threads, pin_core):
        streams = [_Stream(path, threads, seed) for path in model_paths]
        for stream in streams:
            stream.time(warmup)
        for _ in range(rounds):
            for index, stream in enumerate(streams):
                timed = stream.time(frames)
                times[index] += timed
                medians[index].append(statistics.median(timed))
    return [LatencyResult(Path(path).name, fmt, frames, warmup, threads, pin_core, statistics.median(m),
                          float(np.percentile(t, 90)), int(stream.meta["macs"]), peak, m)
            for path, fmt, stream, t, m in zip(model_paths, fmts, streams, times, medians)]


def measure_latency(model_path: Union[str, Path], frames: int = DEFAULT_FRAMES, warmup: int = DEFAULT_WARMUP,
                    threads: int = DEFAULT_THREADS, pin_core: Optional[int] = DEFAULT_PIN_CORE,
                    peak: Optional[PeakResult] = None, seed: int = 0, rounds: int = DEFAULT_ROUNDS) -> LatencyResult:
    """`measure_latencies` of one model."""
    return measure_latencies([model_path], frames, warmup, threads, pin_core, peak, seed, rounds)[0]
