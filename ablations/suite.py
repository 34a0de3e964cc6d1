"""Named ablation suites: short YAML deltas over the one structured default (ablations/suites/*.yaml).

A suite file:

    description: one line (shown by `tafm suites`)
    table: table3                 # the paper table it regenerates
    metric: val/vid_map50         # what the study optimises / reports
    direction: maximize
    base: {model.recurrent.after: [conv13]}      # delta applied to every trial, over SUITE_DEFAULTS
    grid:                         # axes; every combination is one trial (run exactly once)
      width:                      # a value may be a bundle of keys that move together
        - {model.alpha: 1.0, model.input_size: 320}
        - {model.alpha: 0.5, model.input_size: 256}
      model.recurrent.type: [averaging, lstm, gru, bottleneck_lstm]
    search:                       # instead of (or besides) grid: TPE over a space
      trials: 12
      space: {model.alpha_lstm: {low: 0.05, high: 0.5, log: true}, model.recurrent.after: {choices: [...]}}
      max_macs: 1.2e9             # constraint: configurations above it (counted at the vid profile's scale) are not trained
    evaluate: {occlusion_p: [0.25, 0.5, 0.75]}  # extra evaluations of each trained model
    extras: {cost_tables: true, table7: onnx}    # also regenerate Tables 3-5 costs and Table 7 latency
    profiles:                     # scale switch: synthetic (default) or vid (the paper's settings); wins over grid
      synthetic: {...}
      vid: {...}
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ablations.config import ConfigError, TafmConfig, load_config
from lightning_modules.config import nest

# Under every suite's own base (a suite may override): the released code's relu6 for the recurrent
# cells. With the paper's ReLU a trained Bottleneck-LSTM's output grew ~30x a frame over a clip.
SUITE_DEFAULTS: Dict[str, Any] = {"model.recurrent.activation": "relu6"}

# Under every suite's own `profiles:` entries (which win): the two scales a suite runs at. `synthetic`
# is the CPU recipe measured on the built-in benchmark (README "Training at CPU scale"; it departs
# from the paper where the comments say); `vid` is the paper's ImageNet VID schedule. Input size and
# widths stay with each suite.
PROFILE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "synthetic": {
        "model.bn_momentum": 0.1,  # short runs: BatchNorm statistics must follow in hundreds of steps
        "model.reduce_boxes_in_lowest_layer": False,  # square anchors at 0.2 and 0.28 on the first map
        # stage 2 starts from the single-frame network's function, the cells keeping a quarter of their state each
        # frame; with RMSprop's mean square from 0 in stage 2 (below): Bottleneck-LSTM lead +10.7 against +5.7 over
        # six seeds (README "Stage 2's own knobs")
        "model.recurrent.init": "leaky",
        "model.recurrent.same_width": True,  # the Bottleneck-LSTM keeps FM1's and the heads' stage-1 weights
        "train.epsilon": 0.0001,  # RMSprop with a small epsilon: adaptive per weight
        "train.rms_init": 0.0,  # stage 2: full-size updates from its first step (TF's 1 spends ~40 of 300 at <1/10)
        "sweep.stage1_rms_init": 1.0,  # stage 1 keeps TF's start (and its cached stages' hash)
        "train.loc_weight": 1.0,  # not the release's 4: the class heads learn the pairs (README, cue probe)
        "train.lr_decay_steps": 1600,  # stage 1: 0.002 for 1,600 steps, then 0.0006 (stage 2 is shorter)
        "train.lr_decay_factor": 0.3,
        "train.ema_decay": 0.98,
        "train.init_from_ema": True,  # stage 2 starts from stage 1's EMA weights, the ones it was scored with
        "train.lr": 0.0006,  # stage 2: the rate stage 1 ended at (0.002 x 0.3), not a restart at 0.002
        "train.distill_steps": 100,  # stage-2 warm start on the stage-1 network's outputs
        # 600 stage-2 steps: the cells are not done learning at 300 (Bottleneck-LSTM lead +10.8 against +6.7 at
        # blend 0.4, six seeds), the control gains nothing from the extra steps (README "The marker's strength")
        "train.max_steps": 600,
        "train.max_epochs": None,
        "train.val_every_n_epochs": 1000,  # validate once, at the end
        "train.log_every_n_steps": 10,  # W&B curves: 60 points for a 600-step stage 2 (not in the stage hash)
        "sweep.stage1_lr": 0.002,
        "sweep.stage1_max_steps": 2400,  # 1,200 learnt the marker too, but the control scored 26 against 37
        # stage 1 on the benchmark's twin with the marker on every frame, where the base learns it; at 35%
        # it does not (README "Why the marker is not learnt"), and then no recurrent layer has a class to carry
        "sweep.stage1_cue_prob": 1.0,
        "sweep.stage1_clip_length": 1,  # single frames: 16 different frames a step, not 8 pairs of twins
        "sweep.stage1_batch_size": 16,
        "sweep.single_frame_stage2": True,  # the none row gets the recurrent rows' stage-2 budget
        "data.batch_size": 4,
    },
    "vid": {
        "train.accelerator": "auto",
        "train.max_epochs": 10,
        "train.max_steps": -1,
        "train.checkpoint_every_n_steps": 2000,
        "data.num_workers": 8,
        "data.batch_size": 8,
    },
}

SUITE_KEYS = {"description", "table", "metric", "direction", "base", "grid", "search", "evaluate", "profiles", "seeds",
              "extras"}
EXTRAS = ("cost_tables", "table7")  # appended to the suite's report: tafm cost --table, tafm latency --table7
PROFILES = ("synthetic", "vid")


@dataclass(frozen=True)
class TrialPoint:
    """One configuration of a suite: its id, its axis labels and its config overrides."""

    point_id: str
    labels: Dict[str, str]
    overrides: Dict[str, Any]


@dataclass
class Suite:
    name: str
    description: str
    table: str
    metric: str
    direction: str
    base: Dict[str, Any]
    grid: Dict[str, List[Any]]
    search: Optional[Dict[str, Any]]
    evaluate: Dict[str, List[Any]]
    profiles: Dict[str, Dict[str, Any]]
    seeds: int = 1
    extras: Dict[str, Any] = field(default_factory=dict)
    source: str = ""
    points: List[TrialPoint] = field(default_factory=list)
    #: per profile, the keys the suite file's own `profiles:` block sets (the rest of `profiles` is PROFILE_DEFAULTS)
    own_profile_keys: Dict[str, frozenset] = field(default_factory=dict)

    def delta(self, profile: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The flat config delta of a trial: suite base, then the trial's own keys (`extra`: a grid point's or a
        search sample's), then the profile.

        The suite's own profile block carries scale (input size, training length), so it wins: the synthetic
        profile shrinks every grid point's input the same way. A recipe default (PROFILE_DEFAULTS) the suite
        does not set itself yields to the trial's own keys: a grid axis or search key on, say, train.lr or
        model.recurrent.init varies it instead of being silently replaced by the recipe's one value."""
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
        merged: Dict[str, Any] = {}
        merged.update(self.base)
        merged.update(extra or {})
        own = self.own_profile_keys.get(profile, frozenset())
        merged.update({key: value for key, value in self.profiles.get(profile, {}).items()
                       if key in own or key not in (extra or {})})
        return merged


