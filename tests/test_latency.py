"""Latency of an exported model (single thread, pinned, state fed back), the roofline peak, Table 7 rows."""
from __future__ import annotations

import os

import pytest
import torch

from ablations import paper
from lightning_modules.config import Arch, ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.deploy.cost import count_cost
from lightning_modules.deploy.export import export_model
from ablations.extras.latency_table import Row, Table7, table7_models
from lightning_modules.deploy.latency import (LatencyResult, PeakResult, available_runtimes, measure_latency, measure_peak,
                                       pinned)
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


def test_peak_is_the_fastest_runtimes_gemm_and_restores_affinity_and_threads():
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    affinity, pool, threads = os.sched_getaffinity(0), _threadpool_get_thread_count(), torch.get_num_threads()
    peak = measure_peak("executorch", threads=1, pin_core=min(affinity), sizes=(64, 128), repeats=3, warmup=1)
    print("\n" + peak.describe())
    assert set(peak.runtimes) == set(available_runtimes()) >= {"torch", "executorch", "onnx"}
    assert peak.macs_per_s == max(peak.runtimes.values()) > 0 and peak.macs in (64 ** 3, 128 ** 3)
    assert os.sched_getaffinity(0) == affinity and _threadpool_get_thread_count() == pool
    assert torch.get_num_threads() == threads


def test_the_peaks_gemms_are_exported_once_and_timed_as_often_as_asked(tmp_path, monkeypatch):
    import lightning_modules.deploy.latency as latency

    exported = latency.export_gemms(tmp_path, sizes=(32, 64), runtimes=("torch", "onnx"))
    assert sorted(exported) == [("onnx", 32), ("onnx", 64), ("torch", 32), ("torch", 64)]
    exports = []
    monkeypatch.setattr(latency, "_export_gemm", lambda *args: exports.append(args))
    pin = min(os.sched_getaffinity(0))
    peaks = [latency.measure_peak("onnx", threads=1, pin_core=pin, repeats=2, warmup=1, exported=exported) for _ in range(2)]
    assert not exports and all(set(peak.runtimes) == {"torch", "onnx"} for peak in peaks)
    assert all(peak.macs in (32 ** 3, 64 ** 3) for peak in peaks)
    only = latency.measure_peak("onnx", threads=1, pin_core=pin, repeats=2, warmup=1, exported=exported,
                                sizes=(64,), runtimes=("onnx",))
    assert not exports and set(only.runtimes) == {"onnx"} and only.macs == 64 ** 3  # the subset asked for
    with pytest.raises(ValueError, match="none of the exported GEMMs"):
        latency.measure_peak("onnx", threads=1, pin_core=pin, exported=exported, sizes=(512,))


def test_repeated_rounds_report_their_spread(tiny_onnx):
    path, _ = tiny_onnx
    result = measure_latency(path, frames=5, warmup=1, threads=1, pin_core=min(os.sched_getaffinity(0)), rounds=3)
    assert len(result.rounds) == 3 and min(result.rounds) <= result.median_ms <= max(result.rounds)
    assert f"[{min(result.rounds):.2f}-{max(result.rounds):.2f}]" in result.row()


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


def test_table7_row_compares_with_the_papers_big_core_and_lstm_with_mobilenet():
    peak = PeakResult("torch", 1, 10**9, 10.0, "1000x1000x1000 GEMM", {"torch": 1e11, "onnx": 9e10})
    def result(ms, rounds):
        return LatencyResult("m.pte", "executorch", 200, 20, 1, 0, median_ms=ms, p90_ms=ms + 1, macs=10**9, peak=peak,
                             rounds=rounds)
    paper_ms = paper.TABLE7[("lstm_ssd", 1.0)][0]
    rows = [Row("Mobilenet-SSD (alpha=1, 320)", ("mobilenet_ssd", 1.0), {"executorch": result(40.0, [40.0, 40.0, 40.0])},
                paper.TABLE7[("mobilenet_ssd", 1.0)][0]),
            Row("LSTM-SSD (alpha=1, 320)", ("lstm_ssd", 1.0), {"executorch": result(32.0, [32.0, 34.0, 30.0])}, paper_ms)]
    text = Table7(rows, peak).format()
    assert f"| 32.00 [30.00-34.00] | 33.0 | {paper_ms:g} | {32.0 / paper_ms:.2f} |" in text
    assert "| 31.2% |" in text  # (1e9 / 32 ms) / (1e9 / 10 ms)
    assert "| alpha=1, 320 | 0.80 [0.75-0.85] | 0.90 |" in text  # 32 / 40, and each round's ratio
    assert "random-init weights" in text and "100.0 GMAC/s: torch" in text


def test_table7_exported_while_the_trials_train_is_timed_at_the_end_not_exported_again(tmp_path, monkeypatch):
    """`tafm run --workers 2`: prepare_extras counts the costs and exports Table 7's models while a helper trains;
    run_extras then only times them. If preparing fails, run_extras does all of it."""
    from types import SimpleNamespace

    import ablations.extras.cost_table as cost_table
    import ablations.extras.latency_table as latency_table
    import ablations.pipeline as pipeline
    from ablations.suite import load_suite

    suite = load_suite("quick")  # cost tables and Table 7 in ExecuTorch, onnxruntime where it is not installed
    calls, lines = [], []
    monkeypatch.setattr(latency_table, "installed", lambda runtime: runtime == "onnx")
    monkeypatch.setattr(cost_table, "cost_tables", lambda: calls.append("count") or "| costs |")
    monkeypatch.setattr(latency_table, "export_table7", lambda fmt, folder: calls.append(("export", fmt)) or SimpleNamespace(fmt=fmt))
    monkeypatch.setattr(latency_table, "table7", lambda fmt, exports=None: calls.append(("time", fmt, exports))
                        or SimpleNamespace(format=lambda: "| table 7 |"))
    prepared = pipeline.prepare_extras(suite, tmp_path, lines.append)
    assert calls == ["count", ("export", "onnx")]
    pipeline.run_extras(suite, tmp_path, lines.append, prepared)
    assert calls[2:] == [("time", "onnx", prepared["table7"])]  # counted and exported once
    extras = tmp_path / "quick" / "extras"
    assert (extras / "1_cost_tables.md").read_text().endswith("| costs |\n")
    assert (extras / "2_table7.md").read_text().endswith("| table 7 |\n")

    def broken(fmt, folder):
        raise RuntimeError("exporter broke")

    calls.clear()
    monkeypatch.setattr(latency_table, "export_table7", broken)
    prepared = pipeline.prepare_extras(suite, tmp_path, lines.append)
    assert "table7" not in prepared and "preparing the extras failed (RuntimeError: exporter broke)" in lines[-1]
    pipeline.run_extras(suite, tmp_path, lines.append, prepared)
    assert calls == ["count", ("time", "onnx", None)]  # the end exports and times, as without a helper
