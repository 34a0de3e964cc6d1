"""What one suite trial does: count costs, train (reusing every stage another trial already trained),
evaluate (clean, and occluded where the suite asks), and hand the metrics to the harness.

Every trained stage is cached under runs/_stages/<config hash>/ behind a file lock, so trials (and
suites, and concurrent workers) with the same stage-1 configuration share one single-frame SSD,
and Table 4's stacked placements finetune from the trial with one layer fewer (paper Sec. 4.2).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ablations.config import SPEED_KEYS, TafmConfig, UserError, to_flat_dict
from ablations.cores import LendIdleCores, stage_lock
from ablations.harness import TrialContext, Work, error_line
from ablations.progress import TrainProgress
from ablations.pruning import OptunaPruning
from ablations.records import matches_artifact, occluded_name
from ablations.suite import PROFILE_DEFAULTS, SUITE_DEFAULTS, Suite, trial_config
from ablations.tracking import PROJECT, Tracking, TrialRun, recorded_run_id, stage_run
from datamodules.synthetic import is_synthetic
from datamodules.vid import VidDataError, VidLayoutError
from lightning_modules.config import CellInit, RecurrentConfig, RecurrentType
from lightning_modules.deploy.cost import count_cost
from lightning_modules.network import create_model
from lightning_modules.train_config import FreezeMode, TrainConfig, resolve_lr
from reports.significance import VideoMatches

STAGES_DIR = "_stages"
DONE = "done.json"
# keys that do not change what a stage trains: speed settings that keep the maths, evaluation-only, bookkeeping
_NOT_TRAINING = (*SPEED_KEYS,
                 "data.occlusion_p", "data.occlusion_seed", "data.eval_protocol", "data.minival_frames",
                 "data.max_val_videos", "data.minival_seed", "data.strict", "train.out_dir",
                 "train.eval_clean_and_occluded", "sweep.latency", "sweep.latency_frames",
                 "sweep.control_stages")  # in the control's own train.max_steps (_control_config)


# keys added after stages were cached: hashed only when not at their default, so those stages keep their hash
_HASHED_WHEN_SET = {"sweep.extra_stages": 0, "train.recurrent_lr_factor": 1.0, "sweep.stage1_ema_decay": None,
                    "train.rms_init": 1.0, "sweep.stage1_rms_init": None, "train.lr_schedule": "step",
                    "sweep.stage1_lr_schedule": None}
# speed settings that keep the maths since their stages were cached: hashed at the value those stages had.
# channels_last changed the BatchNorm sums until its statistics were summed exactly (speed.ExactNHWCBatchNorm2d)
_HASHED_AS = {"train.channels_last": False}


def _widths_folded(cfg: TafmConfig) -> TafmConfig:
    """`cfg` with model.width_scale folded into the alphas (and the learning rate its alpha resolves to written
    out): the network a stage trains is set by their products, so Table 3's alpha 0.5 rows at width_scale 0.5 and
    quick's alpha 0.25 rows hash alike and share their stages. A config at width_scale 1 is returned as is."""
    scale = cfg.model.width_scale
    if scale == 1.0:
        return cfg
    folded = copy.deepcopy(cfg)
    folded.train.lr = resolve_lr(cfg.train, cfg.model)
    model = folded.model
    for key in ("alpha", "alpha_base", "alpha_ssd", "alpha_lstm"):
        if getattr(model, key) is not None:
            setattr(model, key, getattr(model, key) * scale)
    model.width_scale = 1.0
    return folded