def suites_dir() -> Path:
    return Path(str(resources.files("ablations") / "suites"))


def available_suites() -> List[str]:
    return sorted(p.stem for p in suites_dir().glob("*.yaml"))


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k.split('.')[-1]}={v}" for k, v in value.items())
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)


def _expand_grid(grid: Dict[str, List[Any]]) -> List[TrialPoint]:
    if not grid:
        return [TrialPoint("default", {}, {})]
    axes = list(grid)
    points = []
    for combo in itertools.product(*(grid[a] for a in axes)):
        overrides: Dict[str, Any] = {}
        labels = {}
        for axis, value in zip(axes, combo):
            labels[axis] = _label(value)
            overrides.update(value if isinstance(value, dict) else {axis: value})
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
        points.append(TrialPoint(digest, labels, overrides))
    return points


def _check_keys(where: str, mapping: Dict[str, Any], source: str) -> None:
    """Every key must exist in the structured config: load it once to get the error message."""
    try:
        load_config([], delta=nest(mapping), delta_source=f"{source}: {where}")
    except ConfigError as error:
        raise ConfigError(str(error)) from None


def trial_config(overrides_cli: List[str], delta: Dict[str, Any]) -> TafmConfig:
    """A trial's config: default <- suite delta (profile, base, grid point) <- --set; `seed` seeds data and train."""
    delta = dict(delta)
    seed = delta.pop("seed", 0)
    cfg = load_config(overrides_cli, delta=nest(delta))
    return replace(cfg, data=replace(cfg.data, seed=cfg.data.seed + seed), train=replace(cfg.train, seed=cfg.train.seed + seed))


