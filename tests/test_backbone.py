"""ImageNet MobileNetV1 (timm mobilenetv1_100 layout) into the base: names, shapes, errors."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.backbone import load_backbone, timm_key_map, to_timm_state_dict
from lightning_modules.config import Arch, ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.network import create_model

SINGLE = RecurrentConfig(type=RecurrentType.none)

#: Shapes of timm's mobilenetv1_100 (stem 32, stages 64/128/256/512/1024 with 1/2/2/6/2 blocks).
TIMM_SHAPES = {
    "conv_stem.weight": (32, 3, 3, 3),
    "bn1.running_var": (32,),
    "blocks.0.0.conv_dw.weight": (32, 1, 3, 3),
    "blocks.0.0.conv_pw.weight": (64, 32, 1, 1),
    "blocks.1.0.conv_pw.weight": (128, 64, 1, 1),
    "blocks.2.1.bn2.weight": (256,),
    "blocks.3.5.conv_pw.weight": (512, 512, 1, 1),
    "blocks.4.0.conv_dw.weight": (512, 1, 3, 3),
    "blocks.4.0.conv_pw.weight": (1024, 512, 1, 1),
    "blocks.4.1.conv_pw.weight": (1024, 1024, 1, 1),
    "classifier.weight": (1000, 1024),
}


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A fake timm mobilenetv1_100 state dict (random values, the real names and shapes)."""
    torch.manual_seed(1)
    source = create_model(ModelConfig(arch=Arch.mobilenet_ssd, recurrent=SINGLE))
    for module in source.modules():  # non-trivial BN statistics, so a round trip is checked for real
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    state = to_timm_state_dict(source)
    path = tmp_path_factory.mktemp("timm") / "mobilenetv1_100.pth"
    torch.save(state, path)
    return path, source, state


def test_fake_file_has_timm_layout(timm_file):
    _, _, state = timm_file
    for key, shape in TIMM_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert len([k for k in state if k.endswith("conv_dw.weight")]) == 13  # 1 + 2 + 2 + 6 + 2 blocks


def test_round_trip_into_lstm_ssd(timm_file):
    path, source, _ = timm_file
    torch.manual_seed(2)
    net = create_model(ModelConfig())  # LSTM-SSD, alpha 1: base conv1..conv13, conv14 pruned
    untouched = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("base.")}
    loaded = load_backbone(net, path)
    ours, theirs = net.state_dict(), source.state_dict()
    base_keys = [k for k in ours if k.startswith("base.")]
    assert sorted(base_keys) == loaded
    for key in base_keys:
        assert torch.equal(ours[key], theirs[key]), key
    for key, value in untouched.items():
        assert torch.equal(ours[key], value), f"{key} is not part of the backbone"


def test_round_trip_into_mobilenet_ssd_includes_conv14(timm_file):
    path, source, _ = timm_file
    net = create_model(ModelConfig(arch=Arch.mobilenet_ssd, recurrent=SINGLE))
    loaded = load_backbone(net, path)
    assert "base.conv14.3.weight" in loaded
    assert torch.equal(net.base.conv14[3].weight, source.base.conv14[3].weight)
    assert timm_key_map()["blocks.4.0.conv_pw.weight"] == "base.conv13.3.weight"  # the paper's Conv13


def _one_line_error(net, source) -> str:
    with pytest.raises(ValueError) as info:
        load_backbone(net, source)
    message = str(info.value)
    assert "\n" not in message and "valid:" in message
    return message


def test_width_mismatch_is_a_clear_error(timm_file):
    path, _, _ = timm_file
    message = _one_line_error(create_model(ModelConfig(alpha=0.5, input_size=256)), path)
    assert "'conv_stem.weight' has shape 32x3x3x3" in message and "expects 16x3x3x3" in message
    assert "model.alpha_base=0.5" in message and str(path) in message


def test_missing_and_unexpected_keys_are_clear_errors(timm_file):
    _, _, state = timm_file
    net = create_model(ModelConfig())
    broken = {k: v for k, v in state.items() if k != "blocks.2.1.bn2.running_var"}
    assert "missing key 'blocks.2.1.bn2.running_var' (for base.conv6.4.running_var)" in _one_line_error(net, broken)
    torchvision_like = {"features.0.0.weight": torch.zeros(32, 3, 3, 3), **state}
    assert "unexpected key 'features.0.0.weight'" in _one_line_error(net, torchvision_like)
    # a wrapped checkpoint and a dropped num_batches_tracked still load
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(load_backbone(net, {"state_dict": trimmed}["state_dict"])) > 100


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_backbone(create_model(ModelConfig()), path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_backbone(create_model(ModelConfig()), tmp_path / "nope.pth")


def test_stage1_run_starts_from_train_backbone_weights(timm_file):
    """fit() initialises stage 1 from train.backbone_weights (and says so in one line)."""
    from lightning_modules.fit import initialise_weights
    from lightning_modules.training import LSTMSSDModule, TrainConfig

    path, source, _ = timm_file
    train = TrainConfig(backbone_weights=str(path))
    module = LSTMSSDModule(ModelConfig(recurrent=SINGLE), train)
    summary = initialise_weights(module, train)
    assert summary == f"backbone from {path}: loaded {1 + 5 + 12 * 12} tensors into base"
    assert torch.equal(module.net.base.conv13[3].weight, source.base.conv13[3].weight)