def stage_hash(cfg: TafmConfig) -> str:
    cfg = _widths_folded(cfg)
    flat = {k: _HASHED_AS.get(k, v) for k, v in to_flat_dict(cfg).items()
            if k not in _NOT_TRAINING and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])}
    if not cfg.model.recurrent.after or cfg.model.recurrent.type == RecurrentType.none:
        flat.pop("train.recurrent_lr_factor", None)  # no cell to apply it to: the single-frame SSD's own stage
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage1_config(cfg: TafmConfig) -> TafmConfig:
    """The single-frame SSD of `cfg` (paper Sec. 4.1 stage 1): no recurrent layer, the sweep's stage-1
    length and clips. A `type=none` trial and every stage-2 trial's parent map to the same config,
    hence the same cached checkpoint."""
    single = copy.deepcopy(cfg)
    single.model.recurrent.type = RecurrentType.none
    single.model.recurrent.after = []
    single.model.alpha_lstm = None  # no recurrent layer: Figure 4's widths share one stage 1
    # nor any other recurrent setting: one stage 1 whatever a suite sets for its cells (Figure 4 and the search
    # set same_width false, a probe may vary the cells' init), each at the value its data's profile gives it,
    # so cached stages keep their hash
    single.model.recurrent = _profile_recurrent(single.data.root)
    single.sweep.single_frame_stage2 = False  # one stage 1 whether or not a suite adds the control
    # a suite's train.val_every_n_steps is for the stages its trials train (the search prunes on them); the
    # shared stage 1 validates at its end
    single.train.val_every_n_steps = TrainConfig().val_every_n_steps
    single.sweep.extra_stages = 0  # stage 2's continuation
    # stage 2's own settings (its warm start, what it freezes, which weights it starts from) do nothing in
    # stage 1: one stage 1 whatever their values
    defaults = TrainConfig()
    for key in ("distill_steps", "distill_weight", "freeze", "freeze_through", "init_from_ema", "recurrent_lr_factor"):
        setattr(single.train, key, getattr(defaults, key))
    if cfg.sweep.stage1_max_steps is not None:
        single.train.max_steps = cfg.sweep.stage1_max_steps
    if cfg.sweep.stage1_lr is not None:
        single.train.lr = cfg.sweep.stage1_lr
    for key in ("ema_decay", "rms_init", "lr_schedule"):  # sweep.stage1_KEY sets stage 1's train.KEY
        if getattr(cfg.sweep, f"stage1_{key}") is not None:
            setattr(single.train, key, getattr(cfg.sweep, f"stage1_{key}"))
            # hashed by what it trains with: stage 2's own train.KEY can vary over cached stage 1s
            setattr(single.sweep, f"stage1_{key}", None)
    if cfg.sweep.stage1_clip_length is not None:
        single.data.clip_length = cfg.sweep.stage1_clip_length
    if cfg.sweep.stage1_batch_size is not None:
        single.data.batch_size = cfg.sweep.stage1_batch_size
    if cfg.sweep.stage1_data_root is not None:
        single.data.root = cfg.sweep.stage1_data_root
        single.sweep.stage1_data_root = None  # the same stage 1 as a suite whose data.root is that dataset
    if cfg.sweep.stage1_cue_prob is not None and is_synthetic(single.data.root):
        single.data.synthetic_cue_prob = cfg.sweep.stage1_cue_prob
    single.sweep.stage1_cue_prob = None  # the same stage 1 as a suite whose data is that twin
    return single


def _profile_recurrent(data_root: Optional[str]) -> RecurrentConfig:
    """The recurrent settings a suite trial on this data gets when nothing varies them (the suites' defaults and
    the data's profile), with no layer: what every stage 1 is hashed with."""
    profile = "synthetic" if is_synthetic(data_root) else "vid"
    delta = {key: value for key, value in {**SUITE_DEFAULTS, **PROFILE_DEFAULTS[profile]}.items()
             if key.startswith("model.recurrent.")}
    recurrent = trial_config([], delta).model.recurrent
    recurrent.type, recurrent.after = RecurrentType.none, []
    if recurrent.init == CellInit.leaky:
        # how a cell starts matters only to a stage that has one: the synthetic profile's stage 1s were cached
        # when its default was the identity start, the leaky one's origin (and what they are hashed with)
        recurrent.init = CellInit.identity
    return recurrent


