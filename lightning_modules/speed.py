"""How a stage trains faster on the same maths (float rounding aside): `train.threads`, `train.reuse_memory`,
`train.fold_bn`, `train.channels_last`, `train.compile`. `fit` applies them; so does the plain loop of
benchmarks/bench_training.py, which measures each of them (README, "Training speed").

- threads: torch's intra-op threads while a stage trains or evaluates. At this project's sizes an op
  lasts microseconds, and with more threads each op ends at a barrier that waits for every thread: on a
  machine where anything else runs, one descheduled thread stalls every op.
- reuse_memory (on by default; the same numbers, bit for bit): glibc's malloc serves an allocation over its
  mmap threshold (128 KiB at start, raised to the size of each such block freed) with a fresh mmap, and
  returns freed memory at the heap's top to the system beyond a trim threshold; PyTorch's CPU tensors come
  straight from malloc. A training step allocates and frees activations of 1-25 MB in many sizes, so the
  threshold and the trimming kept giving pages back and faulting them in again (zero-filled by the kernel)
  on the next step: a stage-2 step of the main job's control faulted ~19,000 times and spent 35-40 ms in the
  kernel (of ~150 ms), stage 1's ~4,400 times and ~7 ms; with the memory kept, none.
  `reuse_freed_memory` fixes the threshold at glibc's largest (32 MiB) and stops trimming, for the rest of the
  process (a process's heap then stays at its peak, which the next step needs again).
- fold_bn: a conv + eval-mode BatchNorm (+ ReLU6) block through which no gradient flows (the frozen base
  of stage 2, every block during validation) runs as one convolution with the BatchNorm folded into its
  weights and bias, in NHWC, on CPU with the ReLU6 fused in (oneDNN). oneDNN's depthwise and few-channel
  1x1 convolutions are several times faster in NHWC than in NCHW. A block that trains runs as before, in
  the layout of its weights. Modules and state_dict keys are unchanged.
- channels_last (on by default): the whole network in NHWC, where oneDNN's depthwise and few-channel 1x1
  convolutions run several times faster: stage 1 on one thread ~1.2-1.3x faster (two threads and stage 2:
  no change). PyTorch's CPU NHWC BatchNorm sums each channel's statistics in one float over N*H*W rows
  (~1e-5 off, against NCHW's 4e-8), so training BatchNorms become ExactNHWCBatchNorm2d: NCHW's accuracy, and
  in float64 the same loss and gradients as NCHW to 1e-10.
- compile (off by default): `torch.compile` of the network, kernels cached under the tafm cache; its
  first compilation per model costs more than it saves in the main job (README).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections import OrderedDict
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Where torch.compile keeps its kernels between runs (unless TORCHINDUCTOR_CACHE_DIR is set).
COMPILE_CACHE = "inductor"

# glibc mallopt(3) parameters, and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_NEVER = 2 ** 31 - 1  # mallopt takes an int: 2 GiB of free heap top before any is given back
_memory_reused = False


@contextlib.contextmanager
def cpu_threads(train) -> Iterator[int]:
    """torch's intra-op threads = train.threads inside the block (0: leave torch's default); restored after."""
    previous = torch.get_num_threads()
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def reuse_freed_memory(train) -> bool:
    """With `train.reuse_memory`, have glibc keep freed memory for the next allocation instead of mapping fresh
    pages for each large one (module docstring); once per process, for the rest of it. Returns whether it is in
    effect (False on a C library other than glibc, e.g. macOS, where nothing is changed)."""
    global _memory_reused
    if not train.reuse_memory or _memory_reused:
        return _memory_reused
    if not sys.platform.startswith("linux"):
        return False
    try:  # the C library this process already runs on; finding it by name would run ldconfig
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt: its own allocator
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses: then the setting is reported as not in effect
    threshold = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    _memory_reused = bool(threshold) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _memory_reused


def _fusable_activation(module: Optional[nn.Module]) -> Optional[Tuple[str, List[float]]]:
    """oneDNN's post-op name and scalars for an activation it can fuse into a convolution, else None."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return "hardtanh", [float(module.min_val), float(module.max_val)]
    if isinstance(module, nn.ReLU):
        return "relu", []
    return None


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Weight and bias of conv followed by an eval-mode bn: w * g / sqrt(v + eps), beta + (b - mean) * g / sqrt(v + eps)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(scale)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift + (bias - bn.running_mean) * scale


def _fused_conv(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Tensor, activation: Optional[nn.Module]) -> Tuple[Tensor, bool]:
    """conv(x) with the folded weights, and whether `activation` was applied too (oneDNN post-op on CPU)."""
    post = _fusable_activation(activation)
    if (post is not None and x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu") and isinstance(conv.padding, tuple)):
        out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                      list(conv.dilation), conv.groups, post[0], post[1], "")
        return out, True
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups), False


