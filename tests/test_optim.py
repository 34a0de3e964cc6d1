"""RMSprop with TF1 semantics and the paper's lr schedule (reproduction notes section 4)."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from lightning_modules.optim import CosineDecay, RMSpropTF, paper_lr_lambda


def _tf_rmsprop_two_steps(w: float, grads: list[float], lr: float, weight_decay: float = 0.0,
                          ms: float = 1.0, epsilon: float = 1.0) -> float:
    """Hand computation of TF1 ApplyRMSProp (ms starts at 1 and epsilon 1 inside the sqrt unless given)."""
    mom = 0.0
    for g in grads:
        g = g + weight_decay * w
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + lr * g / math.sqrt(ms + epsilon)
        w = w - mom
    return w


def _run(optimizer_cls, w0: float, slope: float, steps: int, **kwargs) -> float:
    """Minimise slope * w (constant gradient `slope`) for a few steps."""
    w = torch.nn.Parameter(torch.tensor(w0))
    optimizer = optimizer_cls([w], **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        (slope * w).backward()
        optimizer.step()
    return w.item()


def test_two_steps_match_tf_hand_computation() -> None:
    got = _run(RMSpropTF, 1.0, 0.5, 2, lr=0.1)
    assert got == pytest.approx(_tf_rmsprop_two_steps(1.0, [0.5, 0.5], 0.1), rel=1e-6)
    # First step by hand: ms = 0.9 + 0.1 * 0.25 = 0.925; w = 1 - 0.1 * 0.5 / sqrt(1.925).
    assert _run(RMSpropTF, 1.0, 0.5, 1, lr=0.1) == pytest.approx(1 - 0.05 / math.sqrt(1.925), rel=1e-6)
    torch_rmsprop = _run(torch.optim.RMSprop, 1.0, 0.5, 2, lr=0.1, alpha=0.9, eps=1.0, momentum=0.9)
    assert abs(torch_rmsprop - got) > 1e-3  # PyTorch's RMSprop is a different update


def test_initial_mean_square_sets_the_first_steps_size() -> None:
    """TF's ms of one keeps the first updates at about lr * g; 0 (PyTorch's start) makes them lr-sized."""
    got = _run(RMSpropTF, 1.0, 0.01, 2, lr=0.1, epsilon=1e-4, initial_mean_square=0.0)
    assert got == pytest.approx(_tf_rmsprop_two_steps(1.0, [0.01, 0.01], 0.1, ms=0.0, epsilon=1e-4), rel=1e-6)
    tf_start = _run(RMSpropTF, 1.0, 0.01, 1, lr=0.1, epsilon=1e-4)
    zero_start = _run(RMSpropTF, 1.0, 0.01, 1, lr=0.1, epsilon=1e-4, initial_mean_square=0.0)
    assert 1.0 - tf_start == pytest.approx(0.1 * 0.01 / math.sqrt(0.9 + 1e-5 + 1e-4), rel=1e-4)  # ~lr / 100
    assert 1.0 - zero_start == pytest.approx(0.1 * 0.01 / math.sqrt(1e-5 + 1e-4), rel=1e-4)  # ~lr
    with pytest.raises(ValueError, match="initial_mean_square"):
        RMSpropTF([torch.nn.Parameter(torch.zeros(1))], lr=0.1, initial_mean_square=-1.0)


def test_weight_decay_is_l2_on_the_gradient() -> None:
    got = _run(RMSpropTF, 2.0, -0.3, 2, lr=0.05, weight_decay=0.1)
    assert got == pytest.approx(_tf_rmsprop_two_steps(2.0, [-0.3, -0.3], 0.05, weight_decay=0.1), rel=1e-6)
    assert got != pytest.approx(_run(RMSpropTF, 2.0, -0.3, 2, lr=0.05), rel=1e-6)


def test_param_groups_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = RMSpropTF([{"params": [model.weight], "weight_decay": 4e-5}, {"params": [model.bias], "lr": 0.01}],
                          lr=0.003)
    assert [g["lr"] for g in optimizer.param_groups] == [0.003, 0.01]
    x = torch.randn(4, 3)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()

    step(model, optimizer)
    clone = copy.deepcopy(model)
    restored = RMSpropTF([{"params": [clone.weight], "weight_decay": 4e-5}, {"params": [clone.bias], "lr": 0.01}],
                         lr=0.003)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as a checkpoint would
    assert torch.equal(restored.state[clone.weight]["ms"], optimizer.state[model.weight]["ms"])
    step(model, optimizer)
    step(clone, restored)
    torch.testing.assert_close(clone.weight, model.weight, rtol=0, atol=0)
    torch.testing.assert_close(clone.bias, model.bias, rtol=0, atol=0)


def test_rejects_invalid_hyperparameters() -> None:
    with pytest.raises(ValueError, match="decay"):
        RMSpropTF([torch.nn.Parameter(torch.zeros(1))], lr=0.1, decay=1.5)


def test_paper_lr_schedule_staircase() -> None:
    lam = paper_lr_lambda()
    assert lam(0) == 1.0
    assert lam(199_999) == 1.0
    assert lam(200_000) == pytest.approx(0.95)
    assert lam(400_000) == pytest.approx(0.95**2)
    assert paper_lr_lambda(staircase=False)(100_000) == pytest.approx(0.95**0.5)
    # Works with LambdaLR and survives pickling (Lightning checkpoints, spawned workers).
    optimizer = RMSpropTF([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pickle.loads(pickle.dumps(paper_lr_lambda(2, 0.5))))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.003, 0.003, 0.0015, 0.0015, 0.00075])


def test_cosine_decay_falls_from_one_to_zero_and_pickles():
    decay = pickle.loads(pickle.dumps(CosineDecay(100)))
    assert decay(0) == 1.0 and decay(50) == pytest.approx(0.5) and decay(100) == pytest.approx(0.0)
    assert decay(150) == pytest.approx(0.0)  # past the run's end: no restart
    values = [decay(step) for step in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="total_steps must be positive"):
        CosineDecay(0)
