"""Mobile export of the one-frame stateful detector, and its parity check (paper Sec. 4.5).

The paper runs LSTM-SSD frame by frame on a phone, the LSTM states carried between calls and
NMS on the host. The exported graph is one frame:

    (image[1,3,S,S], *state) -> (boxes[1,A,4], scores[1,A,C], *new_state)

- image: 2*x/255 - 1 (project convention); boxes: decoded, normalized xyxy clipped to [0, 1];
  scores: sigmoid of the class logits, background dropped (column k-1 = class k). NMS stays out of
  the graph: run `postprocess`'s NMS on the host.
- state: every tensor of every recurrent layer, layers in `net.cell_order`, each layer's tensors in
  its cell's order (the cell's `state_names`, e.g. Bottleneck-LSTM: c then h). Inputs are named
  `state_<layer>_<field>`, outputs `new_state_<layer>_<field>`; zeros at the start of a video; feed
  each output back as the same-position input. A model without recurrent layers has no state.
- A JSON sidecar `<model file>.json` describes inputs, outputs, anchors count, classes and config.

Formats: `executorch` (torch.export -> XNNPACK-lowered .pte) and `onnx` (torch.onnx dynamo exporter,
run by onnxruntime). Checkpoints: a Lightning .ckpt or a plain file from `save_plain_checkpoint`.
"""
from __future__ import annotations

import json
import operator
import pickle
import time
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from lightning_modules.anchors import BoxCoder
from lightning_modules.config import ModelConfig, flat_config, nest, plain_config, validate_model
from lightning_modules.deploy.formats import EXPORT_FORMATS, SUFFIX, export_format
from lightning_modules.markdown import markdown_table
from lightning_modules.network import LSTMSSD, create_model

#: Defaults of the export (one place).
DEFAULT_PARITY_FRAMES = 20
DEFAULT_BOX_TOL = 1e-3  # normalized box coordinates
DEFAULT_SCORE_TOL = 1e-3  # sigmoid scores
DEFAULT_SEED = 0
FORMATS = EXPORT_FORMATS  # name -> format; `fmt in FORMATS`, `", ".join(FORMATS)` read its names
CHECKPOINT_FORMS = ("a Lightning .ckpt with 'state_dict' (keys 'net.*') and 'hyper_parameters' (model config "
                    "under 'model' or as 'model.*' keys), or a plain torch file {'model_config', 'state_dict'} "
                    "written by save_plain_checkpoint")

Source = Union[str, Path, Tuple[LSTMSSD, ModelConfig]]


# ---------------------------------------------------------------- checkpoints

def flat_model_config(cfg: ModelConfig) -> dict:
    """The model config as one flat {dotted.key: plain value} dict (enums as strings)."""
    return flat_config(cfg)


def model_config_from_dict(values: Any, source: str) -> ModelConfig:
    """A validated ModelConfig from a nested or flat dict (keys optionally prefixed `model.`)."""
    if isinstance(values, ModelConfig):
        cfg = values
    else:
        if OmegaConf.is_config(values):
            values = OmegaConf.to_container(values, enum_to_str=True)
        elif is_dataclass(values):
            values = plain_config(values)
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: the model config must be a dict, got {type(values).__name__}")
        nested = nest({str(k)[len("model."):] if str(k).startswith("model.") else k: v for k, v in values.items()})
        try:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), nested))
        except OmegaConfBaseException as error:
            valid = ", ".join(flat_model_config(ModelConfig()))
            raise ValueError(f"{source}: bad model config: {str(error).splitlines()[0]}; valid keys: {valid}") from None
    try:
        validate_model(cfg)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    return cfg


