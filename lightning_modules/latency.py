"""Single-threaded latency of exported models, a roofline peak, and paper Table 7 rows (paper Sec. 4.5).

The paper times single-threaded inference on one Pixel 2 core. Here an exported model (export.py)
runs through its own runtime (ExecuTorch/XNNPACK or onnxruntime) with `threads` threads, this process
pinned to as many cores from `pin_core` (restored afterwards), a warm-up, then `frames` frames with the
state fed back. Achieved MAC/s = MACs per frame (lightning_modules/cost.py) / median time; the peak is
the same runtime's MAC/s on large 1x1 convolutions (GEMMs), so achieved / peak says how far the
network's depthwise-heavy layers sit below what the core can do.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_modules.export import FORMATS, SUFFIX, format_of, load_runtime, lower_to_file, read_sidecar

#: Defaults of the measurement (one place).
DEFAULT_FRAMES = 200
DEFAULT_WARMUP = 20
DEFAULT_THREADS = 1
DEFAULT_PIN_CORE = 0
# Peak: a stack of PEAK_LAYERS 1x1 convs PEAK_CHANNELS -> PEAK_CHANNELS on PEAK_SIZE x PEAK_SIZE (2.1 GMAC of
# GEMMs whose 2 MB activations stay in cache; one layer on 64x64 measured ~25% lower under XNNPACK, its 8 MB
# NCHW<->NHWC copies at the delegate's edges counted in, so models scored above 100% of that "peak").
PEAK_LAYERS = 8
PEAK_CHANNELS = 512
PEAK_SIZE = 32
PEAK_REPEATS = 20
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


def set_executorch_threads(threads: int) -> int:
    """Recreate ExecuTorch's global threadpool (XNNPACK runs on it) with `threads` threads, which inherit the
    calling thread's affinity; returns the previous size."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    previous = int(_threadpool_get_thread_count())
    _unsafe_reset_threadpool(threads)
    return previous


@contextlib.contextmanager
def _measuring(fmt: str, threads: int, pin_core: Optional[int]) -> Iterator[None]:
    """Pin, then (ExecuTorch) size its global threadpool inside the pin so its workers start pinned; on exit
    unpin first, then restore the pool, so the restored workers are not left on the pinned cores."""
    previous = None
    try:
        with pinned(pin_core, threads):
            if fmt == "executorch":
                previous = set_executorch_threads(threads)
            yield
    finally:
        if previous is not None:
            set_executorch_threads(previous)


def _threads(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}"


def _placement(threads: int, pin_core: Optional[int]) -> str:
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


@dataclass
class PeakResult:
    """A runtime's MAC/s on stacked large 1x1 convolutions (the roofline's compute ceiling)."""

    fmt: str
    threads: int
    macs: int
    median_ms: float
    what: str  # the convolutions timed

    @property
    def macs_per_s(self) -> float:
        return self.macs / (self.median_ms / 1e3)

    def format(self) -> str:
        return (f"| peak ({self.fmt}, {self.what}, {_threads(self.threads)}) | "
                f"{self.median_ms:.2f} ms | "
                f"{self.macs / 1e9:.3f} GMAC | {self.macs_per_s / 1e9:.1f} GMAC/s |")