def single_frame_control(cfg: TafmConfig) -> bool:
    """A `type=none` trial that is finetuned like a stage 2 (sweep.single_frame_stage2)."""
    return cfg.model.recurrent.type == RecurrentType.none and cfg.sweep.single_frame_stage2


def _control_config(cfg: TafmConfig) -> TafmConfig:
    control = copy.deepcopy(cfg)
    control.model.recurrent.after = []
    control.train.max_steps = cfg.train.max_steps * cfg.sweep.control_stages
    control.sweep.control_stages = 1  # counted in train.max_steps: one control stage for each length
    return control


def _parent(cfg: TafmConfig) -> Optional[TafmConfig]:
    """The stage this one starts from: stage 1, or with progressive training the same model with its
    last recurrent layer removed (paper Sec. 4.2), or with sweep.extra_stages the same model one stage
    earlier; None for stage 1 itself."""
    if single_frame_control(cfg):
        return stage1_config(cfg)
    if cfg.model.recurrent.type == RecurrentType.none:
        return None
    if cfg.sweep.extra_stages > 0:  # the same model one stage earlier
        parent = copy.deepcopy(cfg)
        parent.sweep.extra_stages -= 1
        return parent
    after = list(cfg.model.recurrent.after)
    if cfg.sweep.progressive and len(after) > 1:
        parent = copy.deepcopy(cfg)
        parent.model.recurrent.after = after[:-1]
        return parent
    return stage1_config(cfg)


def own_stage(cfg: TafmConfig) -> TafmConfig:
    """The stage that trains `cfg`'s checkpoint: the control's finetuning, stage 1 for a `type=none`
    trial, else `cfg` itself."""
    if single_frame_control(cfg):
        return _control_config(cfg)
    if cfg.model.recurrent.type == RecurrentType.none:
        return stage1_config(cfg)
    return cfg


# a stage-2 step's time by recurrent type, relative to the single-frame control's: the synthetic profile on one
# thread (README "Training speed": 141 / 132 / 182 / 183 / 190 ms); a registered cell counts as a learnt one
_STEP_COST = {"none": 1.0, "averaging": 0.94, "lstm": 1.29, "gru": 1.30, "bottleneck_lstm": 1.35}


def _length(cfg: TafmConfig) -> float:
    return float(cfg.train.max_steps if cfg.train.max_steps > 0 else (cfg.train.max_epochs or 1))  # vid: epochs


def _size(cfg: TafmConfig) -> float:
    """Width x pixels against alpha 0.25 at 192 px: rough, at these widths a step is memory-bound, not MAC-bound."""
    return (cfg.model.alpha * cfg.model.width_scale / 0.25) * (cfg.model.input_size / 192) ** 2


def expected_cost(cfg: TafmConfig) -> float:
    """What a trial trains beyond the shared stage 1, in control-step units at alpha 0.25 and 192 px: its
    stage-2 stages' steps x their relative step time x `_size`. Grid suites hand out their longest trials
    first by it (`harness.longest_first`): only the order matters."""
    length = _length(cfg)
    if cfg.model.recurrent.type == RecurrentType.none:
        return length * cfg.sweep.control_stages * _size(cfg) if single_frame_control(cfg) else 0.0
    layers = len(cfg.model.recurrent.after) if cfg.sweep.progressive else 1
    stages = layers + cfg.sweep.extra_stages
    return stages * length * _STEP_COST.get(cfg.model.recurrent.type.value, 1.3) * _size(cfg)


def trial_work(cfg: TafmConfig, runs_dir: Path) -> Work:
    """The trial's `harness.Work` in control-step units: its own stages (`expected_cost`) and its stage 1 by
    hash (a stage-1 step, 16 single frames, takes about a control step's time: 143 against 141 ms in the
    README's speed table), each 0 when already in `runs_dir`'s stage cache."""
    own = 0.0 if (stage_directory(cfg, runs_dir) / DONE).is_file() else expected_cost(cfg)
    first = stage1_config(cfg)
    directory = stage_directory(first, runs_dir)
    shared = None if (directory / DONE).is_file() else (directory.name, _length(first) * _size(first))
    return Work(own, shared)


