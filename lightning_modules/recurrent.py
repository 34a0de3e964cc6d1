"""Recurrent layers that refine a feature map across frames (paper Sec. 3.2-3.4, Table 3).

Every cell is functional: `cell(x, state) -> (output, new_state)`, with `state` a tuple of
tensors and `cell.zero_state(x)` the state of a new video. No state is kept on the module. A cell
names its state tensors (`state_names`, what an exported model's inputs are called) and the cost
component it is counted in (`cost_group`); `@register_cell(name)` on a builder makes it a value of
`model.recurrent.type`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

from lightning_modules.config import Activation, DepthwiseInput, RecurrentConfig, RecurrentType, add_recurrent_type

State = Tuple[Tensor, ...]

#: Gate pre-activation of an identity-initialised cell: sigmoid(3) = 0.95 (open), sigmoid(-3) = 0.05
#: (closed). Not saturated, so the gates still get gradient to learn what to remember.
IDENTITY_GATE = 3.0


def _activation(kind: Activation) -> Callable[[Tensor], Tensor]:
    """phi of the LSTM equations (paper Sec. 3.4 chooses ReLU)."""
    return {Activation.relu: torch.relu, Activation.relu6: nn.functional.relu6, Activation.tanh: torch.tanh}[kind]


def _depthwise(channels: int) -> nn.Conv2d:
    """3x3 depthwise, stride 1, no bias."""
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


def _pointwise(cin: int, cout: int) -> nn.Conv2d:
    """1x1 projection with bias."""
    return nn.Conv2d(cin, cout, 1, bias=True)


@torch.no_grad()
def _pass_through(conv: nn.Conv2d) -> None:
    """A 3x3 depthwise conv that copies its input: centre tap 1, the rest 0."""
    conv.weight.zero_()
    conv.weight[:, :, 1, 1] = 1.0


@torch.no_grad()
def _project(conv: nn.Conv2d, rows: slice, m: int, bias: float = 0.0) -> None:
    """Output channels `rows` of a 1x1 conv read the first m input channels: the identity when the
    widths agree, else each output channel the mean of an equal group of inputs; bias set."""
    weight = conv.weight[rows, :, 0, 0]
    weight.zero_()
    n = weight.shape[0]
    for k in range(n):
        lo, hi = k * m // n, max(k * m // n + 1, (k + 1) * m // n)
        weight[k, lo:hi] = 1.0 / (hi - lo)
    conv.bias[rows] = bias


@torch.no_grad()
def _gate(conv: nn.Conv2d, rows: slice, bias: float) -> None:
    """Output channels `rows` of a 1x1 conv become a constant gate: weights 0, bias `bias`."""
    conv.weight[rows].zero_()
    conv.bias[rows] = bias


class RecurrentCell(nn.Module):
    """Common interface: input width M, output width N, a tuple state."""

    in_channels: int
    out_channels: int
    state_names: Tuple[str, ...] = ()  # one name per state tensor, in the tuple's order
    cost_group: str = "lstm"  # counted as the cost component `<cost_group>:<placement>`

    def zero_state(self, x: Tensor) -> State:
        raise NotImplementedError

    def init_identity(self) -> None:
        """Start as a pass-through (model.recurrent.init=identity): on any frame the output is the
        input (phi(x) = x for conv13's ReLU6 features), with the gates open, so a stage 2 begins from
        the single-frame network's function and learns what to carry over from there."""
        raise NotImplementedError

    def init_memory(self, keep: float) -> None:
        """After init_identity (model.recurrent.init=leaky, the synthetic profile's): set the memory gates' biases
        so that each frame keeps `keep` of the state and takes 1 - keep of the new value, an exponential average
        of the identity's output. Optional: a cell without memory gates to set keeps its identity start."""


class BottleneckLSTM(RecurrentCell):
    """Bottleneck-LSTM (paper Eq. 2, Fig. 3; the released cell).

    b = phi(1x1_{M+N->N}(dw3x3([x, h]))); gates = 1x1_{N->4N}(dw3x3(b)) split i, j, f, o;
    c' = c * sigmoid(f + forget_bias) + sigmoid(i) * phi(j); h' = phi(c') * sigmoid(o).
    """

    state_names = ("c", "h")

    def __init__(self, m: int, n: int, activation: Activation, forget_bias: float, depthwise_input: DepthwiseInput):
        super().__init__()
        self.in_channels, self.out_channels = m, n
        self.phi = _activation(activation)
        self.forget_bias = forget_bias
        self.depthwise_input = depthwise_input
        dw_channels = m + n if depthwise_input == DepthwiseInput.x_h else m
        self.bottleneck_dw = _depthwise(dw_channels)  # 3x3 (M+N) dw (paper Table 1: over x only)
        self.bottleneck_pw = _pointwise(m + n, n)  # 1x1 (M+N) x N
        self.gates_dw = _depthwise(n)  # 3x3 N dw
        self.gates_pw = _pointwise(n, 4 * n)  # 1x1 N x 4N: all four gates in one conv

    def zero_state(self, x: Tensor) -> State:
        shape = (x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        return x.new_zeros(shape), x.new_zeros(shape)

    def forward(self, x: Tensor, state: State) -> Tuple[Tensor, State]:
        c, h = state
        if self.depthwise_input == DepthwiseInput.x_h:
            mixed = self.bottleneck_dw(torch.cat([x, h], dim=1))
        else:
            mixed = torch.cat([self.bottleneck_dw(x), h], dim=1)
        b = self.phi(self.bottleneck_pw(mixed))
        i, j, f, o = self.gates_pw(self.gates_dw(b)).chunk(4, dim=1)
        c = c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * self.phi(j)
        h = self.phi(c) * torch.sigmoid(o)
        return h, (c, h)

    def init_identity(self) -> None:
        """b = x (group means of x when N < M), j = b, i and o open, f closed."""
        m, n = self.in_channels, self.out_channels
        _pass_through(self.bottleneck_dw)
        _project(self.bottleneck_pw, slice(0, n), m)
        _pass_through(self.gates_dw)
        _gates_identity(self.gates_pw, n, self.forget_bias)

    def init_memory(self, keep: float) -> None:
        _lstm_memory(self.gates_pw, self.out_channels, self.forget_bias, keep)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@torch.no_grad()
def _lstm_memory(conv: nn.Conv2d, n: int, forget_bias: float, keep: float) -> None:
    """LSTM gates of `_gates_identity`, with input gate 1 - keep and forget gate keep (after forget_bias)."""
    _gate(conv, slice(0, n), _logit(1.0 - keep))
    _gate(conv, slice(2 * n, 3 * n), _logit(keep) - forget_bias)


def _gates_identity(conv: nn.Conv2d, n: int, forget_bias: float) -> None:
    """LSTM gates i, j, f, o of one 1x1 conv over an input whose first n channels are the new value:
    j copies them, i and o open, f closed (c' ~ phi(x), h' ~ phi(c'))."""
    _gate(conv, slice(0, n), IDENTITY_GATE)
    _project(conv, slice(n, 2 * n), n)
    _gate(conv, slice(2 * n, 3 * n), -IDENTITY_GATE - forget_bias)
    _gate(conv, slice(3 * n, 4 * n), IDENTITY_GATE)


class ConvLSTM(RecurrentCell):
    """Standard convolutional LSTM (paper Eq. 3): one separable conv [x, h] -> 4N, N = M."""

    state_names = ("c", "h")

    def __init__(self, m: int, activation: Activation, forget_bias: float):
        super().__init__()
        self.in_channels = self.out_channels = m
        self.phi = _activation(activation)
        self.forget_bias = forget_bias
        self.dw = _depthwise(2 * m)  # 3x3 (M+N) dw
        self.pw = _pointwise(2 * m, 4 * m)  # 1x1 (M+N) x 4N

    def zero_state(self, x: Tensor) -> State:
        return x.new_zeros(x.shape), x.new_zeros(x.shape)

    def forward(self, x: Tensor, state: State) -> Tuple[Tensor, State]:
        c, h = state
        i, j, f, o = self.pw(self.dw(torch.cat([x, h], dim=1))).chunk(4, dim=1)
        c = c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * self.phi(j)
        h = self.phi(c) * torch.sigmoid(o)
        return h, (c, h)

    def init_identity(self) -> None:
        _pass_through(self.dw)
        _gates_identity(self.pw, self.out_channels, self.forget_bias)

    def init_memory(self, keep: float) -> None:
        _lstm_memory(self.pw, self.out_channels, self.forget_bias, keep)


class ConvGRU(RecurrentCell):
    """Convolutional GRU (paper Table 3): separable [x, h] -> (z, r); separable [x, r*h] -> candidate."""

    state_names = ("h",)

    def __init__(self, m: int, activation: Activation):
        super().__init__()
        self.in_channels = self.out_channels = m
        self.phi = _activation(activation)
        self.gates_dw = _depthwise(2 * m)
        self.gates_pw = _pointwise(2 * m, 2 * m)  # z, r
        self.candidate_dw = _depthwise(2 * m)
        self.candidate_pw = _pointwise(2 * m, m)

    def zero_state(self, x: Tensor) -> State:
        return (x.new_zeros(x.shape),)

    def forward(self, x: Tensor, state: State) -> Tuple[Tensor, State]:
        (h,) = state
        z, r = torch.sigmoid(self.gates_pw(self.gates_dw(torch.cat([x, h], dim=1)))).chunk(2, dim=1)
        candidate = self.phi(self.candidate_pw(self.candidate_dw(torch.cat([x, r * h], dim=1))))
        h = (1 - z) * h + z * candidate
        return h, (h,)

    def init_identity(self) -> None:
        """z open (take the candidate), r open, candidate = phi(x)."""
        m = self.out_channels
        _pass_through(self.gates_dw)
        _gate(self.gates_pw, slice(0, 2 * m), IDENTITY_GATE)
        _pass_through(self.candidate_dw)
        _project(self.candidate_pw, slice(0, m), m)

    def init_memory(self, keep: float) -> None:
        """z (the share of the candidate) 1 - keep; r stays open."""
        _gate(self.gates_pw, slice(0, self.out_channels), _logit(1.0 - keep))


class Averaging(RecurrentCell):
    """Weighted feature averaging baseline (paper Sec. 4.2): w * x_t + (1 - w) * x_{t-1}.

    State = (x_{t-1}, has_previous[B,1,1,1]); on a video's first frame the output is x_t itself.
    """

    state_names = ("previous", "has_previous")

    def __init__(self, m: int, weight: float):
        super().__init__()
        self.in_channels = self.out_channels = m
        self.weight = weight

    def zero_state(self, x: Tensor) -> State:
        return x.new_zeros(x.shape), x.new_zeros((x.shape[0], 1, 1, 1))

    def forward(self, x: Tensor, state: State) -> Tuple[Tensor, State]:
        previous, has_previous = state
        averaged = self.weight * x + (1 - self.weight) * previous
        out = has_previous * averaged + (1 - has_previous) * x
        return out, (x, torch.ones_like(has_previous))

    def init_identity(self) -> None:
        """Nothing to learn: averaging is what it is."""

    def init_memory(self, keep: float) -> None:
        """Its weight is model.recurrent.averaging_weight already."""


CellBuilder = Callable[[int, int, RecurrentConfig], RecurrentCell]
#: model.recurrent.type -> builder (input width M, output width N, the recurrent config) -> cell
CELLS: Dict[str, CellBuilder] = {}


def register_cell(name: str) -> Callable[[CellBuilder], CellBuilder]:
    """Make `name` a value of model.recurrent.type, built by the decorated `(m, n, cfg) -> cell`."""
    def decorate(builder: CellBuilder) -> CellBuilder:
        add_recurrent_type(name)
        CELLS[name] = builder
        return builder
    return decorate


@register_cell("bottleneck_lstm")
def bottleneck_lstm(m: int, n: int, cfg: RecurrentConfig) -> RecurrentCell:
    return BottleneckLSTM(m, n, cfg.activation, cfg.forget_bias, cfg.depthwise_input)


@register_cell("lstm")
def conv_lstm(m: int, n: int, cfg: RecurrentConfig) -> RecurrentCell:
    return ConvLSTM(m, cfg.activation, cfg.forget_bias)


@register_cell("gru")
def conv_gru(m: int, n: int, cfg: RecurrentConfig) -> RecurrentCell:
    return ConvGRU(m, cfg.activation)


@register_cell("averaging")
def averaging(m: int, n: int, cfg: RecurrentConfig) -> RecurrentCell:
    return Averaging(m, cfg.averaging_weight)


def build_cell(kind: RecurrentType, m: int, n: int, cfg: RecurrentConfig) -> RecurrentCell:
    """The one way to make a recurrent layer; `n` only matters for the Bottleneck-LSTM."""
    if kind.value not in CELLS:
        raise ValueError(f"model.recurrent.type: no layer for {kind.value}; valid: {', '.join(CELLS)}")
    return CELLS[kind.value](m, n, cfg)
