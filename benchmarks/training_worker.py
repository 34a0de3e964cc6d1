"""One checkout's side of bench_training.py: builds the main job's training stages with that checkout's code
and times them. Driven over pipes (a JSON command per stdin line, a JSON answer per stdout line), so two
checkouts can be measured in one run with their steps interleaved.

    python benchmarks/training_worker.py CHECKOUT [--set key=value ...]

CHECKOUT goes first on sys.path, so `lightning_modules`, `datamodules` and `ablations` are that checkout's.
Only APIs that today's main already has are called; a checkout's speed settings (lightning_modules/speed.py,
where it exists) are applied exactly as its `fit` applies them. Commands:

    {"cmd": "setup", "setting": "stage1" | "stage2/<type>" | "paper/<alpha>@<size>/stage<k>"}
    {"cmd": "bare", "steps": N}       -> per-step seconds of data/forward/loss/backward/optimiser, losses
    {"cmd": "lightning", "steps": N}  -> per-step seconds of the same stage trained by the checkout's fit()
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

CHECKOUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))
# an editable install would fill in modules this checkout lacks from the installed one
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from ablations.runner import stage1_config  # noqa: E402
from ablations.suite import load_suite  # noqa: E402
from lightning_modules import fit as fit_module  # noqa: E402
from lightning_modules.training import LSTMSSDModule  # noqa: E402

try:
    from ablations.suite import trial_config
except ImportError:  # older checkouts: ablations/runner.py
    from ablations.runner import make_config as trial_config

try:  # absent in checkouts before the speed settings
    from lightning_modules import speed
except ImportError:
    speed = None

SYNTHETIC_SUITE = "quick"  # the main job: its synthetic profile is what a CPU user trains


def _config(setting: str, overrides: List[str]):
    """The TafmConfig of a setting: the main job's stage 1 / stage-2 trial, or the paper-scale settings."""
    if setting.startswith("paper/"):
        _, width, stage = setting.split("/")
        alpha, size = width.split("@")
        kind = "bottleneck_lstm" if stage == "stage2" else "none"
        return trial_config(overrides, {"model.alpha": float(alpha), "model.input_size": int(size),
                                        "model.recurrent.type": kind, "model.recurrent.activation": "relu6"})
    suite = load_suite(SYNTHETIC_SUITE)
    kind = "none" if setting == "stage1" else setting.split("/", 1)[1]
    point = next((p for p in suite.points if p.overrides.get("model.recurrent.type") == kind), None)
    if point is None:
        raise ValueError(f"setting {setting!r}: the {SYNTHETIC_SUITE} suite has no trial with recurrent type {kind!r}")
    cfg = trial_config(overrides, suite.delta("synthetic", point.overrides))
    return stage1_config(cfg) if setting == "stage1" else cfg