def stage_directory(cfg: TafmConfig, runs_dir: Path) -> Path:
    """runs/_stages/<hash> of the stage that trains `cfg`'s checkpoint."""
    return runs_dir / STAGES_DIR / stage_hash(own_stage(cfg))


def stage_kind(cfg: TafmConfig) -> str:
    """The W&B job type of the stage that trains `cfg`: stage1, control (the single-frame SSD finetuned
    like a stage 2) or stage2."""
    if _parent(cfg) is None:
        return "stage1"
    return "control" if cfg.model.recurrent.type == RecurrentType.none else "stage2"


def trained_stage(cfg: TafmConfig, runs_dir: Path, log=print, callbacks: Sequence[Any] = (),
                  tracking: Optional[Tracking] = None) -> Path:
    """The checkpoint of `cfg` trained (with its parents), from the cache or trained now; resumable.
    `callbacks` join the training of `cfg`'s own stage only: parents are shared with other trials.
    With `tracking`, each stage trained now is its own W&B run (`ablations.tracking.stage_run`)."""
    from lightning_modules.fit import fit

    cfg = own_stage(cfg)
    directory = stage_directory(cfg, runs_dir)
    done = directory / DONE
    if done.is_file():
        return done_checkpoint(directory)
    parent = _parent(cfg)
    init = trained_stage(parent, runs_dir, log, tracking=tracking) if parent is not None else None
    lock = directory.with_suffix(".lock")
    with stage_lock(lock, mark_waiting=cfg.sweep.lend_idle_cores):
        if done.is_file():  # another worker trained it while we waited
            return done_checkpoint(directory)
        stage = copy.deepcopy(cfg)
        stage.train.out_dir = str(directory)
        stage.train.init_checkpoint = str(init) if init else None
        kind = "stage 1 (single-frame SSD)" if init is None else f"stage 2 ({_describe(cfg)})"
        log(f"  training {kind} -> {directory}")
        resume = (directory / "checkpoints" / "last.ckpt").is_file()  # an interrupted stage continues
        job = stage_kind(cfg)
        links = {"stage_hash": directory.name, "parent_run_id": recorded_run_id(stage_directory(parent, runs_dir))
                 if parent is not None else None}
        with stage_run(tracking, directory, job, f"{job}-{directory.name}", {**to_flat_dict(stage), **links}) as loggers:
            lend = [LendIdleCores(lock, log=log)] if cfg.sweep.lend_idle_cores else []
            result = fit(stage.model, stage.data, stage.train, resume=resume,
                         callbacks=[TrainProgress(log=log), *lend, *callbacks], loggers=loggers)
        (directory / "config.json").write_text(json.dumps(to_flat_dict(stage), indent=1, default=str))
        tmp = done.with_suffix(f".tmp-{os.getpid()}")
        # relative to the stage's own directory: the cache serves runs from any working directory, and moved
        checkpoint = os.path.relpath(Path(result.checkpoint).resolve(), directory.resolve())
        tmp.write_text(json.dumps({"checkpoint": checkpoint, "metrics": result.metrics}))
        os.replace(tmp, done)
        return result.checkpoint


def done_checkpoint(directory: Path) -> Path:
    """The checkpoint a finished stage's done.json names. Stages written before it was stored relative to
    `directory` name it relative to the working directory of the run that trained it: found in
    `directory` by the same relative path's tail, so a cache copied, linked or read from elsewhere serves.
    A checkpoint that is nowhere is a UserError: retrying the trial would find the same cache, so the suite
    stops at once and says what to delete."""
    stored = Path(json.loads((directory / DONE).read_text())["checkpoint"])
    candidates = [stored] if stored.is_absolute() else [directory / stored, stored]
    candidates.append(directory / "checkpoints" / stored.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{directory / DONE} names checkpoint {stored}, which is not in {directory}: "
                    f"delete {directory} to train that stage again")


