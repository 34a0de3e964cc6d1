"""Optimiser and learning-rate schedule of LSTM-SSD training (reproduction notes section 4).

The paper trains with TF1 `tf.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1.0)`,
lr x0.95 every 200k steps, gradient clipping by global norm 10 and L2 4e-5. PyTorch's
`torch.optim.RMSprop` is a different algorithm at epsilon 1.0 (its mean square starts at 0 and
its epsilon sits outside the square root), hence `RMSpropTF`. Clipping by global norm is
`torch.nn.utils.clip_grad_norm_(params, 10.0)` (same formula as TF's clip_by_global_norm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

#: Defaults of the optimiser (reproduction notes section 4).
DEFAULT_DECAY = 0.9
DEFAULT_MOMENTUM = 0.9
DEFAULT_EPSILON = 1.0
DEFAULT_DECAY_STEPS = 200_000
DEFAULT_DECAY_FACTOR = 0.95


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop with TF1 semantics (ApplyRMSProp):

        g  = grad + weight_decay * w          (TF l2_regularizer(scale): d/dw scale*|w|^2/2)
        ms = decay * ms + (1 - decay) * g^2   (ms starts at ONE; `initial_mean_square`)
        mom = momentum * mom + lr * g / sqrt(ms + epsilon)   (epsilon inside the sqrt)
        w  = w - mom

    Put weight_decay only on the param group of conv weights to mirror TF's regularizers
    (biases and BatchNorm parameters carry none there). TF's ms of one makes the first updates about
    lr * g (a gradient of 1e-2 moves a weight by lr / 100) until decay^t has shrunk it: ~50 steps at decay
    0.9, nothing against 200k steps, a twelfth of the synthetic profile's 600-step stage 2; `initial_mean_square=0` (PyTorch's
    RMSprop) gives full-size updates from the first step.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float,
                 decay: float = DEFAULT_DECAY, momentum: float = DEFAULT_MOMENTUM,
                 epsilon: float = DEFAULT_EPSILON, weight_decay: float = 0.0,
                 initial_mean_square: float = 1.0) -> None:
        for name, value, low, high in (("lr", lr, 0.0, float("inf")), ("decay", decay, 0.0, 1.0),
                                       ("momentum", momentum, 0.0, 1.0), ("epsilon", epsilon, 0.0, float("inf")),
                                       ("weight_decay", weight_decay, 0.0, float("inf")),
                                       ("initial_mean_square", initial_mean_square, 0.0, float("inf"))):
            if not low <= value <= high:
                raise ValueError(f"optim.py RMSpropTF: {name} must be in [{low}, {high}], got {value}")
        defaults = dict(lr=lr, decay=decay, momentum=momentum, epsilon=epsilon, weight_decay=weight_decay,
                        initial_mean_square=initial_mean_square)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, mean_squares, moms = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("optim.py RMSpropTF: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["ms"] = torch.full_like(p, group.get("initial_mean_square", 1.0),
                                                  memory_format=torch.preserve_format)
                    state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                mean_squares.append(state["ms"])
                moms.append(state["mom"])
            if not params:
                continue
            if group["weight_decay"] != 0.0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(mean_squares, group["decay"])
            torch._foreach_addcmul_(mean_squares, grads, grads, value=1.0 - group["decay"])
            denominators = torch._foreach_add(mean_squares, group["epsilon"])
            torch._foreach_sqrt_(denominators)
            torch._foreach_mul_(moms, group["momentum"])
            torch._foreach_addcdiv_(moms, grads, denominators, value=group["lr"])
            torch._foreach_sub_(params, moms)
        return loss


@dataclass(frozen=True)
class StepDecay:
    """lr multiplier decay_factor ** (step // decay_steps) (TF exponential_decay; continuous when
    staircase is False). A picklable callable, so LambdaLR checkpoints and spawned workers keep it."""

    decay_steps: int = DEFAULT_DECAY_STEPS
    decay_factor: float = DEFAULT_DECAY_FACTOR
    staircase: bool = True

    def __post_init__(self) -> None:
        if self.decay_steps <= 0:
            raise ValueError(f"optim.py paper_lr_lambda: decay_steps must be positive, got {self.decay_steps}")

    def __call__(self, step: int) -> float:
        exponent = step // self.decay_steps if self.staircase else step / self.decay_steps
        return self.decay_factor ** exponent


@dataclass(frozen=True)
class CosineDecay:
    """lr multiplier 0.5 * (1 + cos(pi * step / total_steps)), 0 from total_steps on: a decay to nothing at the
    run's end (not in the paper, whose runs end on its x0.95 staircase; `train.lr_schedule=cosine`). Picklable."""

    total_steps: int

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"optim.py CosineDecay: total_steps must be positive, got {self.total_steps}")

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def paper_lr_lambda(decay_steps: int = DEFAULT_DECAY_STEPS, decay_factor: float = DEFAULT_DECAY_FACTOR,
                    staircase: bool = True) -> Callable[[int], float]:
    """Multiplier of the base lr for torch.optim.lr_scheduler.LambdaLR stepped once per optimiser
    step (Lightning: interval "step"): x0.95 every 200k steps by default."""
    return StepDecay(decay_steps, decay_factor, staircase)