def _stage2_init(cfg, folder: Path) -> str:
    """A seeded stage-1 module saved as a Lightning checkpoint would be (raw and EMA net weights, and the hparams
    a stage 2 that distils from its init checkpoint needs), as the stage-2 init checkpoint."""
    single = stage1_config(cfg)
    torch.manual_seed(cfg.train.seed)
    module = LSTMSSDModule(single.model, single.train)
    path = folder / "stage1_init.ckpt"
    torch.save({"state_dict": module.state_dict(), "ema_state_dict": module.net.state_dict(),
                "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


class Worker:
    """The current setting's module, optimiser and batch stream, and the timing loops."""

    def __init__(self, overrides: List[str]) -> None:
        self.overrides = overrides
        self.folder = Path(tempfile.mkdtemp(prefix="tafm-bench-"))
        self.cfg = None
        self.threads = contextlib.nullcontext()

    def setup(self, setting: str) -> Dict[str, Any]:
        self.threads.__exit__(None, None, None)
        cfg = _config(setting, self.overrides)
        if not setting.endswith("stage1"):
            cfg.train.init_checkpoint = _stage2_init(cfg, self.folder)
        self.cfg = cfg
        if hasattr(speed, "reuse_freed_memory"):  # fit() sets it once per process, before any stage
            speed.reuse_freed_memory(cfg.train)
        self.threads = speed.cpu_threads(cfg.train) if speed is not None else contextlib.nullcontext()
        self.threads.__enter__()
        self.root = fit_module.resolve_root(cfg.data)
        self._warm_loader()
        self._build()
        return {"frames": cfg.data.clip_length * cfg.data.batch_size, "threads": torch.get_num_threads(), "applied": self.applied,
                "checkout": str(CHECKOUT), "code": str(Path(fit_module.__file__).parent.parent)}

    def _warm_loader(self) -> None:
        """One epoch through a throwaway loader: the main job trains many epochs (stage 1 ten), while the timed
        steps here fall in the first; a loader that caches decoded frames is measured in its steady state."""
        datamodule = fit_module.TrainingDataModule(self.cfg.data, self.cfg.model.input_size, self.root)
        datamodule.setup("fit")
        for _ in datamodule.train_dataloader():
            pass

    def _build(self) -> None:
        cfg = self.cfg
        pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
        self.datamodule = fit_module.TrainingDataModule(cfg.data, cfg.model.input_size, self.root)
        self.datamodule.setup("fit")
        self.module = LSTMSSDModule(cfg.model, cfg.train)
        fit_module.initialise_weights(self.module, cfg.train)
        self.applied = speed.prepare_module(self.module, cfg.train) if speed is not None else []
        self.module.train()
        self.optimizer = self.module.configure_optimizers()["optimizer"]
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.batches = self._stream()
        self.step = 0

    def _stream(self):
        loader = self.datamodule.train_dataloader()
        while True:
            yield from loader

    def bare(self, steps: int) -> Dict[str, Any]:
        """`steps` optimiser steps of a plain loop: batch, forward, loss, backward, clip + step."""
        phases: Dict[str, List[float]] = {k: [] for k in ("data", "forward", "loss", "backward", "optimiser")}
        losses = []
        clip = self.cfg.train.grad_clip_norm
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(self.batches)
            t1 = time.perf_counter()
            if hasattr(self.module, "training_forward"):  # keeps the frozen base's features for the teacher
                box_regression, class_logits, kept = self.module.training_forward(batch, self.step)
            else:
                (box_regression, class_logits, _), kept = self.module.net(batch["images"], None, batch["reset"]), None
            t2 = time.perf_counter()
            loss = self._loss(batch, box_regression, class_logits, kept)
            t3 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t4 = time.perf_counter()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, clip)
            self.optimizer.step()
            t5 = time.perf_counter()
            for key, (a, b) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
                phases[key].append(b - a)
            losses.append(float(loss.detach()))
        return {"phases": phases, "losses": losses}

    def _loss(self, batch, box_regression, class_logits, kept=None):
        """The training step's loss: the multibox loss, plus distillation from the init checkpoint's network in
        the first train.distill_steps steps where the checkout has it (as its training_step, the teacher from the
        student's kept base features where the checkout keeps them)."""
        loss = self.module.clip_loss(batch, box_regression, class_logits)["loss"]
        teacher = getattr(self.module, "teacher", None)
        if teacher is not None and self.step < self.cfg.train.distill_steps:
            from lightning_modules.distill import distillation_loss

            outputs = (self.module.teacher_outputs(batch, kept) if hasattr(self.module, "teacher_outputs")
                       else teacher(batch["images"], batch["reset"]))
            distill = distillation_loss(box_regression, class_logits, outputs)
            loss = loss + self.cfg.train.distill_weight * distill
        self.step += 1
        return loss

    def lightning(self, steps: int) -> Dict[str, Any]:
        """The same stage trained by the checkout's fit() for `steps` steps: seconds between batch starts."""
        timer = StepTimer()
        cfg = self.cfg
        train = replace(cfg.train, max_steps=steps, max_epochs=None,
                        out_dir=str(self.folder / f"fit{len(os.listdir(self.folder))}"))
        fit_module.fit(cfg.model, cfg.data, train, root=self.root, callbacks=[timer],
                       trainer_overrides={"limit_val_batches": 0})
        return {"periods": timer.periods(), "losses": timer.losses}


class StepTimer(pl.Callback):
    """perf_counter at each training batch start, and the step's loss."""

    def __init__(self) -> None:
        self.starts: List[float] = []
        self.losses: List[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))

    def periods(self) -> List[float]:
        """Batch start to next batch start: the step, its callbacks and logging, and fetching the next batch."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # progress prints of the checkout's code must not mix with the answers
    worker = Worker(args.overrides)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "setup":
                reply = worker.setup(request["setting"])
            elif request["cmd"] in ("bare", "lightning"):
                reply = getattr(worker, request["cmd"])(int(request["steps"]))
            else:
                raise ValueError(f"unknown command {request['cmd']!r}")
        except Exception as error:  # the driver prints it and stops
            reply = {"error": f"{type(error).__name__}: {error}"}
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


if __name__ == "__main__":
    main()
