"""Mobile export: parity of the exported one-frame stateful model with eager PyTorch, the sidecar, checkpoints."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lightning_modules.anchors import generate_anchors
from lightning_modules.config import Arch, ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.deploy.export import (DEFAULT_SCORE_TOL, OneFrameDetector, check_parity, export_model,
                                      flat_model_config, load_checkpoint, load_runtime, model_config_from_dict,
                                      read_sidecar, save_plain_checkpoint)
from lightning_modules.network import create_model

SIZE = 64


def _small(recurrent: RecurrentConfig | None = None, seed: int = 0):
    """alpha=0.25, 64px; default: Bottleneck-LSTMs after conv13 and fm1."""
    cfg = ModelConfig(alpha=0.25, input_size=SIZE,
                      recurrent=recurrent or RecurrentConfig(after=["conv13", "fm1"]))
    torch.manual_seed(seed)
    return create_model(cfg).eval(), cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small LSTM model exported once per format: {fmt: (ExportResult, net, cfg)}."""
    net, cfg = _small()
    folder = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    return {fmt: (export_model((net, cfg), folder / f"small.{suffix}", fmt), net, cfg)
            for fmt, suffix in (("onnx", "onnx"), ("executorch", "pte"))}


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_parity_over_a_clip_with_state_fed_back(exported, fmt):
    result, _, _ = exported[fmt]
    print(f"\n{fmt} (ExecuTorch lowering of the smallest model takes ~30 s):\n{result.format()}")
    assert result.model_path.is_file()
    assert len(result.parity.box_diff) == len(result.parity.score_diff) == 20
    assert result.parity.max_box <= 1e-3 and result.parity.max_score <= 1e-3
    assert result.input_names == ["image", "state_conv13_0_c", "state_conv13_0_h", "state_fm1_0_c", "state_fm1_0_h"]
    assert result.output_names[:2] == ["boxes", "scores"]
    assert result.output_names[2:] == ["new_" + name for name in result.input_names[1:]]


def test_parity_check_needs_the_fed_back_state(exported):
    """The clip is long enough for the state to matter: resetting it each frame breaks parity."""
    result, net, _ = exported["onnx"]
    detector = OneFrameDetector(net)
    frames = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        _, reference = detector.detections(*net(frames[:, None])[:2])
    run = load_runtime(result.model_path)
    stateless = [run([frames[t:t + 1], *detector.zero_state()])[1] for t in range(6)]
    assert max(float((s - r).abs().max()) for s, r in zip(stateless, reference)) > DEFAULT_SCORE_TOL


def test_parity_fails_for_other_weights(exported):
    result, _, _ = exported["onnx"]
    other, _ = _small(seed=1)
    with pytest.raises(ValueError, match="parity failed"):
        check_parity(OneFrameDetector(other), result.model_path, torch.rand(3, 3, SIZE, SIZE) * 2 - 1)


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_sidecar_describes_inputs_and_outputs(exported, fmt):
    result, net, cfg = exported[fmt]
    meta = read_sidecar(result.model_path)
    anchors = generate_anchors(net.feature_map_sizes).shape[0]
    assert meta["format"] == fmt and meta["model_file"] == result.model_path.name
    assert meta["input_size"] == SIZE and meta["num_classes"] == 30 and meta["num_anchors"] == anchors
    assert [i["name"] for i in meta["inputs"]] == result.input_names
    assert meta["inputs"][0]["shape"] == [1, 3, SIZE, SIZE]
    zero = [t for cell in net.zero_state(1) for t in cell]
    assert [i["shape"] for i in meta["inputs"][1:]] == [list(t.shape) for t in zero]
    assert meta["outputs"][0]["shape"] == [1, anchors, 4] and meta["outputs"][1]["shape"] == [1, anchors, 30]
    assert model_config_from_dict(meta["model_config"], "sidecar") == cfg
    assert meta["macs"] > 0 and meta["parity"]["frames"] == 20


def test_onnx_input_names_and_shapes_match_the_sidecar(exported):
    import onnxruntime

    result, _, _ = exported["onnx"]
    session = onnxruntime.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    meta = read_sidecar(result.model_path)
    assert [(i.name, list(i.shape)) for i in session.get_inputs()] == [(i["name"], i["shape"]) for i in meta["inputs"]]
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in meta["outputs"]]


def test_model_without_recurrent_layer_has_no_state(tmp_path):
    """A single-frame Mobilenet-SSD, exported from a plain checkpoint file."""
    net, cfg = _small(RecurrentConfig(type=RecurrentType.none))
    cfg = dataclasses.replace(cfg, arch=Arch.mobilenet_ssd)
    net = create_model(cfg).eval()
    checkpoint = save_plain_checkpoint(net, cfg, tmp_path / "mobilenet_ssd.pt")
    result = export_model(checkpoint, tmp_path / "mobilenet_ssd.onnx", "onnx", parity_frames=3)
    assert result.input_names == ["image"] and result.output_names == ["boxes", "scores"]
    meta = json.loads(result.sidecar_path.read_text())
    assert meta["state"] == [] and len(meta["inputs"]) == 1
    assert result.parity.max_score <= 1e-3


def _same_outputs(a, b) -> bool:
    image = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        return all(torch.equal(x, y) for x, y in zip(a.step(image)[:2], b.step(image)[:2]))


def test_plain_checkpoint_round_trip(tmp_path):
    net, cfg = _small()
    loaded, loaded_cfg = load_checkpoint(save_plain_checkpoint(net, cfg, tmp_path / "plain.pt"))
    assert loaded_cfg == cfg and not loaded.training and _same_outputs(net, loaded)


@pytest.mark.parametrize("hparams_form", ["nested", "flat"])
def test_lightning_checkpoint(tmp_path, hparams_form):
    net, cfg = _small()
    if hparams_form == "nested":  # a dataclass dumped as is: Enum members inside (needs the full unpickler)
        hparams = {"model": dataclasses.asdict(cfg), "optim": {"lr": 0.003}}
    else:
        hparams = {**{f"model.{k}": v for k, v in flat_model_config(cfg).items()}, "optim.lr": 0.003}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.6", "epoch": 3}, path)
    loaded, loaded_cfg = load_checkpoint(path)
    assert loaded_cfg == cfg and _same_outputs(net, loaded)


def _write_bad(tmp_path, kind: str):
    path = tmp_path / f"{kind}.ckpt"
    net, cfg = _small()
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "no_state_dict":
        torch.save({"weights": net.state_dict()}, path)
    elif kind == "no_config":
        torch.save({"state_dict": net.state_dict(), "hyper_parameters": {"lr": 0.1}}, path)
    elif kind == "wrong_weights":
        torch.save({"model_config": {**flat_model_config(cfg), "alpha": 0.5}, "state_dict": net.state_dict()}, path)
    elif kind == "unknown_key":
        torch.save({"model_config": {"alpha": 0.25, "widht": 3}, "state_dict": net.state_dict()}, path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("text", "is not a torch file"), ("no_state_dict", "has no 'state_dict'"),
    ("no_config", "no model config"), ("wrong_weights", "do not fit"), ("unknown_key", "widht"),
])
def test_bad_checkpoint_names_file_and_expectation(tmp_path, kind, message):
    path = _write_bad(tmp_path, kind)
    with pytest.raises(ValueError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_checkpoint_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="executorch, onnx"):
        export_model(_small(), tmp_path / "m.tflite", "tflite")