def save_plain_checkpoint(net: LSTMSSD, cfg: ModelConfig, path: Union[str, Path]) -> Path:
    """Write the plain checkpoint {'model_config': flat config, 'state_dict': net.state_dict()}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": flat_model_config(cfg), "state_dict": net.state_dict()}, path)
    return path


def _torch_load(path: Path) -> Any:
    """torch.load, tensors-only first; a pickle with other objects (Lightning hparams) is a trusted local file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path: Union[str, Path]) -> Tuple[LSTMSSD, ModelConfig]:
    """The network (eval mode) and its model config from either checkpoint form (`CHECKPOINT_FORMS`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; expected {CHECKPOINT_FORMS}")
    try:
        blob = _torch_load(path)
    except Exception as error:  # torch raises many types for a non-checkpoint file
        raise ValueError(f"checkpoint {path} is not a torch file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); expected {CHECKPOINT_FORMS}") from None
    if not isinstance(blob, Mapping) or not isinstance(blob.get("state_dict"), Mapping):
        found = sorted(map(str, blob.keys())) if isinstance(blob, Mapping) else type(blob).__name__
        raise ValueError(f"checkpoint {path} has no 'state_dict' dict (found: {found}); expected {CHECKPOINT_FORMS}")
    if "model_config" in blob:
        cfg = model_config_from_dict(blob["model_config"], f"checkpoint {path} key 'model_config'")
    elif "hyper_parameters" in blob:
        hparams = blob["hyper_parameters"]
        hparams = OmegaConf.to_container(hparams) if OmegaConf.is_config(hparams) else dict(hparams or {})
        if "model" in hparams:
            cfg = model_config_from_dict(hparams["model"], f"checkpoint {path} hyper_parameters['model']")
        elif any(str(k).startswith("model.") for k in hparams):
            flat = {k: v for k, v in hparams.items() if str(k).startswith("model.")}
            cfg = model_config_from_dict(flat, f"checkpoint {path} hyper_parameters 'model.*'")
        else:
            raise ValueError(f"checkpoint {path}: hyper_parameters hold no model config (keys: {sorted(hparams)}); "
                             f"expected a nested dict under 'model' or flat 'model.*' keys")
    else:
        raise ValueError(f"checkpoint {path} has a 'state_dict' but neither 'model_config' nor 'hyper_parameters' "
                         f"(found: {sorted(map(str, blob.keys()))}); expected {CHECKPOINT_FORMS}")
    state = blob["state_dict"]
    if any(str(k).startswith("net.") for k in state):  # Lightning: the network is the module's `net`
        state = {k[len("net."):]: v for k, v in state.items() if str(k).startswith("net.")}
    net = create_model(cfg)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"checkpoint {path}: its weights do not fit the network of its model config: "
                         f"{problems[0][:300]}{more}") from None
    return net.eval(), cfg


# ---------------------------------------------------------------- the exported module

@dataclass(frozen=True)
class StateSpec:
    """One state tensor of the exported model."""

    layer: str  # key in net.cell_order, e.g. conv13_0
    field: str  # e.g. c, h
    shape: Tuple[int, ...]

    @property
    def input_name(self) -> str:
        return f"state_{self.layer}_{self.field}"

    @property
    def output_name(self) -> str:
        return f"new_state_{self.layer}_{self.field}"


class OneFrameDetector(nn.Module):
    """(image[1,3,S,S], *state) -> (boxes[1,A,4], scores[1,A,C], *new_state): the exported graph."""

    def __init__(self, net: LSTMSSD):
        super().__init__()
        self.net = net.eval()
        self.box_coder = BoxCoder()
        self.register_buffer("anchors", net.anchors(), persistent=False)
        zero = net.zero_state(1)
        self.state_specs: List[StateSpec] = []
        for layer, cell_state in zip(net.cell_order, zero):
            names = net.cells[layer].state_names or tuple(f"s{i}" for i in range(len(cell_state)))
            self.state_specs += [StateSpec(layer, n, tuple(t.shape)) for n, t in zip(names, cell_state)]
        self._layer_sizes = [len(s) for s in zero]

    def zero_state(self) -> List[Tensor]:
        """Flat zero state (a new video), in input order."""
        return [torch.zeros(spec.shape) for spec in self.state_specs]

    def detections(self, box_regression: Tensor, class_logits: Tensor) -> Tuple[Tensor, Tensor]:
        """Decoded clipped boxes [..., A, 4] and sigmoid scores without background [..., A, C]."""
        boxes = self.box_coder.decode(box_regression, self.anchors).clamp(0.0, 1.0)
        return boxes, torch.sigmoid(class_logits[..., 1:])

    def forward(self, image: Tensor, *state: Tensor) -> Tuple[Tensor, ...]:
        nested, start = [], 0
        for size in self._layer_sizes:
            nested.append(tuple(state[start:start + size]))
            start += size
        box_regression, class_logits, new = self.net.step(image, tuple(nested) if nested else None)
        boxes, scores = self.detections(box_regression, class_logits)
        return (boxes, scores, *[t for cell_state in new for t in cell_state])


# ---------------------------------------------------------------- lowering and running

def _shape(node: torch.fx.Node) -> Optional[Tuple[int, ...]]:
    value = node.meta.get("val")
    return tuple(value.shape) if value is not None else None


def _chunk_to_slices(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """x.chunk(n, dim) read through getitem -> one slice of x per chunk."""
    x, chunks = node.args[0], node.args[1]
    dim = node.args[2] if len(node.args) > 2 else 0
    size = _shape(x)[dim]
    step = -(-size // chunks)
    for user in list(node.users):
        index = user.args[1]
        with graph.inserting_before(user):
            piece = graph.call_function(torch.ops.aten.slice.Tensor, (x, dim, index * step, min(size, (index + 1) * step)))
        piece.meta = dict(user.meta)
        user.replace_all_uses_with(piece)
        graph.erase_node(user)
    graph.erase_node(node)


def _identity_source(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The tensor a one-frame unroll's view pair merely passes through: select(unflatten(x, 0, [1, -1]), 0, 0)
    and flatten(stack([y]), 0, 1) are x and y when the shapes agree; else None."""
    aten = torch.ops.aten
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or source.op != "call_function":
        return None
    if node.target == aten.select.int and tuple(node.args[1:]) == (0, 0) and source.target == aten.unflatten.int:
        inner = source.args[0]
    elif node.target == aten.flatten.using_ints and tuple(node.args[1:]) == (0, 1) and \
            source.target == aten.stack.default and len(source.args[0]) == 1 and tuple(source.args[1:]) in ((), (0,)):
        inner = source.args[0][0]
    else:
        return None
    return inner if _shape(inner) == _shape(node) else None


