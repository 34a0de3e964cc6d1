"""Speed settings keep the maths: folded blocks compute what the network computes, train exactly as before,
keep their state_dict, and the thread setting is restored after a stage."""
from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.config import ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.network import create_model
from lightning_modules.speed import FoldingSequential, cpu_threads, fold_batchnorms
from lightning_modules.train_config import TrainConfig


def tiny_net(seed: int = 0):
    torch.manual_seed(seed)
    net = create_model(ModelConfig(alpha=0.25, input_size=64, recurrent=RecurrentConfig(type=RecurrentType.bottleneck_lstm)))
    net.train()
    net(torch.rand(2, 3, 3, 64, 64) * 2 - 1)  # BatchNorm running statistics away from their init
    return net


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_network_matches_the_network_in_eval_mode(channels_last):
    net = tiny_net().eval()
    folded = copy.deepcopy(net)
    assert fold_batchnorms(folded, channels_last) == len([m for m in folded.modules() if isinstance(m, FoldingSequential)]) > 20
    assert folded.state_dict().keys() == net.state_dict().keys()
    frames = torch.rand(4, 2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected, got = net(frames), folded(frames)
    for e, g in zip(expected[:2], got[:2]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_a_training_block_runs_unfolded_and_bit_identical():
    net = tiny_net()
    folded = copy.deepcopy(net)
    fold_batchnorms(folded)
    frames = torch.rand(2, 2, 3, 64, 64) * 2 - 1
    boxes, logits, _ = net(frames)
    boxes_f, logits_f, _ = folded(frames)
    assert torch.equal(boxes, boxes_f) and torch.equal(logits, logits_f)
    (boxes.sum() + logits.sum()).backward()
    (boxes_f.sum() + logits_f.sum()).backward()
    weight = "base.conv2.3.weight"
    assert torch.equal(dict(net.named_parameters())[weight].grad, dict(folded.named_parameters())[weight].grad)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), folded.state_dict().values()))


def test_frozen_eval_blocks_fold_inside_a_training_step():
    """Stage 2: a frozen base in eval mode folds, the layers after it still get gradients."""
    net = tiny_net()
    for layer in net.base.values():
        layer.eval()
        for p in layer.parameters():
            p.requires_grad_(False)
    reference = copy.deepcopy(net)
    fold_batchnorms(net)
    frames = torch.rand(3, 2, 3, 64, 64) * 2 - 1
    features, expected = frames.flatten(0, 1), frames.flatten(0, 1)
    for folded, layer in zip(net.base.values(), reference.base.values()):
        features, expected = folded(features), layer(expected)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)  # conv13, what stage 2 builds on
    _, logits, _ = net(frames)
    logits.sum().backward()
    assert net.fm.fm1[0].weight.grad is not None and net.base.conv13[0].weight.grad is None


def test_threads_are_set_for_the_stage_and_restored():
    before = torch.get_num_threads()
    with cpu_threads(TrainConfig(threads=1)) as inside:
        assert inside == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(TrainConfig(threads=0)) as inside:
        assert inside == before
    with pytest.raises(ValueError, match="train.threads"):
        TrainConfig(threads=-1).validate()
