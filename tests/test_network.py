"""The LSTM-SSD network: shapes, functional recurrence, gradients through the unroll."""
from __future__ import annotations

import pytest
import torch

from ablations.config import load_config
from lightning_modules.config import PLACEMENTS, RecurrentType
from lightning_modules.network import create_model, feature_map_sizes


def _net(*overrides: str):
    return create_model(load_config(list(overrides)).model).eval()


@pytest.mark.parametrize("alpha,size,anchors", [(1.0, 320, 534), (0.5, 256, 324)])
@pytest.mark.parametrize("kind", [t.value for t in RecurrentType])
def test_shapes_every_type(alpha, size, anchors, kind):
    net = _net(f"model.alpha={alpha}", f"model.input_size={size}", f"model.recurrent.type={kind}")
    boxes, logits, state = net(torch.zeros(2, 1, 3, size, size))
    assert boxes.shape == (2, 1, anchors, 4)
    assert logits.shape == (2, 1, anchors, 31)
    assert len(state) == (0 if kind == "none" else 1)


@pytest.mark.parametrize("alpha,size,anchors", [(1.0, 320, 534), (0.5, 256, 324)])
@pytest.mark.parametrize("after", [[p] for p in PLACEMENTS] + [["conv13", "conv13"], ["conv13", "fm1", "fm2", "fm3", "fm4"]])
def test_shapes_every_placement(alpha, size, anchors, after):
    placement = "[" + ",".join(after) + "]"
    net = _net(f"model.alpha={alpha}", f"model.input_size={size}", f"model.recurrent.after={placement}")
    boxes, logits, state = net(torch.zeros(1, 2, 3, size, size))
    assert boxes.shape == (1, 2, anchors, 4) and logits.shape == (1, 2, anchors, 31)
    expected_layers = len(after) - after.count("outputs") + 5 * after.count("outputs")
    assert len(state) == expected_layers == net.num_recurrent_layers


def test_feature_map_sizes():
    assert feature_map_sizes(320) == [10, 5, 3, 2, 1]
    assert feature_map_sizes(256) == [8, 4, 2, 1, 1]


SMALL = ("model.alpha=0.25", "model.input_size=64")


@pytest.mark.parametrize("kind", ["bottleneck_lstm", "lstm", "gru", "averaging"])
def test_state_is_carried(kind):
    torch.manual_seed(0)
    net = _net(*SMALL, f"model.recurrent.type={kind}")
    clip = torch.randn(3, 1, 3, 64, 64)
    changed = clip.clone()
    changed[0] += 1.0  # change frame t-1 only
    _, logits_a, _ = net(clip)
    _, logits_b, _ = net(changed)
    assert not torch.allclose(logits_a[1], logits_b[1]), "frame t must depend on frame t-1 through the state"


def test_single_frame_model_has_no_memory():
    net = _net(*SMALL, "model.recurrent.type=none")
    clip = torch.randn(3, 1, 3, 64, 64)
    changed = clip.clone()
    changed[0] += 1.0
    assert torch.allclose(net(clip)[1][1], net(changed)[1][1])


@pytest.mark.parametrize("kind", ["bottleneck_lstm", "gru", "averaging"])
def test_zero_state_reproduces_fresh_run(kind):
    torch.manual_seed(0)
    net = _net(*SMALL, f"model.recurrent.type={kind}")
    first, second = torch.randn(4, 2, 3, 64, 64), torch.randn(4, 2, 3, 64, 64)
    _, fresh, _ = net(second)
    _, _, state = net(first)
    _, continued, _ = net(second, state)
    assert not torch.allclose(fresh, continued)
    _, restarted, _ = net(second, net.zero_state(2))
    assert torch.allclose(fresh, restarted, atol=1e-6)
    reset = torch.zeros(4, 2, dtype=torch.bool)
    reset[0] = True  # a new video starts at frame 0 for both streams
    _, with_reset, _ = net(second, state, reset)
    assert torch.allclose(fresh, with_reset, atol=1e-6)


