"""Latency of an exported model (single thread, pinned, state fed back), the roofline peak, Table 7 rows."""
from __future__ import annotations

import os

import pytest
import torch

from ablations import paper
from lightning_modules.config import Arch, ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.cost import count_cost
from lightning_modules.export import export_model
from ablations.latency_table import Table7, table7_models
from lightning_modules.latency import LatencyResult, PeakResult, measure_latency, measure_peak, pinned
from lightning_modules.network import create_model


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    cfg = ModelConfig(alpha=0.25, input_size=64, recurrent=RecurrentConfig(after=["conv13", "fm1"]))
    torch.manual_seed(0)
    net = create_model(cfg).eval()
    result = export_model((net, cfg), tmp_path_factory.mktemp("latency") / "tiny.onnx", "onnx", parity_frames=2)
    return result.model_path, net


def test_latency_of_a_tiny_model(tiny_onnx):
    path, net = tiny_onnx
    affinity = os.sched_getaffinity(0)
    result = measure_latency(path, frames=20, warmup=2, threads=1, pin_core=min(affinity))
    print("\n" + result.format())
    assert os.sched_getaffinity(0) == affinity  # pinning undone
    assert result.frames == 20 and 0 < result.median_ms <= result.p90_ms
    assert result.macs == count_cost(net).macs
    assert result.macs_per_s == pytest.approx(result.macs / (result.median_ms / 1e3))
    assert result.fraction_of_peak is None


def test_latency_needs_the_sidecar(tiny_onnx, tmp_path):
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(tiny_onnx[0].read_bytes())
    with pytest.raises(FileNotFoundError, match="copy.onnx.json"):
        measure_latency(copy, frames=1, warmup=0)


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_peak_is_positive_and_restores_affinity_and_threads(fmt):
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    affinity, pool = os.sched_getaffinity(0), _threadpool_get_thread_count()
    peak = measure_peak(fmt, threads=1, pin_core=min(affinity), channels=64, size=16, layers=2, repeats=3, warmup=1)
    print("\n" + peak.format())
    assert peak.macs == 2 * 64 * 64 * 16 * 16 and peak.median_ms > 0 and peak.macs_per_s > 0
    assert os.sched_getaffinity(0) == affinity and _threadpool_get_thread_count() == pool


def test_pinning_rejects_a_core_outside_the_allowed_set():
    allowed = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="may use cores"):
        with pinned(max(allowed) + 1, 1):
            pass
    assert os.sched_getaffinity(0) == allowed


def test_table7_models_are_the_papers_rows():
    models = table7_models()
    assert {key for _, key, _ in models} == {k for k in paper.TABLE7 if isinstance(k, tuple)}
    for _, (arch, alpha), cfg in models:
        assert cfg.alpha == alpha and cfg.input_size == paper.INPUT_SIZE[alpha] and cfg.arch == Arch(arch)
        if arch == "mobilenet_ssd":
            assert cfg.recurrent.type == RecurrentType.none
        else:
            assert cfg.recurrent.type == RecurrentType.bottleneck_lstm
            assert tuple(cfg.recurrent.after) == paper.FINAL_PLACEMENT


def test_table7_row_compares_with_the_papers_big_core():
    peak = PeakResult("onnx", 1, 10**9, 20.0, "1x1 convs")
    ours = LatencyResult("m.onnx", "onnx", 200, 20, 1, 0, median_ms=32.2, p90_ms=35.0, macs=10**9, peak=peak)
    paper_ms = paper.TABLE7[("lstm_ssd", 1.0)][0]
    text = Table7([("LSTM-SSD (alpha=1, 320)", ours, paper_ms)], peak).format()
    assert f"| {paper_ms:g} | {32.2 / paper_ms:.2f} |" in text
    assert "| 62.1% |" in text  # (1e9 / 32.2 ms) / (1e9 / 20 ms)
    assert "random-init weights" in text