def measure_peak(fmt: str, threads: int = DEFAULT_THREADS, pin_core: Optional[int] = DEFAULT_PIN_CORE,
                 channels: int = PEAK_CHANNELS, size: int = PEAK_SIZE, layers: int = PEAK_LAYERS,
                 repeats: int = PEAK_REPEATS, warmup: int = 3) -> PeakResult:
    """Export `layers` stacked 1x1 convs channels->channels on size x size the same way as the models
    (same runtime, threads, pinning) and time them: the MAC/s the runtime reaches on plain GEMMs."""
    if fmt not in FORMATS:
        raise ValueError(f"measure_peak: format {fmt!r} is not supported; valid: {', '.join(FORMATS)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure_peak: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    conv = nn.Sequential(*[nn.Conv2d(channels, channels, 1, bias=False) for _ in range(layers)]).eval()
    example = torch.randn(1, channels, size, size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"peak{SUFFIX[fmt]}"
        with torch.no_grad():
            lower_to_file(conv, (example,), path, fmt, ["x"], ["y"])
        with _measuring(fmt, threads, pin_core):
            run = load_runtime(path, threads)
            _time_calls(lambda i: run([example]), warmup)
            times = _time_calls(lambda i: run([example]), repeats)
    return PeakResult(fmt, threads, layers * channels * channels * size * size, statistics.median(times),
                      f"{layers} stacked 1x1 convs {channels}->{channels} on {size}x{size}")


@dataclass
class LatencyResult:
    """Per-frame latency of one exported model, state fed back."""

    model: str
    fmt: str
    frames: int
    warmup: int
    threads: int
    pin_core: Optional[int]
    median_ms: float
    p90_ms: float
    macs: int
    peak: Optional[PeakResult] = None

    @property
    def macs_per_s(self) -> float:
        """Achieved MAC/s at the median latency."""
        return self.macs / (self.median_ms / 1e3)

    @property
    def fraction_of_peak(self) -> Optional[float]:
        return None if self.peak is None else self.macs_per_s / self.peak.macs_per_s

    HEADER = ("| model | runtime | median ms | p90 ms | GMAC/frame | achieved GMAC/s | of peak |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")

    def row(self) -> str:
        fraction = "n/a" if self.fraction_of_peak is None else f"{100 * self.fraction_of_peak:.1f}%"
        return (f"| {self.model} | {self.fmt}, {_placement(self.threads, self.pin_core)} | {self.median_ms:.2f} | "
                f"{self.p90_ms:.2f} | {self.macs / 1e9:.3f} | {self.macs_per_s / 1e9:.2f} | {fraction} |")

    def as_dict(self) -> dict:
        """Plain values for JSON: the fields plus achieved MAC/s and the fraction of peak."""
        return {**asdict(self), "macs_per_s": self.macs_per_s, "fraction_of_peak": self.fraction_of_peak,
                "peak_macs_per_s": None if self.peak is None else self.peak.macs_per_s, "cpu": cpu_name()}

    def format(self) -> str:
        lines = [self.HEADER, self.row()]
        if self.peak is not None:
            lines.append(f"\npeak: {self.peak.macs_per_s / 1e9:.1f} GMAC/s ({self.peak.fmt}, {self.peak.what})")
        lines.append(f"{self.frames} timed frames after {self.warmup} warm-up, state fed back; {cpu_name()}")
        return "\n".join(lines)


def measure_latency(model_path: Union[str, Path], frames: int = DEFAULT_FRAMES, warmup: int = DEFAULT_WARMUP,
                    threads: int = DEFAULT_THREADS, pin_core: Optional[int] = DEFAULT_PIN_CORE,
                    peak: Optional[PeakResult] = None, seed: int = 0) -> LatencyResult:
    """Median and p90 ms per frame of an exported model (its sidecar gives shapes and MACs), run with `threads`
    threads pinned from `pin_core` (None: unpinned), after `warmup` frames; the state is fed back each frame."""
    if frames < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"measure_latency: need frames >= 1, warmup >= 0, threads >= 1; "
                         f"got frames={frames}, warmup={warmup}, threads={threads}")
    fmt = format_of(model_path)
    meta = read_sidecar(model_path)
    size = meta["input_size"]
    generator = torch.Generator().manual_seed(seed)
    clip = [torch.rand(1, 3, size, size, generator=generator) * 2 - 1 for _ in range(CLIP_FRAMES)]
    zero = [torch.zeros(spec["shape"]) for spec in meta["state"]]
    state = list(zero)

    def step(i: int) -> None:
        nonlocal state
        state = run([clip[i % len(clip)], *state])[2:]

    with _measuring(fmt, threads, pin_core):
        run = load_runtime(model_path, threads)
        _time_calls(step, warmup)
        times = _time_calls(step, frames)
    return LatencyResult(Path(model_path).name, fmt, frames, warmup, threads, pin_core, statistics.median(times),
                         float(np.percentile(times, 90)), int(meta["macs"]), peak)
