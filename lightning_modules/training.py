"""LSTM-SSD training and online evaluation as one LightningModule (paper Sec. 4.1; reproduction
notes Sec. 4). `TrainConfig` holds every training default; `fit.py` wires it to a Trainer.

- Stage 1 (`train.init_checkpoint` None): single-frame SSD (model.recurrent.type=none) on VID clips.
- Stage 2 (`train.init_checkpoint` set): weights with matching names and shapes come from an earlier
  checkpoint (`stages.py`), the base through `train.freeze_through` is frozen, clips of
  `data.clip_length` frames are unrolled with full backprop through the clip.
- Validation is online (paper Sec. 4.1 "minival"): B = 1 clips in frame order, the recurrent state
  carried from one clip to the next of the same video and zeroed at every new video; detections are
  mapped back to original pixels and scored by `VidEvaluator` (devkit mAP@0.5, COCO AP50, stability).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor

from datamodules.metrics import VidEvaluator
from datamodules.vid import CLASS_NAMES, normalized_to_pixel
from lightning_modules.anchors import BoxCoder
from lightning_modules.config import ModelConfig, as_config, plain_config, validate_model
from lightning_modules.distill import Teacher, distillation_loss, load_teacher
from lightning_modules.loss import MultiboxLoss
from lightning_modules.network import create_model
from lightning_modules.optim import CosineDecay, RMSpropTF, paper_lr_lambda
from lightning_modules.postprocess import postprocess
from lightning_modules.stages import freeze_base, frozen_batchnorms, keep_frozen_bn_eval
from lightning_modules.train_config import FreezeMode, LrSchedule, TrainConfig, resolve_lr  # noqa: F401  (re-exported)

def _detach_state(state: Tuple) -> Tuple:
    return tuple(tuple(s.detach() for s in cell) for cell in state)


class LSTMSSDModule(pl.LightningModule):
    """Network + multibox loss + RMSpropTF; online VID evaluation in the validation loop."""

    def __init__(self, model: ModelConfig | Dict, train: TrainConfig | Dict, **recorded: Any) -> None:
        """`recorded` takes the derived hparams (stage, freeze_applied, lr_resolved) back from a
        checkpoint (`load_from_checkpoint`); they are recomputed from the two configs."""
        super().__init__()
        self.model_cfg: ModelConfig = as_config(ModelConfig, model)
        self.train_cfg: TrainConfig = as_config(TrainConfig, train)
        validate_model(self.model_cfg)
        self.train_cfg.validate()
        freeze = self.train_cfg.freeze if self.train_cfg.stage == 2 else FreezeMode.none
        self.save_hyperparameters({"model": plain_config(self.model_cfg), "train": plain_config(self.train_cfg),
                                   "stage": self.train_cfg.stage, "freeze_applied": freeze.value,
                                   "lr_resolved": resolve_lr(self.train_cfg, self.model_cfg)})
        self.net = create_model(self.model_cfg)
        self.box_coder = BoxCoder()
        self.loss_fn = MultiboxLoss(self.net.anchors(), self.box_coder,
                                    num_classes=self.model_cfg.num_classes,
                                    loc_weight=self.train_cfg.loc_weight,
                                    max_negatives_per_positive=self.train_cfg.max_negatives_per_positive,
                                    negative_weight=self.train_cfg.negative_weight)
        self.teacher: Optional[Teacher] = None
        self._teacher_shares_base: Optional[bool] = None  # decided at the first distillation step (weights loaded)
        if self.train_cfg.stage == 2 and self.train_cfg.distill_steps > 0:
            self.teacher = Teacher(load_teacher(self.train_cfg.init_checkpoint, self.train_cfg.init_from_ema))
        self.frozen_layers: List[str] = []
        self.frozen_bn: List[str] = []
        if freeze != FreezeMode.none:
            self.frozen_layers = freeze_base(self.net, self.train_cfg.freeze_through)
            if freeze == FreezeMode.frozen_bn_eval:
                self.frozen_bn = frozen_batchnorms(self.net, self.frozen_layers)
        self.val_stream_names: List[str] = ["val"]  # per val dataloader index (fit.py adds val_occluded)
        self._val_records: Dict[int, list] = {}
        self._val_state: Dict[int, Tuple] = {}
        self._val_video: Dict[int, str] = {}
        self.last_val_step: Optional[int] = None
        # per stream, the devkit matches by video of the last validation (reports.significance)
        self.val_matches: Dict[str, Dict[str, np.ndarray]] = {}

    # --- frozen BatchNorm (paper Sec. 4.1 "freeze the weights in the base network") -------------
    def train(self, mode: bool = True) -> "LSTMSSDModule":
        """Module train mode, except frozen BatchNorms which stay in eval (running stats fixed)."""
        super().train(mode)
        keep_frozen_bn_eval(self.net, self.frozen_bn)
        return self

    def on_train_batch_start(self, batch: Dict[str, Any], batch_idx: int) -> None:
        keep_frozen_bn_eval(self.net, self.frozen_bn)  # in case anything called .train() on a submodule

    # --- training -------------------------------------------------------------------------------
    def clip_loss(self, batch: Dict[str, Any], box_regression: Tensor, class_logits: Tensor) -> Dict[str, Tensor]:
        """Multibox loss over every frame of every clip (frames flattened time-major, as the net)."""
        gt_boxes = [b for frame in batch["boxes"] for b in frame]
        gt_labels = [label for frame in batch["labels"] for label in frame]
        return self.loss_fn(box_regression.flatten(0, 1), class_logits.flatten(0, 1), gt_boxes, gt_labels)

    def distilling(self, step: int) -> bool:
        """Whether training step `step` adds the distillation loss (train.distill_steps)."""
        return self.teacher is not None and step < self.train_cfg.distill_steps

    def training_forward(self, batch: Dict[str, Any], step: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The network's boxes and logits on a clip batch, and, on a distillation step whose teacher shares the
        frozen student's base exactly (Teacher.shares_base_with, checked once, after the weights are loaded),
        the student's output of that base's last layer, for the teacher to start from (else None)."""
        layer = self.train_cfg.freeze_through
        if self.distilling(step) and self._teacher_shares_base is None:
            self._teacher_shares_base = self.teacher.shares_base_with(self.net, layer)
        kept: List[Tensor] = []
        hook = (self.net.base[layer].register_forward_hook(lambda module, inputs, output: kept.append(output))
                if self.distilling(step) and self._teacher_shares_base else None)
        try:
            box_regression, class_logits, _ = self.net(batch["images"], None, batch["reset"])
        finally:
            if hook is not None:
                hook.remove()
        return box_regression, class_logits, (kept[0] if kept else None)

    def teacher_outputs(self, batch: Dict[str, Any], base_features: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The distillation teacher's boxes and logits on the batch: from the student's base features where
        training_forward kept them (the same numbers, without computing the frozen base twice), else in full."""
        if base_features is not None:
            return self.teacher.after(self.train_cfg.freeze_through, base_features, batch["images"].shape[0],
                                      batch["reset"])
        return self.teacher(batch["images"], batch["reset"])

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        """One clip batch [T, B]: zero state at each clip start, full backprop through the T frames."""
        box_regression, class_logits, base_features = self.training_forward(batch, self.global_step)
        losses = self.clip_loss(batch, box_regression, class_logits)
        if self.distilling(self.global_step):
            losses["distill"] = distillation_loss(box_regression, class_logits,
                                                  self.teacher_outputs(batch, base_features))
            losses["loss"] = losses["loss"] + self.train_cfg.distill_weight * losses["distill"]
        frames = batch["images"].shape[0] * batch["images"].shape[1]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=frames, prog_bar=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=frames)
        return losses["loss"]

    def configure_optimizers(self) -> Dict[str, Any]:
        """RMSpropTF with L2 on conv weights only (TF regularizers), lr x0.95 every 200k steps (`train.lr_schedule`)."""
        cfg = self.train_cfg
        lr = resolve_lr(cfg, self.model_cfg)
        trainable = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        # the recurrent cells may learn at their own rate (train.recurrent_lr_factor); at 1 the groups are the
        # two they always were, so an optimiser state saved before the factor existed still loads
        parts = [(lr, [p for _, p in trainable])]
        if cfg.recurrent_lr_factor != 1.0:
            parts = [(lr, [p for n, p in trainable if not n.startswith("cells.")]),
                     (lr * cfg.recurrent_lr_factor, [p for n, p in trainable if n.startswith("cells.")])]
        groups = [group for part_lr, params in parts for group in (
            {"params": [p for p in params if p.ndim == 4], "weight_decay": cfg.weight_decay, "lr": part_lr},
            {"params": [p for p in params if p.ndim != 4], "weight_decay": 0.0, "lr": part_lr})]
        optimizer = RMSpropTF([g for g in groups if g["params"]], lr=lr,
                              decay=cfg.rms_decay, momentum=cfg.momentum, epsilon=cfg.epsilon,
                              initial_mean_square=cfg.rms_init)
        if cfg.lr_schedule == LrSchedule.cosine:
            # the run's own length: train.max_steps, or what max_epochs comes to
            total = cfg.max_steps if cfg.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
            multiplier = CosineDecay(total)
        else:
            multiplier = paper_lr_lambda(cfg.lr_decay_steps, cfg.lr_decay_factor)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- online evaluation ----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_records, self._val_state, self._val_video = {}, {}, {}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Tensor]:
        """One B = 1 clip of the ordered eval stream; returns the raw outputs (for inspection)."""
        video = batch["video"][0][0]
        carried = self._val_state.get(dataloader_idx) if self._val_video.get(dataloader_idx) == video else None
        box_regression, class_logits, state = self.net(batch["images"], carried, batch["reset"])
        self._val_state[dataloader_idx] = _detach_state(state)
        self._val_video[dataloader_idx] = batch["video"][-1][0]
        losses = self.clip_loss(batch, box_regression, class_logits)
        steps = batch["images"].shape[0]
        self.log(f"{self._stream(dataloader_idx)}/loss", losses["loss"], batch_size=steps,
                 add_dataloader_idx=False, sync_dist=True)
        detections = postprocess(box_regression.flatten(0, 1), class_logits.flatten(0, 1),
                                 self.loss_fn.anchors, self.box_coder, self.train_cfg.score_threshold,
                                 self.train_cfg.nms_iou, self.train_cfg.max_per_class, self.train_cfg.max_total)
        records = self._val_records.setdefault(dataloader_idx, [])
        for t in range(steps):
            det = detections[t]  # B = 1: frame t of the clip
            height, width = (int(v) for v in batch["orig_size"][t, 0])
            boxes = normalized_to_pixel(det["boxes"].float().cpu(), width, height)
            records.append((batch["video"][t][0], int(batch["frame_index"][t, 0]),
                            batch["gt_boxes_px"][t][0].cpu().numpy(), batch["gt_labels"][t][0].cpu().numpy(),
                            batch["gt_track_ids"][t][0].cpu().numpy(), boxes.numpy(),
                            det["scores"].float().cpu().numpy(), det["labels"].cpu().numpy()))
        return {"box_regression": box_regression, "class_logits": class_logits}

    def _stream(self, dataloader_idx: int) -> str:
        names = self.val_stream_names
        return names[dataloader_idx] if dataloader_idx < len(names) else f"val{dataloader_idx}"

    def on_validation_epoch_end(self) -> None:
        """Gather every rank's frames, score them once, log identical values on every rank."""
        indices = sorted(self._val_records)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._val_records)
            indices = sorted({i for part in gathered for i in part})
            records = {i: [r for part in gathered for r in part.get(i, [])] for i in indices}
        else:
            records = self._val_records
        for index in indices:
            metrics = self.evaluate_records(records[index])
            prefix = self._stream(index)
            self.val_matches[prefix] = metrics["per_video"]
            flat = {f"{prefix}/vid_map50": metrics["vid_map50"], f"{prefix}/coco_ap50": metrics["coco_ap50"],
                    f"{prefix}/num_frames": float(metrics["num_frames"])}
            flat.update({f"{prefix}/ap/{name}": ap for name, ap in metrics["per_class_ap"].items()})
            flat.update({f"{prefix}/stability/{k}": float(v) for k, v in metrics["stability"].items()})
            self.log_dict(flat, add_dataloader_idx=False, sync_dist=True)  # equal on every rank already
        self.last_val_step = self.global_step

    def evaluate_records(self, records: List[Tuple]) -> Dict[str, Any]:
        """VidEvaluator over per-frame records (video, frame, gt boxes/labels/tracks, detections); its
        metrics plus `per_video`, the matches by video that a paired bootstrap resamples."""
        names = CLASS_NAMES if self.model_cfg.num_classes == len(CLASS_NAMES) else None
        evaluator = VidEvaluator(class_names=names, num_classes=self.model_cfg.num_classes)
        for video, frame, gt_boxes, gt_labels, tracks, boxes, scores, labels in records:
            evaluator.update(video, frame, gt_boxes, gt_labels, tracks, boxes.astype(np.float64), scores, labels)
        return {**evaluator.compute(), "per_video": evaluator.per_video()}
