"""Training frames/s on CPU, split into data / forward (+ loss) / backward (+ clipping and optimiser
step) time per step. Prints figures; it is a benchmark, not a test.

    python benchmarks/bench_training.py [--steps 5] [--threads 0] [--root PATH]

Settings: alpha=0.5@256 (paper's small model) and the default model (alpha=1@320), each as
stage 1 (single-frame SSD, every layer trains) and stage 2 (Bottleneck-LSTM after conv13, base
frozen with BN in eval mode), on the default data config (10-frame clips, batch 4) streamed from
the default synthetic benchmark (generated once into the tafm cache) or --root. One warm-up step,
then the median over --steps.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from datamodules.clips import DataConfig
from lightning_modules.config import ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.fit import TrainingDataModule, resolve_root
from lightning_modules.training import LSTMSSDModule, TrainConfig

SETTINGS = ((0.5, 256), (1.0, 320))


def measure(alpha: float, size: int, stage: int, data: DataConfig, root: Path, steps: int) -> Dict[str, float]:
    """Median seconds per step of each phase, and frames per step."""
    kind = RecurrentType.bottleneck_lstm if stage == 2 else RecurrentType.none
    model = ModelConfig(alpha=alpha, input_size=size, recurrent=RecurrentConfig(type=kind))
    train = TrainConfig(init_checkpoint="(not loaded: timing only)" if stage == 2 else None)
    module = LSTMSSDModule(model, train)
    optimizer = module.configure_optimizers()["optimizer"]
    datamodule = TrainingDataModule(data, size, root)
    datamodule.setup("fit")
    module.train()
    batches = iter(datamodule.train_dataloader().loader)
    timings: Dict[str, List[float]] = {"data": [], "forward": [], "backward": []}
    trainable = [p for p in module.parameters() if p.requires_grad]
    for step in range(steps + 1):
        start = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        box_regression, class_logits, _ = module.net(batch["images"], None, batch["reset"])
        loss = module.clip_loss(batch, box_regression, class_logits)["loss"]
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip_norm)
        optimizer.step()
        done = time.perf_counter()
        if step:  # the first step is a warm-up
            timings["data"].append(loaded - start)
            timings["forward"].append(forward - loaded)
            timings["backward"].append(done - forward)
    out = {k: statistics.median(v) for k, v in timings.items()}
    out["frames"] = float(batch["images"].shape[0] * batch["images"].shape[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--root", type=Path, default=None, help="VID root (default: the synthetic benchmark)")
    parser.add_argument("--clip-length", type=int, default=DataConfig.clip_length)
    parser.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = DataConfig(clip_length=args.clip_length, batch_size=args.batch_size)
    root = resolve_root(data, args.root)
    print(f"root {root}; {torch.get_num_threads()} threads; clips of {data.clip_length} frames x batch "
          f"{data.batch_size}; median of {args.steps} steps")
    print(f"{'setting':<14}{'stage':>6}{'data ms':>10}{'fwd ms':>10}{'bwd ms':>10}{'step ms':>10}{'frames/s':>10}")
    for alpha, size in SETTINGS:
        for stage in (1, 2):
            t = measure(alpha, size, stage, data, root, args.steps)
            total = t["data"] + t["forward"] + t["backward"]
            print(f"{f'a={alpha}@{size}':<14}{stage:>6}{1e3 * t['data']:>10.0f}{1e3 * t['forward']:>10.0f}"
                  f"{1e3 * t['backward']:>10.0f}{1e3 * total:>10.0f}{t['frames'] / total:>10.1f}")


if __name__ == "__main__":
    main()
