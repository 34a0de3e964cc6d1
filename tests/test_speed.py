"""Speed settings keep the maths: folded blocks compute what the network computes, train exactly as before,
keep their state_dict, and the thread setting is restored after a stage."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_modules.config import ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.network import create_model
from lightning_modules.speed import (ExactNHWCBatchNorm2d, FoldingSequential, cpu_threads, exact_nhwc_batchnorms,
                                    fold_batchnorms, prepare_module, reuse_freed_memory)
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


def _batchnorm_step(bn, x, grad, layout):
    x = x.detach().contiguous(memory_format=layout).requires_grad_()
    y = bn(x)
    y.backward(grad.contiguous(memory_format=layout))
    return [y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]


def test_nhwc_batchnorm_sums_its_statistics_and_gradients_as_exactly_as_nchw():
    """At the main job's first layers (16 x 16 x 96 x 96, activations around 6 +- 1.7) PyTorch's CPU NHWC kernel is
    ~1e-5 off a float64 reference in y, dx and the weight's and bias's gradients; NCHW and ExactNHWCBatchNorm2d
    stay within 1e-6."""
    torch.manual_seed(0)
    x, grad = torch.rand(16, 16, 96, 96, dtype=torch.float64) * 6 + 3, torch.randn(16, 16, 96, 96, dtype=torch.float64)
    reference = torch.nn.BatchNorm2d(16, eps=1e-3, momentum=0.1).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.uniform_(-1.0, 1.0)
    exact = copy.deepcopy(reference).float()
    assert exact_nhwc_batchnorms(exact) == 1 and isinstance(exact, ExactNHWCBatchNorm2d)
    assert exact.state_dict().keys() == reference.state_dict().keys()
    expected = _batchnorm_step(reference, x, grad, torch.contiguous_format)
    got = _batchnorm_step(exact, x.float(), grad.float(), torch.channels_last)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, e, g in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), expected, got):
        error = float((g.double() - e).abs().max() / e.abs().max())
        assert error < 1e-6, (name, error)
    assert int(exact.num_batches_tracked) == int(reference.num_batches_tracked) == 1
    exact.eval()  # evaluation and NCHW inputs run nn.BatchNorm2d's own kernel
    torch.testing.assert_close(exact(x.float()), reference.eval()(x).float())


def test_channels_last_trains_the_same_maths_as_nchw_in_float64():
    """The whole network's training step in NHWC (prepare_module with train.channels_last) gives NCHW's loss and
    gradients to float64 rounding; in float32 they differ only by rounding (and the hard-negative picks it flips)."""
    net = tiny_net().double()
    module = type("M", (), {})()
    module.net = copy.deepcopy(net)
    prepare_module(module, TrainConfig(channels_last=True, fold_bn=True))
    assert any(isinstance(m, ExactNHWCBatchNorm2d) for m in module.net.modules())
    frames = torch.rand(2, 2, 3, 64, 64, dtype=torch.float64) * 2 - 1
    results = []
    for model in (net, module.net):
        boxes, logits, _ = model(frames)
        loss = (boxes ** 2).sum() + logits.logsumexp(-1).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for name, g in grads_a.items():  # float64 rounding: ~2e-10 of each gradient's norm (float32's would be ~1e-3)
        assert float((grads_b[name] - g).norm() / g.norm()) < 1e-8, name
    for (name, a), b in zip(net.state_dict().items(), module.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


# a fresh process (the setting lasts for the process): a training step keeps its activations for the backward, which
# frees them all at once; five such steps of six 8-MB tensors, the page faults of the last three
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from lightning_modules.speed import reuse_freed_memory
    from lightning_modules.train_config import TrainConfig
    applied = reuse_freed_memory(TrainConfig(reuse_memory=sys.argv[1] == "on"))
    def step():
        kept = [torch.ones(2_000_000) for _ in range(6)]
        del kept
    for _ in range(2):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
_ONE_TENSOR = 2_000_000 * 4 // 4096  # its pages


def _faults(setting: str):
    out = subprocess.run([sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_reused_memory_takes_the_page_faults_out_of_repeated_steps():
    """train.reuse_memory: the memory a step frees is reused by the next instead of being given back to the system
    and faulted in again. Without it glibc faults 13,640-35,061 times in these three steps in 8 of 10 processes (in
    2, 1,953: once), with it 0 or one tensor's pages (1,953-1,954) in 20 of 20; two processes must both stay there."""
    for _ in range(2):
        applied, faults = _faults("on")
        if not applied:
            pytest.skip("no glibc mallopt in this C library: nothing is changed")
        assert faults <= 1.3 * _ONE_TENSOR, f"{faults} page faults in three steps with train.reuse_memory"
    assert _faults("off")[0] is False


def test_reuse_memory_off_or_elsewhere_changes_nothing(monkeypatch):
    monkeypatch.setattr("lightning_modules.speed._memory_reused", False)
    assert reuse_freed_memory(TrainConfig(reuse_memory=False)) is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_freed_memory(TrainConfig(reuse_memory=True)) is False