def one_frame_for_xnnpack(exported: torch.export.ExportedProgram) -> int:
    """Rewrite a traced one-frame model (in place) so that XNNPACK can take each recurrent cell whole: the LSTM
    gates' chunk becomes slices, and the view pair around each cell of the T = 1 unroll (select a frame, stack
    it back) goes. Outputs are unchanged (export parity checks them); LSTM-SSD went from 18 XNNPACK partitions,
    each converting layouts at its edges, to 2. Returns the number of rewrites."""
    graph = exported.graph_module.graph
    rewrites = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.chunk.default and all(u.target is operator.getitem for u in node.users):
            _chunk_to_slices(graph, node)
            rewrites += 1
        elif (source := _identity_source(node)) is not None:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            rewrites += 1
    graph.eliminate_dead_code()
    exported.graph_module.recompile()
    return rewrites


def lower_to_file(module: nn.Module, example_inputs: Tuple[Tensor, ...], path: Path, fmt: str,
                  input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Write `module` in export format `fmt` (lightning_modules/deploy/formats.py); names are used by ONNX only."""
    export_format(fmt).lower(module, example_inputs, path, input_names, output_names)


def format_of(path: Union[str, Path]) -> str:
    """The export format of a model file, from its suffix (.pte / .onnx)."""
    suffix = Path(path).suffix
    for fmt, known in SUFFIX.items():
        if suffix == known:
            return fmt
    valid = ", ".join(f"{known} ({fmt})" for fmt, known in SUFFIX.items())
    raise ValueError(f"{path}: unknown model file type {suffix!r}; valid: {valid}")


def load_runtime(path: Union[str, Path], threads: Optional[int] = None) -> Callable[[Sequence[Tensor]], List[Tensor]]:
    """A callable running the exported model: list of input tensors -> list of output tensors (fresh copies,
    safe to feed back). onnxruntime: `threads` intra-op threads (None: its default), inter-op 1, sequential;
    ExecuTorch: its global threadpool as set (formats.set_executorch_threads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    return export_format(format_of(path)).load(path, threads)


# ---------------------------------------------------------------- parity

@dataclass
class ParityReport:
    """Max |eager - exported| per frame of a clip, the state fed back (eager = the whole clip in one forward)."""

    box_diff: List[float]
    score_diff: List[float]
    box_tol: float
    score_tol: float

    @property
    def max_box(self) -> float:
        return float(torch.tensor(self.box_diff).max())  # NaN propagates (builtin max would skip it)

    @property
    def max_score(self) -> float:
        return float(torch.tensor(self.score_diff).max())

    @property
    def ok(self) -> bool:
        return self.max_box <= self.box_tol and self.max_score <= self.score_tol

    def format(self) -> str:
        rows = [[t, f"{b:.3g}", f"{s:.3g}"] for t, (b, s) in enumerate(zip(self.box_diff, self.score_diff))]
        rows.append(["max", f"{self.max_box:.3g} (tol {self.box_tol:g})", f"{self.max_score:.3g} (tol {self.score_tol:g})"])
        return "\n".join(markdown_table(["frame", "max abs diff boxes", "max abs diff scores"], rows))


def check_parity(detector: OneFrameDetector, model_path: Union[str, Path], frames: Tensor,
                 box_tol: float = DEFAULT_BOX_TOL, score_tol: float = DEFAULT_SCORE_TOL) -> ParityReport:
    """Run eager PyTorch (one forward over the clip [T,3,S,S]) and the exported model (frame by frame, state
    fed back from zeros); raise ValueError when a frame differs by more than the tolerances."""
    with torch.no_grad():
        box_regression, class_logits, _ = detector.net(frames[:, None])
        ref_boxes, ref_scores = detector.detections(box_regression, class_logits)  # [T, 1, A, *]
    runner = load_runtime(model_path)
    state = detector.zero_state()
    box_diff, score_diff = [], []
    for t in range(frames.shape[0]):
        boxes, scores, *state = runner([frames[t:t + 1], *state])
        box_diff.append(float((boxes - ref_boxes[t]).abs().max()))
        score_diff.append(float((scores - ref_scores[t]).abs().max()))
    report = ParityReport(box_diff, score_diff, box_tol, score_tol)
    if not report.ok:
        raise ValueError(f"export parity failed for {model_path}: max abs diff boxes {report.max_box:.3g} "
                         f"(tol {box_tol:g}), scores {report.max_score:.3g} (tol {score_tol:g})\n{report.format()}")
    return report


# ---------------------------------------------------------------- export

@dataclass
class ExportResult:
    fmt: str
    model_path: Path
    sidecar_path: Path
    input_names: List[str]
    output_names: List[str]
    state: List[StateSpec]
    num_anchors: int
    parity: Optional[ParityReport]
    export_seconds: float
    sidecar: dict = field(repr=False, default_factory=dict)

    def format(self) -> str:
        lines = [f"exported {self.fmt} model: {self.model_path} ({self.export_seconds:.1f} s), "
                 f"sidecar {self.sidecar_path}",
                 f"inputs: {', '.join(self.input_names)}", f"outputs: {', '.join(self.output_names)}"]
        if self.parity is not None:
            lines += ["", f"parity over {len(self.parity.box_diff)} frames (state fed back):", self.parity.format()]
        return "\n".join(lines)


def sidecar_path(model_path: Union[str, Path]) -> Path:
    """`model.pte` -> `model.pte.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: Union[str, Path]) -> dict:
    """The sidecar JSON of an exported model; a clear error when it is missing."""
    path = sidecar_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the sidecar of {model_path}) does not exist; export the model with "
                                f"`tafm export` / export_model, which writes it next to the model file")
    return json.loads(path.read_text())


def _describe(detector: OneFrameDetector, cfg: ModelConfig, fmt: str, model_path: Path,
              class_names: Optional[Sequence[str]]) -> dict:
    from lightning_modules.deploy.cost import count_cost

    size, anchors, classes = cfg.input_size, int(detector.anchors.shape[0]), cfg.num_classes
    state = [{"layer": s.layer, "field": s.field, "input": s.input_name, "output": s.output_name,
              "shape": list(s.shape)} for s in detector.state_specs]
    return {
        "format": fmt, "model_file": model_path.name, "input_size": size, "num_classes": classes,
        "class_names": list(class_names) if class_names is not None else None, "num_anchors": anchors,
        "inputs": [{"name": "image", "shape": [1, 3, size, size], "dtype": "float32",
                    "meaning": "RGB scaled 2*x/255-1"}] + [
                   {"name": s["input"], "shape": s["shape"], "dtype": "float32",
                    "meaning": "recurrent state; zeros at the start of a video"} for s in state],
        "outputs": [{"name": "boxes", "shape": [1, anchors, 4], "dtype": "float32",
                     "meaning": "decoded boxes, normalized (xmin, ymin, xmax, ymax) clipped to [0, 1]"},
                    {"name": "scores", "shape": [1, anchors, classes], "dtype": "float32",
                     "meaning": "sigmoid class scores, background dropped: column k-1 is class k"}] + [
                   {"name": s["output"], "shape": s["shape"], "dtype": "float32",
                    "meaning": f"new state: feed back as {s['input']}"} for s in state],
        "state": state, "postprocess": "NMS on the host (lightning_modules/postprocess.py), not in the graph",
        "macs": count_cost(detector.net).macs, "model_config": flat_model_config(cfg),
        "torch_version": torch.__version__,
    }


def export_model(source: Source, out_path: Union[str, Path], fmt: str = "executorch", *,
                 frames: Optional[Tensor] = None, parity_frames: int = DEFAULT_PARITY_FRAMES,
                 box_tol: float = DEFAULT_BOX_TOL, score_tol: float = DEFAULT_SCORE_TOL,
                 class_names: Optional[Sequence[str]] = None, check: bool = True,
                 seed: int = DEFAULT_SEED) -> ExportResult:
    """Export a checkpoint (path) or (net, model_cfg) as the one-frame stateful model, write the sidecar,
    and (check=True) verify parity over a clip: `frames` [T,3,S,S] in [-1, 1], else `parity_frames`
    random frames from `seed`. Raises ValueError when parity fails (the model file is then left without a
    sidecar, so latency.measure_latency refuses it). The net's train/eval mode is restored afterwards."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not supported; valid: {', '.join(FORMATS)}")
    net, cfg = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    size = cfg.input_size
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise ValueError(f"export: {len(class_names)} class names given but model.num_classes={cfg.num_classes}")
    if check and frames is None:
        frames = torch.rand(parity_frames, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    if check and (frames.ndim != 4 or tuple(frames.shape[1:]) != (3, size, size) or frames.shape[0] < 1):
        raise ValueError(f"export: parity frames must be [T, 3, {size}, {size}], got {tuple(frames.shape)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(out_path).unlink(missing_ok=True)  # never leave an old sidecar beside a new model
    was_training = net.training
    try:
        detector = OneFrameDetector(net).eval()
        input_names = ["image"] + [s.input_name for s in detector.state_specs]
        output_names = ["boxes", "scores"] + [s.output_name for s in detector.state_specs]
        start = time.perf_counter()
        with torch.no_grad():
            lower_to_file(detector, (torch.zeros(1, 3, size, size), *detector.zero_state()), out_path, fmt,
                          input_names, output_names)
        seconds = time.perf_counter() - start
        sidecar = _describe(detector, cfg, fmt, out_path, class_names)
        parity = None
        if check:
            parity = check_parity(detector, out_path, frames.float(), box_tol, score_tol)
            sidecar["parity"] = {"frames": len(parity.box_diff), "max_abs_diff_boxes": parity.max_box,
                                 "max_abs_diff_scores": parity.max_score, "box_tol": box_tol, "score_tol": score_tol}
    finally:
        net.train(was_training)
    sidecar_path(out_path).write_text(json.dumps(sidecar, indent=2))
    return ExportResult(fmt, out_path, sidecar_path(out_path), input_names, output_names,
                        list(detector.state_specs), int(detector.anchors.shape[0]), parity, seconds, sidecar)