def test_reset_is_per_stream():
    torch.manual_seed(0)
    net = _net(*SMALL)
    clip = torch.randn(2, 2, 3, 64, 64)
    _, _, state = net(torch.randn(2, 2, 3, 64, 64))
    reset = torch.tensor([[True, False], [False, False]])
    _, out, _ = net(clip, state, reset)
    _, fresh, _ = net(clip)
    _, carried, _ = net(clip, state)
    assert torch.allclose(out[:, 0], fresh[:, 0], atol=1e-6)
    assert torch.allclose(out[:, 1], carried[:, 1], atol=1e-6)


def test_clip_forward_equals_frame_by_frame_steps():
    torch.manual_seed(0)
    net = _net(*SMALL, "model.recurrent.after=[conv13,fm1]")
    clip = torch.randn(5, 2, 3, 64, 64)
    boxes, logits, _ = net(clip)
    state = None
    for t in range(5):
        b, l, state = net.step(clip[t], state)
        assert torch.allclose(b, boxes[t], atol=1e-5) and torch.allclose(l, logits[t], atol=1e-5)


@pytest.mark.parametrize("kind", ["bottleneck_lstm", "lstm", "gru"])
def test_gradients_reach_recurrent_layers_through_10_frame_unroll(kind):
    torch.manual_seed(0)
    net = _net(*SMALL, f"model.recurrent.type={kind}").train()
    clip = torch.randn(10, 1, 3, 64, 64, requires_grad=True)
    _, logits, _ = net(clip)
    logits[-1].sum().backward()  # loss on the LAST frame only
    cell_grads = [p.grad for p in net.cells.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in cell_grads)
    assert clip.grad[0].abs().sum() > 0, "the first frame must influence the last frame's loss (full BPTT)"


def test_widths_follow_the_extended_width_multiplier():
    net = _net()  # alpha=1: Bottleneck-LSTM 1024 -> 256, FM1 256 -> 128 -> 256 (paper Table 1)
    cell = net.cells["conv13_0"]
    assert (cell.in_channels, cell.out_channels) == (1024, 256)
    assert net.fm["fm1"][0].in_channels == 256 and net.fm["fm1"][0].out_channels == 128
    assert net.fm["fm4"][-3].out_channels == 64
    assert "conv14" not in net.base  # the paper prunes MobileNet's final layer
    full = _net("model.arch=mobilenet_ssd", "model.recurrent.type=none")
    assert "conv14" in full.base


def test_class_prior_sets_the_first_outputs_and_is_validated():
    """model.class_prior p: every anchor starts at background ~1 - p and each class ~p; without it the
    class heads start like every other convolution (outputs far from p)."""
    overrides = ["model.alpha=0.25", "model.input_size=128"]
    torch.manual_seed(0)
    _, logits, _ = create_model(load_config(overrides=overrides + ["model.class_prior=0.01"]).model)(
        torch.rand(1, 2, 3, 128, 128))
    probs = logits.sigmoid()
    assert torch.allclose(probs[..., 0], torch.tensor(0.99), atol=0.005)
    assert torch.allclose(probs[..., 1:], torch.tensor(0.01), atol=0.005)
    _, plain, _ = create_model(load_config(overrides=overrides).model)(torch.rand(1, 2, 3, 128, 128))
    assert (plain.sigmoid()[..., 1:] - 0.01).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"model\.class_prior"):
        load_config(overrides=overrides + ["model.class_prior=1.5"])


@pytest.mark.parametrize("arch", ["lstm_ssd", "mobilenet_ssd"])
def test_width_scale_builds_the_scaled_network(arch):
    """model.width_scale=0.5 at alpha 1 builds exactly the alpha 0.5 network; the label stays alpha 1."""
    def shapes(*overrides):
        cfg = load_config(overrides=[f"model.arch={arch}", "model.input_size=128", *overrides]).model
        return cfg, [tuple(p.shape) for p in create_model(cfg).parameters()]

    scaled_cfg, scaled = shapes("model.alpha=1.0", "model.width_scale=0.5")
    assert scaled == shapes("model.alpha=0.5")[1] != shapes("model.alpha=1.0")[1]
    assert scaled_cfg.alpha == 1.0
    with pytest.raises(ValueError, match=r"model\.width_scale"):
        load_config(overrides=["model.width_scale=0"])