def _describe(cfg: TafmConfig) -> str:
    if cfg.model.recurrent.type == RecurrentType.none:
        frozen = ("nothing frozen" if cfg.train.freeze == FreezeMode.none
                  else f"the base frozen through {cfg.train.freeze_through}")
        return f"single-frame SSD finetuned with {frozen}, no recurrent layer"
    extra = cfg.sweep.extra_stages
    return (f"{cfg.model.recurrent.type.value} after {'+'.join(cfg.model.recurrent.after)}"
            + (f", {extra} stage{'s' if extra > 1 else ''} more" if extra else ""))


def evaluate_variants(cfg: TafmConfig, checkpoint: Path, variants: Dict[str, list],
                      matches_dir: Optional[Path] = None, relative_to: Optional[Path] = None) -> Dict[str, Any]:
    """Clean evaluation plus one per occlusion probability (all models see the same occlusions).

    With `matches_dir`, each evaluation's devkit matches by video are kept there (`p<level>.npz`, for the
    reports' paired bootstrap) and returned as artifacts (`artifact.matches.p<level>`: the path relative
    to `relative_to`, the suite's run directory)."""
    from lightning_modules.fit import evaluate

    metrics: Dict[str, Any] = {}
    for p in [0.0, *variants.get("occlusion_p", [])]:
        stream = copy.deepcopy(cfg)
        stream.data.occlusion_p = float(p)
        if p:
            stream.train.eval_clean_and_occluded = False
        kept: Dict[str, Dict[str, Any]] = {}
        values = evaluate(stream.model, stream.data, stream.train, checkpoint=checkpoint, matches=kept)
        metrics.update(values if not p else {occluded_name(p, key): value for key, value in values.items()})
        if matches_dir is not None and "val" in kept:
            path = VideoMatches.from_arrays(kept["val"]).save(Path(matches_dir) / f"p{float(p):g}.npz")
            metrics[matches_artifact(p)] = str(path.relative_to(relative_to) if relative_to else path)
    return metrics


def run_trial(cfg: TafmConfig, ctx: TrialContext, wandb_mode: str, log=print) -> Dict[str, Any]:
    """The harness's trial function for every suite. A data mistake (the root's layout, a bad file under
    data.strict, nothing left to evaluate) is a UserError: the suite stops at once, nothing is retried."""
    try:
        metrics = _train_and_evaluate(cfg, ctx, wandb_mode, log)
    except VidLayoutError as error:
        raise UserError(f"trial {ctx.key}: data.root: {error_line(error)}") from error
    except VidDataError as error:
        raise UserError(f"trial {ctx.key}: data.strict=true stops at the first bad file: {error_line(error)}; "
                        f"set data.strict=false to skip and count bad files") from error
    return metrics


def _nothing_evaluated(cfg: TafmConfig, ctx: TrialContext) -> UserError:
    root = cfg.data.root or "the synthetic benchmark"
    return UserError(f"trial {ctx.key}: nothing was evaluated: every {cfg.data.val_split} clip of {root} was skipped "
                     f"(corrupt or unreadable frames, see the warnings above), so {ctx.suite.metric!r} cannot be "
                     f"computed; fix the files or pass another --data-root")


def over_mac_budget(cfg: TafmConfig, suite: Suite) -> Optional[str]:
    """Why `cfg` is over its search's `max_macs`, or None. The budget is the paper's, so it is counted on
    the model at the paper's scale (the vid profile's width_scale and input size, with this trial's
    recurrent layers): the synthetic profile's smaller network would fit any budget set for alpha 1 @320."""
    search = suite.search or {}
    if "max_macs" not in search:
        return None
    paper = trial_config([], suite.delta("vid")).model
    model = dataclasses.replace(cfg.model, width_scale=paper.width_scale, input_size=paper.input_size)
    macs, budget = count_cost(create_model(model)).macs, float(search["max_macs"])
    if macs <= budget:
        return None
    return (f"{macs / 1e9:.3f}B MACs over the budget {budget / 1e9:.3f}B (counted at the paper's scale: "
            f"width_scale {model.width_scale:g}, input {model.input_size})")


