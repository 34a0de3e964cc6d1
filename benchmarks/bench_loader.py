"""Does the clip loader keep up with training? Loader frames/s (decode + augment + resize) with 0, 1
and 2 workers, beside the model's training frames/s (forward + loss + backward) on the same clips.
Prints figures; it is a benchmark, not a test.

    python benchmarks/bench_loader.py [--input-size 320] [--batches 6] [--data-root PATH]

Without --data-root it uses the synthetic benchmark (generated into the tafm cache on first use).
ratio = loader frames/s / training frames/s: above 1 means the loader never starves training.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ablations.config import load_config
from datamodules.clips import VidClipDataModule
from datamodules.synthetic import ensure_synthetic
from lightning_modules.anchors import BoxCoder, generate_anchors
from lightning_modules.loss import MultiboxLoss
from lightning_modules.network import create_model


def loader_fps(root: Path, overrides: list, input_size: int, workers: int, batches: int) -> float:
    cfg = load_config(overrides + [f"data.num_workers={workers}"])
    datamodule = VidClipDataModule(cfg.data, input_size, root)
    datamodule.setup("fit")
    frames = 0
    iterator = iter(datamodule.train_dataloader())
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        frames += batch["images"].shape[0] * batch["images"].shape[1]
    return frames / (time.perf_counter() - start)


def training_fps(overrides: list, batch, steps: int) -> float:
    cfg = load_config(overrides)
    net = create_model(cfg.model).train()
    anchors = generate_anchors(net.feature_map_sizes)
    loss_fn = MultiboxLoss(anchors, BoxCoder(), num_classes=cfg.model.num_classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    images = batch["images"]
    steps_frames = images.shape[0] * images.shape[1]
    flat_boxes = [b for frame in batch["boxes"] for b in frame]
    flat_labels = [l for frame in batch["labels"] for l in frame]

    def step() -> None:
        boxes, logits, _ = net(images, reset=batch["reset"])
        loss = loss_fn(boxes.flatten(0, 1), logits.flatten(0, 1), flat_boxes, flat_labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * steps_frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    root = args.data_root or ensure_synthetic()
    size = args.input_size
    data = ["data.batch_size=2", "data.clip_length=10"]
    print(f"dataset {root}; clips of 10 frames x batch 2 at {size}x{size}; {torch.get_num_threads()} torch threads")
    datamodule = VidClipDataModule(load_config(data).data, size, root)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    print("| what | frames/s |")
    print("| --- | --- |")
    loader = {}
    for workers in (0, 1, 2):
        loader[workers] = loader_fps(root, data, size, workers, args.batches)
        print(f"| loader, {workers} workers | {loader[workers]:.1f} |", flush=True)
    models = {f"lstm_ssd alpha=1 @{size}": ["model.alpha=1.0", f"model.input_size={size}"],
              f"lstm_ssd alpha=0.5 @{size}": ["model.alpha=0.5", f"model.input_size={size}"]}
    for name, overrides in models.items():
        fps = training_fps(overrides + data, batch, args.steps)
        ratios = ", ".join(f"{w} workers {loader[w] / fps:.1f}x" for w in loader)
        print(f"| training {name} | {fps:.1f} | loader/training: {ratios}", flush=True)


if __name__ == "__main__":
    main()
