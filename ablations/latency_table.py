"""Paper Table 7 regenerated: our exported models' single-thread latency beside the Pixel 2 figures."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from ablations import paper
from lightning_modules.config import Arch, ModelConfig, RecurrentConfig, RecurrentType
from lightning_modules.export import SUFFIX, export_model
from lightning_modules.latency import (DEFAULT_FRAMES, DEFAULT_PIN_CORE, DEFAULT_THREADS, DEFAULT_WARMUP, WEIGHTS_NOTE,
                                       PeakResult, _placement, cpu_name, measure_latency, measure_peak)
from lightning_modules.network import create_model

def table7_models() -> List[tuple]:
    """(label, paper TABLE7 key, ModelConfig) of paper Table 7's reimplemented rows: Mobilenet-SSD and LSTM-SSD
    (Bottleneck-LSTMs after conv13 and fm1..fm4, paper Sec. 4.2) at alpha=1@320 and alpha=0.5@256."""
    rows = []
    for alpha in (1.0, 0.5):
        size = paper.INPUT_SIZE[alpha]
        rows.append((f"Mobilenet-SSD (alpha={alpha:g}, {size})", ("mobilenet_ssd", alpha),
                     ModelConfig(arch=Arch.mobilenet_ssd, alpha=alpha, input_size=size,
                                 recurrent=RecurrentConfig(type=RecurrentType.none))))
        rows.append((f"LSTM-SSD (alpha={alpha:g}, {size})", ("lstm_ssd", alpha),
                     ModelConfig(arch=Arch.lstm_ssd, alpha=alpha, input_size=size,
                                 recurrent=RecurrentConfig(after=list(paper.FINAL_PLACEMENT)))))
    return rows


@dataclass
class Table7:
    """Our single-thread latency beside the paper's Pixel 2 big-core figures (paper Table 7)."""

    rows: List[tuple]  # (label, LatencyResult, paper big-core ms)
    peak: PeakResult

    def format(self) -> str:
        lines = ["### Table 7: single-thread latency per frame", "",
                 "| model | ours median ms | ours p90 ms | paper big core ms | ours / paper | GMAC/frame | "
                 "achieved GMAC/s | of peak |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, result, paper_ms in self.rows:
            lines.append(f"| {label} | {result.median_ms:.1f} | {result.p90_ms:.1f} | {paper_ms:g} | "
                         f"{result.median_ms / paper_ms:.2f} | {result.macs / 1e9:.3f} | "
                         f"{result.macs_per_s / 1e9:.2f} | {100 * result.fraction_of_peak:.1f}% |")
        first = self.rows[0][1]
        runtime = "ExecuTorch (XNNPACK delegate)" if first.fmt == "executorch" else "onnxruntime (CPU provider)"
        lines += ["", f"Ours: {runtime}, {_placement(first.threads, first.pin_core)}, {first.frames} frames after "
                      f"{first.warmup} warm-up, state fed back; {cpu_name()}. Peak {self.peak.macs_per_s / 1e9:.1f} "
                      f"GMAC/s: {self.peak.what}, same runtime. Paper: Pixel 2 (Snapdragon 835) big core, single "
                      f"thread, custom TF. {WEIGHTS_NOTE}; NMS not included."]
        return "\n".join(lines)


def table7(fmt: str, out_dir: Optional[Union[str, Path]] = None, frames: int = DEFAULT_FRAMES,
           warmup: int = DEFAULT_WARMUP, threads: int = DEFAULT_THREADS,
           pin_core: Optional[int] = DEFAULT_PIN_CORE, labels: Optional[Sequence[str]] = None) -> Table7:
    """Export (with parity check) and time paper Table 7's models in `fmt`; models kept in `out_dir` if given.
    `labels` restricts to rows whose label starts with one of them (e.g. "LSTM-SSD")."""
    chosen = [m for m in table7_models() if labels is None or any(m[0].startswith(x) for x in labels)]
    if not chosen:
        raise ValueError(f"table7: no model matches {list(labels or [])}; labels: {[m[0] for m in table7_models()]}")
    peak = measure_peak(fmt, threads, pin_core)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out_dir) if out_dir is not None else Path(scratch)
        for label, key, cfg in chosen:
            torch.manual_seed(0)
            net = create_model(cfg).eval()
            name = f"{key[0]}_a{key[1]:g}_{cfg.input_size}{SUFFIX[fmt]}"
            exported = export_model((net, cfg), folder / name, fmt)
            result = measure_latency(exported.model_path, frames, warmup, threads, pin_core, peak)
            rows.append((label, result, paper.TABLE7[key][0]))
    return Table7(rows, peak)
