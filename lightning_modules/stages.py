"""Two-stage training helpers (paper Sec. 4.1; reproduction notes Sec. 4).

- `read_net_state`: the network's tensors from a Lightning checkpoint (raw or EMA weights) or a plain
  state dict.
- `load_matching`: stage-2 (and progressive multi-LSTM) initialisation: every tensor whose name AND
  shape match is copied; the rest keep their fresh initialisation. `LoadSummary.format()` says which.
- `freeze_base` / `keep_frozen_bn_eval`: "freeze the weights in the base network, up to and including
  layer Conv13" (paper Sec. 4.1); the paper's Conv13 is `base.conv13`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

#: Checkpoint key holding the EMA ("evaluated") network weights, written by `ema.EMACallback`.
EMA_STATE_KEY = "ema_state_dict"
NET_PREFIX = "net."


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


@dataclass
class LoadSummary:
    """What `load_matching` did: loaded names, fresh names (absent from the source), names whose shape
    changed (source shape, model shape), and source tensors the model has no place for."""

    loaded: List[str] = field(default_factory=list)
    fresh: List[str] = field(default_factory=list)
    reshaped: List[Tuple[str, str, str]] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)

    @staticmethod
    def _grouped(names: List[str]) -> List[str]:
        """'cells.conv13_0.*' (4) for several names under one module, the full name for a single one."""
        groups: Dict[str, List[str]] = OrderedDict()
        for name in names:
            groups.setdefault(".".join(name.split(".")[:2]), []).append(name)
        return [members[0] if len(members) == 1 else f"{prefix}.* ({len(members)})"
                for prefix, members in groups.items()]

    def _reshaped_grouped(self) -> List[str]:
        groups: Dict[str, List[Tuple[str, str, str]]] = OrderedDict()
        for item in self.reshaped:
            groups.setdefault(".".join(item[0].split(".")[:2]), []).append(item)
        out = []
        for prefix, items in groups.items():
            name, before, after = items[0]
            out.append(f"{name} (shape {before} -> {after})" if len(items) == 1 else
                       f"{prefix}.* ({len(items)}, shape changed, e.g. {name} {before} -> {after})")
        return out

    def format(self) -> str:
        """One line, e.g. 'loaded 137 tensors, fresh: cells.conv13_0.* (6), fm.fm1.0.weight (shape
        128x1024x1x1 -> 128x256x1x1)'; then the checkpoint tensors the model has no place for."""
        fresh = self._grouped(self.fresh) + self._reshaped_grouped()
        text = f"loaded {len(self.loaded)} tensors, fresh: {', '.join(fresh) if fresh else 'none'}"
        if self.unused:
            text += f"; unused from checkpoint: {', '.join(self._grouped(self.unused))}"
        return text


def read_net_state(path: str | Path, use_ema: Optional[bool] = False) -> Dict[str, Tensor]:
    """Network tensors (names as in `net.state_dict()`) from a tafm Lightning checkpoint or a plain
    state-dict file: the raw weights (`state_dict`, `net.` prefix dropped) when use_ema is False, the
    evaluated EMA weights (`ema_state_dict`) when True, and the EMA ones if present when None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    obj = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoints (loops, hparams)
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path}: expected a checkpoint or state dict, found {type(obj).__name__}")
    if use_ema or (use_ema is None and EMA_STATE_KEY in obj):
        if EMA_STATE_KEY not in obj:
            raise ValueError(f"checkpoint {path} has no EMA weights ('{EMA_STATE_KEY}': trained with "
                             f"train.ema_decay=0, or not a tafm checkpoint); use its raw weights "
                             f"(train.init_from_ema=false)")
        return dict(obj[EMA_STATE_KEY])
    state = obj["state_dict"] if "state_dict" in obj else obj
    if any(k.startswith(NET_PREFIX) for k in state):
        return {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    return dict(state)


def load_matching(net: nn.Module, source: Mapping[str, Tensor]) -> LoadSummary:
    """Copy every source tensor whose name and shape match `net.state_dict()`; keep the rest fresh
    (reproduction notes Sec. 4: e.g. FM1's 1x1 when its input drops from 1024 to 256 channels)."""
    summary = LoadSummary()
    target = net.state_dict()
    update = {}
    for name, value in target.items():
        if name not in source:
            summary.fresh.append(name)
        elif tuple(source[name].shape) != tuple(value.shape):
            summary.reshaped.append((name, _shape(source[name]), _shape(value)))
        else:
            update[name] = source[name]
            summary.loaded.append(name)
    summary.unused = [name for name in source if name not in target]
    net.load_state_dict(update, strict=False)
    return summary


def init_from_checkpoint(net: nn.Module, path: str | Path, use_ema: bool = False) -> LoadSummary:
    """Stage-2 / progressive initialisation of `net` from an earlier checkpoint (same loading rule)."""
    return load_matching(net, read_net_state(path, use_ema))


def frozen_layer_names(net: nn.Module, through: str) -> List[str]:
    """Base layers conv1 .. `through` in network order (paper Table 1 names)."""
    names = list(net.base.keys())
    if through not in names:
        raise ValueError(f"train.freeze_through={through!r} is not a base layer of this model; "
                         f"valid: {', '.join(names)}")
    return names[: names.index(through) + 1]


def freeze_base(net: nn.Module, through: str = "conv13") -> List[str]:
    """requires_grad False for every parameter of base.conv1 .. base.<through>; returns the layers."""
    layers = frozen_layer_names(net, through)
    for layer in layers:
        for parameter in net.base[layer].parameters():
            parameter.requires_grad_(False)
    return layers


def frozen_batchnorms(net: nn.Module, layers: List[str]) -> List[str]:
    """Module names of the BatchNorms inside the frozen base layers."""
    prefixes = tuple(f"base.{layer}." for layer in layers)
    return [name for name, module in net.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and name.startswith(prefixes)]


def keep_frozen_bn_eval(net: nn.Module, names: List[str]) -> None:
    """Put the named BatchNorms in eval mode: they normalise with, and never update, running stats."""
    for name in names:
        net.get_submodule(name).eval()
