"""Export formats register themselves: how to lower a one-frame module to a file, and how to run that file.

A format is one lowering function decorated with `@register_format(name, suffix=..., runtime=...,
label=..., load=...)`; `tafm export --format`, `tafm latency` and Table 7 then know it. This module
imports no torch (the command line lists the formats before any heavy import).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Runner = Callable[[Sequence[Any]], List[Any]]  # list of input tensors -> list of output tensors
Lower = Callable[[Any, Tuple[Any, ...], Path, Sequence[str], Sequence[str]], None]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # the model file's suffix, e.g. ".onnx"
    runtime: str  # the Python module that runs it (what "installed" means)
    label: str  # the runtime as tables name it
    lower: Lower  # (module, example inputs, path, input names, output names) -> writes path
    load: Callable[[Path, Optional[int]], Runner]  # (path, threads) -> a runner
    set_threads: Optional[Callable[[int], int]] = None  # sizes a global threadpool; returns the previous size


#: name -> format, in registration order (the first is the default)
EXPORT_FORMATS: Dict[str, ExportFormat] = {}
#: name -> model file suffix (a live view of EXPORT_FORMATS)
SUFFIX: Dict[str, str] = {}


def register_format(name: str, *, suffix: str, runtime: str, label: str, load: Callable[[Path, Optional[int]], Runner],
                    set_threads: Optional[Callable[[int], int]] = None) -> Callable[[Lower], Lower]:
    """Register the decorated lowering function as export format `name`."""
    def decorate(lower: Lower) -> Lower:
        EXPORT_FORMATS[name] = ExportFormat(name, suffix, runtime, label, lower, load, set_threads)
        SUFFIX[name] = suffix
        return lower
    return decorate


def export_format(name: str) -> ExportFormat:
    if name not in EXPORT_FORMATS:
        raise ValueError(f"export format {name!r} is not supported; valid: {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]


def installed(name: str) -> bool:
    """Whether the format's runtime can be imported here (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(export_format(name).runtime) is not None
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------- ExecuTorch (XNNPACK), the mobile runtime

def set_executorch_threads(threads: int) -> int:
    """Recreate ExecuTorch's global threadpool (XNNPACK runs on it) with `threads` threads, which inherit the
    calling thread's affinity; returns the previous size."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    previous = int(_threadpool_get_thread_count())
    _unsafe_reset_threadpool(threads)
    return previous


def _load_executorch(path: Path, threads: Optional[int] = None) -> Runner:
    """ExecuTorch runs on its global threadpool as set (set_executorch_threads)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run_executorch(inputs: Sequence[Any]) -> List[Any]:
        return [o.clone() for o in method.execute(list(inputs))]  # outputs may live in the method's planned memory
    return run_executorch


@register_format("executorch", suffix=".pte", runtime="executorch.runtime", label="ExecuTorch (XNNPACK)",
                 load=_load_executorch, set_threads=set_executorch_threads)
def lower_executorch(module: Any, example_inputs: Tuple[Any, ...], path: Path, input_names: Sequence[str],
                     output_names: Sequence[str]) -> None:
    """torch.export -> XNNPACK-lowered .pte (names are not stored)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from lightning_modules.deploy.export import one_frame_for_xnnpack

    exported = torch.export.export(module, example_inputs)
    one_frame_for_xnnpack(exported)
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    path.write_bytes(program.to_executorch().buffer)


# ---------------------------------------------------------------- ONNX (onnxruntime)

def _load_onnx(path: Path, threads: Optional[int] = None) -> Runner:
    """onnxruntime: `threads` intra-op threads (None: its default), inter-op 1, sequential."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run_onnx(inputs: Sequence[Any]) -> List[Any]:
        outputs = session.run(None, {n: t.detach().numpy() for n, t in zip(names, inputs)})
        return [torch.from_numpy(o) for o in outputs]
    return run_onnx


@register_format("onnx", suffix=".onnx", runtime="onnxruntime", label="onnxruntime (MLAS)", load=_load_onnx)
def lower_onnx(module: Any, example_inputs: Tuple[Any, ...], path: Path, input_names: Sequence[str],
               output_names: Sequence[str]) -> None:
    """torch.onnx dynamo exporter, one file (no external data)."""
    import torch

    torch.onnx.export(module, example_inputs, str(path), input_names=list(input_names),
                      output_names=list(output_names), dynamo=True, external_data=False, verbose=False)
