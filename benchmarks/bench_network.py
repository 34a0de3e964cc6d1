"""Forward frames/s of LSTM-SSD per recurrent type: alpha=1@320 and alpha=0.5@256,
single-thread and all threads. Prints figures; it is a benchmark, not a test.

    python benchmarks/bench_network.py [--frames 20] [--batch 1] [--repeats 3]

Each measurement streams `--frames` frames (a clip [T, B]) through the network with the state
carried, after one warm-up clip, and reports the median over `--repeats`. The ratio column is
frames/s relative to the single-frame SSD (type none) at the same setting.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ablations.config import load_config
from lightning_modules.network import create_model

TYPES = ("none", "averaging", "bottleneck_lstm", "gru", "lstm")
SETTINGS = ((1.0, 320), (0.5, 256))


def frames_per_second(alpha: float, size: int, kind: str, frames: int, batch: int, repeats: int) -> float:
    net = create_model(load_config([f"model.alpha={alpha}", f"model.input_size={size}",
                                    f"model.recurrent.type={kind}"]).model).eval()
    clip = torch.randn(frames, batch, 3, size, size)
    timings = []
    with torch.inference_mode():
        net(clip[:2])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            net(clip)
            timings.append(time.perf_counter() - start)
    return frames * batch / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    all_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {all_threads} threads available; clip of {args.frames} frames x batch {args.batch}")
    print("| alpha@size | type | threads | frames/s | vs none |")
    print("| --- | --- | --- | --- | --- |")
    for alpha, size in SETTINGS:
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            baseline = None
            for kind in TYPES:
                fps = frames_per_second(alpha, size, kind, args.frames, args.batch, args.repeats)
                baseline = baseline or fps
                print(f"| {alpha}@{size} | {kind} | {threads} | {fps:.1f} | {fps / baseline:.2f} |", flush=True)


if __name__ == "__main__":
    main()
