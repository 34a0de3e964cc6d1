"""Stage-2 initialisation, freezing and the training config (no Trainer: fast)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.config import ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.network import create_model
from lightning_modules.stages import (freeze_base, frozen_batchnorms, init_from_checkpoint, load_matching,
                                      read_net_state)
from lightning_modules.training import FreezeMode, LrSchedule, LSTMSSDModule, TrainConfig, resolve_lr

SINGLE = RecurrentConfig(type=RecurrentType.none)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(alpha=0.25, input_size=64, bn_momentum=0.1, **kw)


def test_stage2_loads_matching_names_and_shapes_only():
    torch.manual_seed(0)
    stage1, stage2 = create_model(tiny(recurrent=SINGLE)), create_model(tiny())
    before = {k: v.clone() for k, v in stage2.state_dict().items()}
    summary = load_matching(stage2, stage1.state_dict())
    after, source = stage2.state_dict(), stage1.state_dict()
    for name in summary.loaded:
        assert torch.equal(after[name], source[name]), name
    # the LSTM is new; FM1's 1x1 sees 64 (LSTM) instead of 256 (conv13) channels at alpha 0.25
    assert all(n.startswith("cells.conv13_0.") for n in summary.fresh) and len(summary.fresh) == 6
    assert ("fm.fm1.0.weight", "32x256x1x1", "32x64x1x1") in summary.reshaped
    for name, _, _ in summary.reshaped:
        assert torch.equal(after[name], before[name]), f"{name} must keep its fresh init"
    assert all(name.startswith("base.") or name in summary.loaded for name in source if name.startswith("base."))
    assert {n for n in after if n.startswith("base.")} <= set(summary.loaded)
    text = summary.format()
    assert text.startswith(f"loaded {len(summary.loaded)} tensors, fresh: cells.conv13_0.* (6), ")
    assert "fm.fm1.0.weight (shape 32x256x1x1 -> 32x64x1x1)" in text


def test_progressive_stage_adds_a_second_lstm(tmp_path):
    """Paper Sec. 4.1: finetune from the previous checkpoint while adding layers."""
    one = create_model(tiny())
    path = tmp_path / "stage2.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in one.state_dict().items()}}, path)
    two = create_model(tiny(recurrent=RecurrentConfig(after=["conv13", "conv13"])))
    summary = init_from_checkpoint(two, path)
    assert not summary.reshaped and not summary.unused
    assert summary.fresh and all(n.startswith("cells.conv13_1.") for n in summary.fresh)
    assert torch.equal(two.cells.conv13_0.gates_pw.weight, one.cells.conv13_0.gates_pw.weight)
    assert summary.format().endswith("fresh: cells.conv13_1.* (6)")


def test_read_net_state_choices(tmp_path):
    net = create_model(tiny(recurrent=SINGLE))
    raw = {f"net.{k}": v for k, v in net.state_dict().items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": raw, "ema_state_dict": ema}, path)
    w = "base.conv1.0.weight"
    assert torch.equal(read_net_state(path)[w], net.state_dict()[w])
    assert torch.equal(read_net_state(path, use_ema=True)[w], ema[w])
    assert torch.equal(read_net_state(path, use_ema=None)[w], ema[w])  # None: EMA when present
    torch.save({"state_dict": raw}, path)
    with pytest.raises(ValueError, match="has no EMA weights.*train.init_from_ema=false"):
        read_net_state(path, use_ema=True)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_net_state(tmp_path / "missing.ckpt")


def test_freeze_base_through_conv13():
    net = create_model(tiny())
    layers = freeze_base(net, "conv13")
    assert layers == [f"conv{k}" for k in range(1, 14)]
    for name, p in net.named_parameters():
        assert p.requires_grad == (not name.startswith("base.")), name
    assert len(frozen_batchnorms(net, layers)) == 1 + 12 * 2
    with pytest.raises(ValueError, match=r"train.freeze_through='conv14' is not a base layer.*conv13"):
        freeze_base(create_model(tiny()), "conv14")  # pruned in lstm_ssd


@pytest.mark.parametrize("mode", [FreezeMode.frozen_bn_eval, FreezeMode.naive])
def test_module_keeps_frozen_batchnorm_statistics(mode):
    """frozen_bn_eval: base BN running stats never move in train mode; naive: they do."""
    torch.manual_seed(0)
    module = LSTMSSDModule(tiny(), TrainConfig(init_checkpoint="stage1.ckpt", freeze=mode))
    assert module.hparams["freeze_applied"] == mode.value and module.hparams["stage"] == 2
    module.train()
    bn = module.net.base.conv7[1]
    assert bn.training == (mode == FreezeMode.naive)
    assert module.net.fm.fm1[1].training
    stats = bn.running_mean.clone(), module.net.fm.fm1[1].running_mean.clone()
    module.net(torch.randn(2, 2, 3, 64, 64))
    assert torch.equal(bn.running_mean, stats[0]) == (mode == FreezeMode.frozen_bn_eval)
    assert not torch.equal(module.net.fm.fm1[1].running_mean, stats[1])


def test_stage1_freezes_nothing():
    module = LSTMSSDModule(tiny(recurrent=SINGLE), TrainConfig())
    assert module.hparams["freeze_applied"] == "none" and module.hparams["stage"] == 1
    assert all(p.requires_grad for p in module.parameters())


def test_optimizer_holds_trainable_parameters_with_l2_on_conv_weights_only():
    module = LSTMSSDModule(tiny(), TrainConfig(init_checkpoint="x.ckpt"))
    groups = module.configure_optimizers()["optimizer"].param_groups
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    assert all(p.ndim == 4 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 4e-5
    assert all(p.ndim != 4 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_recurrent_lr_factor_gives_the_cells_their_own_rate():
    module = LSTMSSDModule(tiny(), TrainConfig(init_checkpoint="x.ckpt", lr=0.001, recurrent_lr_factor=3.0))
    groups = module.configure_optimizers()["optimizer"].param_groups
    cells = {id(p) for p in module.net.cells.parameters()}
    assert cells and all(p.requires_grad for p in module.net.cells.parameters())
    for group in groups:
        inside = {id(p) in cells for p in group["params"]}
        assert len(inside) == 1  # a group holds cell parameters only or none
        assert group["lr"] == pytest.approx(0.003 if inside == {True} else 0.001)
    held = {id(p) for g in groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="train.recurrent_lr_factor must be > 0"):
        TrainConfig(recurrent_lr_factor=0.0).validate()



def test_lr_schedule_cosine_falls_to_zero_over_the_run_and_step_is_the_papers():
    cosine = LSTMSSDModule(tiny(), TrainConfig(init_checkpoint="x.ckpt", lr=0.001, max_steps=8,
                                                 lr_schedule=LrSchedule.cosine)).configure_optimizers()
    schedule, optimizer = cosine["lr_scheduler"]["scheduler"], cosine["optimizer"]
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.001) and rates[4] == pytest.approx(0.0005)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    step = LSTMSSDModule(tiny(), TrainConfig(init_checkpoint="x.ckpt", lr=0.001, max_steps=8)).configure_optimizers()
    for _ in range(8):
        step["optimizer"].step()
        step["lr_scheduler"]["scheduler"].step()
    assert step["optimizer"].param_groups[0]["lr"] == pytest.approx(0.001)  # x0.95 every 200k steps

def test_train_config_defaults_and_errors():
    assert resolve_lr(TrainConfig(), ModelConfig(alpha=1.0)) == 0.003
    assert resolve_lr(TrainConfig(), ModelConfig(alpha=0.5, input_size=256)) == 0.002
    assert resolve_lr(TrainConfig(lr=0.1), ModelConfig()) == 0.1
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(["freeze=naive", "lr=0.01"]))
    obj = OmegaConf.to_object(cfg)
    assert obj.freeze is FreezeMode.naive and obj.lr == 0.01
    for kwargs, message in [({"lr": -1.0}, "train.lr must be > 0"),
                            ({"ema_decay": 1.0}, "train.ema_decay must be in"),
                            ({"freeze_through": "fm1"}, "train.freeze_through must be a base layer"),
                            ({"precision": "fp8"}, "train.precision must be one of"),
                            ({"max_steps": -1, "max_epochs": None}, "would train forever")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs).validate()