class FoldingSequential(nn.Sequential):
    """An nn.Sequential of conv / BatchNorm / activation layers (same children, same state_dict) that runs each
    conv + eval-mode BatchNorm pair as one folded convolution, in NHWC, whenever no gradient flows through the
    block; otherwise exactly as nn.Sequential, in the layout of its weights (a BatchNorm that trains keeps the
    NCHW statistics of a network not converted to channels_last)."""

    #: layout of the activations when the block trains (channels_last when the whole network is converted)
    train_layout: torch.memory_format = torch.contiguous_format

    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: Tensor) -> Tensor:
        if self._needs_grad(x):
            return super().forward(x.contiguous(memory_format=self.train_layout))
        with torch.no_grad():
            return self._folded_forward(x.contiguous(memory_format=torch.channels_last))

    def _folded_forward(self, x: Tensor) -> Tensor:
        layers = list(self)
        index = 0
        while index < len(layers):
            layer = layers[index]
            after = layers[index + 1] if index + 1 < len(layers) else None
            if isinstance(layer, nn.Conv2d) and isinstance(after, nn.BatchNorm2d) and not after.training \
                    and after.track_running_stats and layer.padding_mode == "zeros":
                weight, bias = _folded(layer, after)
                activation = layers[index + 2] if index + 2 < len(layers) else None
                x, fused = _fused_conv(x, layer, weight.contiguous(memory_format=torch.channels_last), bias,
                                       activation)
                index += 3 if fused else 2
            else:
                x = layer(x)
                index += 1
        return x


def _foldable(module: nn.Module) -> bool:
    layers = list(module)
    return any(isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) for a, b in zip(layers, layers[1:]))


def fold_batchnorms(net: nn.Module, channels_last: bool = False) -> int:
    """Make every nn.Sequential of `net` with a conv + BatchNorm pair a FoldingSequential (in place, same
    children and state_dict keys) that trains in NHWC when `channels_last`; returns how many."""
    count = 0
    for name, module in list(net.named_modules()):
        if type(module) is nn.Sequential and _foldable(module):
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            folding = FoldingSequential(OrderedDict(module.named_children()))
            folding.train_layout = torch.channels_last if channels_last else torch.contiguous_format
            setattr(parent, child, folding)
            count += 1
    return count


class _ExactNHWCBatchNorm(torch.autograd.Function):
    """Training BatchNorm of an NHWC tensor with the statistics NCHW's kernel computes: PyTorch's CPU NHWC kernel
    sums each channel in one float running over N*H*W rows (relative error ~1e-5 at 147k rows, against 4e-8 in
    NCHW), which moved the main job's first logits by up to 0.6. Here the mean and the centred second moment
    are cascade sums over the rows (torch.sum), then the eval kernel normalises in one NHWC pass."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: x is channels_last
        mean = rows.sum(0) / rows.shape[0]
        var = (rows - mean).square_().sum(0) / rows.shape[0]
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: Tensor, _mean: Tensor, _var: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # its kernel's own plain sums enter only as small corrections
            grad_input = torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True,
                                                                   ctx.eps, [True, False, False])[0]
        if weight is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            grad_bias = grad_rows.sum(0)
            grad_weight = (rows - mean).mul_(grad_rows).sum(0) * invstd
        return grad_input, grad_weight, grad_bias, None


class ExactNHWCBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state_dict) whose training statistics on an NHWC input are
    summed as exactly as on an NCHW one (_ExactNHWCBatchNorm); anything else runs nn.BatchNorm2d's own kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        out, mean, var = _ExactNHWCBatchNorm.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)
        return out


def exact_nhwc_batchnorms(net: nn.Module) -> int:
    """Make every nn.BatchNorm2d of `net` an ExactNHWCBatchNorm2d in place (same object, parameters and state);
    returns how many."""
    count = 0
    for module in net.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = ExactNHWCBatchNorm2d
            count += 1
    return count


def compile_network(net: nn.Module) -> None:
    """torch.compile the network in place (state_dict keys unchanged), its kernels cached across runs."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    from datamodules.synthetic import default_cache_dir

    # torch writes its /tmp default into the variable the first time anything asks; only a user's own value stays
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", torch_default()) == torch_default():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_cache_dir() / COMPILE_CACHE)
    net.compile()


def prepare_module(module, train) -> List[str]:
    """Apply `train`'s speed settings to a LSTMSSDModule's network (and distillation teacher) in place;
    returns what was applied, for the log."""
    applied = []
    nets = [module.net] + ([module.teacher.net] if getattr(module, "teacher", None) is not None
                           and hasattr(module.teacher, "net") else [])
    if train.fold_bn:
        folded = sum(fold_batchnorms(net, train.channels_last) for net in nets)
        applied.append(f"fold_bn ({folded} blocks)")
    if train.channels_last:
        for net in nets:
            net.to(memory_format=torch.channels_last)
            exact_nhwc_batchnorms(net)
        applied.append("channels_last")
    if train.compile:
        compile_network(module.net)
        applied.append("compile")
    return applied