def _suite_path(name_or_path: str) -> Path:
    """A suite name (ablations/suites/NAME.yaml) or a path to a .yaml/.yml file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = suites_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown suite {name_or_path!r}; valid: {', '.join(available_suites())} "
                              f"(or a path to a suite .yaml file)")
    elif not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    return path


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite file is a mapping with the keys {sorted(SUITE_KEYS)}, "
                          f"got {type(raw).__name__} {raw!r}")
    return raw


def _as_mapping(value: Any, where: str, example: str) -> Dict[str, Any]:
    """`value` as a mapping ({} when absent); anything else names where it is and an example."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, e.g. {example}; got {type(value).__name__} {value!r}")
    return value


def _mapping(raw: Dict[str, Any], key: str, path: Path, example: str) -> Dict[str, Any]:
    return _as_mapping(raw.get(key), f"{path}: {key!r}", f"{key}: {example}")


def _check_space(space: Dict[str, Any], path: Path) -> None:
    example = "{low: 0.05, high: 0.5, log: true} or {choices: [a, b]}"
    for key, spec in space.items():
        spec = _as_mapping(spec, f"{path}: search.space {key!r}", example)
        if not (isinstance(spec.get("choices"), list) and spec["choices"]) and not {"low", "high"} <= set(spec):
            raise ConfigError(f"{path}: search.space {key!r} needs low and high, or a non-empty choices list, "
                              f"e.g. {example}; got {spec!r}")


def _positive_int(value: Any, where: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer, e.g. {example}; got {value!r}")
    return value


def _check_structure(raw: Dict[str, Any], path: Path) -> None:
    """The suite's own keys and their shapes; config keys are checked later, against the structured config."""
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown suite key(s) {sorted(unknown)}; valid: {sorted(SUITE_KEYS)}")
    for key in ("description", "table", "metric"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: direction must be maximize or minimize, got {direction!r}")
    _positive_int(raw.get("seeds", 1), f"{path}: 'seeds'", "seeds: 3")
    for profile, delta in _mapping(raw, "profiles", path, "{synthetic: {train.max_steps: 100}}").items():
        if profile not in PROFILES:
            raise ConfigError(f"{path}: unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
        _as_mapping(delta, f"{path}: profile {profile!r}", f"{profile}: {{train.max_steps: 100}}")
    for axis, values in _mapping(raw, "grid", path, "{model.recurrent.type: [lstm, gru]}").items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid axis {axis!r} must be a non-empty list")
    search = _mapping(raw, "search", path, "{trials: 12, space: {model.alpha_lstm: {low: 0.05, high: 0.5}}}")
    if search:
        _positive_int(search.get("trials"), f"{path}: 'search.trials'", "trials: 12")
        _check_space(_as_mapping(search.get("space"), f"{path}: 'search.space'",
                                 "space: {model.alpha_lstm: {low: 0.05, high: 0.5}}"), path)
    for key in _mapping(raw, "evaluate", path, "{occlusion_p: [0.25, 0.5]}"):
        if key != "occlusion_p":
            raise ConfigError(f"{path}: evaluate supports occlusion_p only, got {key!r}")
    for key in _mapping(raw, "extras", path, "{cost_tables: true}"):
        if key not in EXTRAS:
            raise ConfigError(f"{path}: unknown extra {key!r}; valid: {', '.join(EXTRAS)}")
    _mapping(raw, "base", path, "{model.alpha: 0.5}")


def load_suite(name_or_path: str) -> Suite:
    """Read and validate a suite by name (ablations/suites/NAME.yaml) or path."""
    path = _suite_path(name_or_path)
    raw = _read_yaml(path)
    _check_structure(raw, path)
    grid = raw.get("grid") or {}
    suite = Suite(name=path.stem, description=raw["description"], table=raw["table"], metric=raw["metric"],
                  direction=raw.get("direction", "maximize"), base={**SUITE_DEFAULTS, **(raw.get("base") or {})},
                  grid=grid, search=raw.get("search") or None, evaluate=raw.get("evaluate") or {},
                  profiles={name: {**PROFILE_DEFAULTS[name], **((raw.get("profiles") or {}).get(name) or {})}
                            for name in PROFILES}, seeds=raw.get("seeds", 1), extras=raw.get("extras") or {},
                  source=str(path),
                  own_profile_keys={name: frozenset(((raw.get("profiles") or {}).get(name) or {}).keys())
                                    for name in PROFILES})
    suite.points = _expand_grid(grid)
    for profile in PROFILES:
        _check_keys(f"profile {profile}", suite.delta(profile), str(path))
    for point in suite.points:
        _check_keys(f"grid point {point.labels}", suite.delta("synthetic", point.overrides), str(path))
    return suite