def _train_and_evaluate(cfg: TafmConfig, ctx: TrialContext, wandb_mode: str, log) -> Dict[str, Any]:
    cost = count_cost(create_model(cfg.model))
    metrics: Dict[str, Any] = {"params": cost.params, "macs": cost.macs,
                               "params_recurrent": cost.recurrent_total("params"),
                               "macs_recurrent": cost.recurrent_total("macs")}
    over = over_mac_budget(cfg, ctx.suite)
    if over:
        import optuna

        raise optuna.TrialPruned(over)
    runs_dir = ctx.options.runs_dir
    # search suites prune hopeless trials (MedianPruner) from the validations of their own stage
    pruning = [OptunaPruning(ctx.trial, ctx.suite.metric)] if ctx.suite.search else []
    checkpoint = trained_stage(cfg, runs_dir, log, callbacks=pruning,
                               tracking=Tracking(wandb_mode, ctx.suite.name, runs_dir / ctx.suite.name))
    stage = stage_directory(cfg, runs_dir)
    config = {**to_flat_dict(cfg), "stage": stage_kind(cfg), "stage_hash": stage.name,
              "stage_run_id": recorded_run_id(stage)}
    tags = [f"{axis}={label}" for axis, label in ctx.labels.items()]
    with TrialRun(wandb_mode, PROJECT, ctx.suite.name, "trial", ctx.key, tags, config,
                  runs_dir / ctx.suite.name) as tracked:
        metrics.update(evaluate_variants(cfg, checkpoint, ctx.suite.evaluate, ctx.run_dir / "matches",
                                          runs_dir / ctx.suite.name))
        metrics.update(single_frame_cap_metric(cfg))
        if not any(key.startswith("val/") for key in metrics):
            raise _nothing_evaluated(cfg, ctx)
        if cfg.sweep.latency:
            metrics.update(_latency(cfg, checkpoint, ctx.run_dir))
        metrics["checkpoint"] = str(checkpoint)
        tracked.log(metrics)  # numbers only: TrialRun.log drops the paths
        tracked.summary(metrics)
    log(result_line(ctx, metrics))
    return metrics


def result_line(ctx: TrialContext, metrics: Dict[str, Any]) -> str:
    """The one terminal line of a finished trial: the suite's metric, clean and at each occlusion level."""
    name = ctx.suite.metric
    suffix = "/" + name.split("/", 1)[-1]
    values = {name: metrics.get(name), **{k: v for k, v in metrics.items() if k.startswith("occ") and k.endswith(suffix)}}
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} -" for k, v in values.items())
    return f"[{ctx.suite.name}] trial {ctx.key} {ctx.labels}: {shown}"


def single_frame_cap_metric(cfg: TafmConfig) -> Dict[str, float]:
    """On the synthetic benchmark, its single-frame cap on the frames this trial is scored on
    (datamodules/synthetic_cap.py), so that reports can set each row beside it; {} on real VID."""
    from datamodules.data_config import EvalProtocol
    from datamodules.synthetic_cap import cap_of_root
    from lightning_modules.fit import resolve_root

    if cfg.data.val_split != "val":
        return {}
    minival = cfg.data.minival_frames if cfg.data.eval_protocol == EvalProtocol.minival else None
    cap = cap_of_root(str(resolve_root(cfg.data)), minival, cfg.data.minival_seed, cfg.data.max_val_videos)
    return {} if cap is None else {"single_frame_cap": cap.vid_map50}


def _latency(cfg: TafmConfig, checkpoint: Path, run_dir: Path) -> Dict[str, float]:
    from ablations.extras.latency_table import trial_latency

    return trial_latency(checkpoint, run_dir, cfg.sweep.latency_frames)
