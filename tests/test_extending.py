"""A recurrent cell registered from outside the package trains, exports and is counted like the paper's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ablations.config import load_config
from datamodules.clips import DataConfig
from datamodules.synthetic import SynthConfig, generate
from lightning_modules.config import ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.deploy.cost import count_cost
from lightning_modules.deploy.export import export_model
from lightning_modules.fit import fit
from lightning_modules.network import create_model
from lightning_modules.recurrent import CELLS, RecurrentCell, register_cell
from lightning_modules.training import TrainConfig


class ToyCell(RecurrentCell):
    """out = relu(1x1([x, memory])); memory' = out."""

    state_names = ("memory",)
    cost_group = "toy"

    def __init__(self, m: int):
        super().__init__()
        self.in_channels = self.out_channels = m
        self.mix = nn.Conv2d(2 * m, m, 1)

    def zero_state(self, x):
        return (x.new_zeros(x.shape),)

    def forward(self, x, state):
        (memory,) = state
        out = torch.relu(self.mix(torch.cat([x, memory], dim=1)))
        return out, (out,)

    def init_identity(self) -> None:
        pass


@pytest.fixture(scope="module")
def toy() -> str:
    """Registered at test time, not at import: other modules parametrize over the built-in types."""
    if "toy" not in CELLS:
        register_cell("toy")(lambda m, n, cfg: ToyCell(m))
    return "toy"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    cfg = SynthConfig(videos=2, val_videos=1, frames=8, size=64, seed=0, max_objects=1)
    return generate(tmp_path_factory.mktemp("synth") / "vid", cfg, progress=False)


def test_a_cell_without_memory_gates_keeps_its_identity_start_under_leaky(toy):
    """The synthetic profile starts cells leaky; a registered cell that has no init_memory builds as its identity."""
    from lightning_modules.config import CellInit
    from lightning_modules.network import create_model

    recurrent = RecurrentConfig(type=RecurrentType[toy], after=["conv13"], init=CellInit.leaky)
    net = create_model(ModelConfig(alpha=0.25, input_size=64, recurrent=recurrent))
    assert isinstance(net.cells["conv13_0"], ToyCell)


def _model(kind: str) -> ModelConfig:
    return ModelConfig(alpha=0.25, input_size=64, recurrent=RecurrentConfig(type=RecurrentType[kind], after=["conv13"]))


def test_a_registered_cell_is_a_config_value(toy):
    cfg = load_config([f"model.recurrent.type={toy}", "model.recurrent.after=[conv13]"])
    assert cfg.model.recurrent.type.value == toy
    assert isinstance(create_model(cfg.model).cells["conv13_0"], ToyCell)


def test_a_registered_cell_trains_exports_and_counts(toy, root, tmp_path):
    torch.set_num_threads(1)
    model = _model(toy)
    train = TrainConfig(lr=0.01, max_epochs=None, max_steps=2, out_dir=str(tmp_path / "run"), csv_logger=False)
    result = fit(model, DataConfig(clip_length=2, batch_size=2, max_val_videos=1), train, root=root)
    assert result.checkpoint.is_file() and "val/vid_map50" in result.metrics

    cost = count_cost(create_model(model))
    assert cost.components["toy:conv13_0"]["params"] > 0 and cost.components["toy:conv13_0"]["macs"] > 0
    assert cost.recurrent == ["toy:conv13_0"] and cost.recurrent_total("params") == cost.components["toy:conv13_0"]["params"]

    exported = export_model(str(result.checkpoint), tmp_path / "toy.onnx", "onnx", parity_frames=3)
    assert exported.parity.ok
    assert "state_conv13_0_memory" in exported.input_names
