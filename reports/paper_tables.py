"""The paper's tables: for each, the paper's mAP of a row (paper Tables 2-7, Figure 4)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ablations import paper
from ablations.records import TrialRecord
from reports.registry import Columns, RowKey, register_table


def _final(row: RowKey) -> bool:
    """The paper's final models: MobileNet-SSD, and LSTM-SSD with the final placement (paper Table 5)."""
    return (row["arch"] == "mobilenet_ssd" and row["type"] == "none"
            or row["arch"] == "lstm_ssd" and row["after"] == paper.FINAL_PLACEMENT)


def _recurrent_cost_cells(row: RowKey, records: List[TrialRecord]) -> List[str]:
    """Our recurrent layer's parameters and MACs beside paper Table 3's."""
    theirs = paper.TABLE3.get((row["alpha"], row["type"]), (None, None, None))
    shown = ["–" if v is None else f"{v:g}" for v in theirs[1:]]
    costs = records[0].costs
    return [f"{costs['params_recurrent'] / 1e6:.3f}", shown[0], f"{costs['macs_recurrent'] / 1e6:.1f}", shown[1]]


RECURRENT_COSTS = Columns(("recurrent params M", "paper", "recurrent MACs M", "paper"), _recurrent_cost_cells)


@register_table("table2")
def table2(row: RowKey, p: Optional[float] = None) -> Optional[float]:
    """Paper Table 2: where one recurrent layer goes (alpha = 1)."""
    if p is not None or row["alpha"] != 1.0:
        return None
    after = row["after"]
    return paper.TABLE2_MAP.get("none" if row["type"] == "none" else after[0] if len(after) == 1 else "", None)


@register_table("table3", columns=[RECURRENT_COSTS])
def table3(row: RowKey, p: Optional[float] = None) -> Optional[float]:
    """Paper Table 3: recurrent layer types after conv13."""
    if p is not None or row["after"] != ("conv13",):
        return None
    return paper.TABLE3.get((row["alpha"], row["type"]), (None,))[0]


@register_table("table4")
def table4(row: RowKey, p: Optional[float] = None) -> Optional[float]:
    """Paper Table 4: stacked Bottleneck-LSTM placements."""
    if p is not None or row["type"] != "bottleneck_lstm":
        return None
    for placement, by_alpha in paper.TABLE4:
        if placement == row["after"] and row["alpha"] in by_alpha:
            return by_alpha[row["alpha"]][0]
    return None


@register_table("table5")
@register_table("table7")
def table5(row: RowKey, p: Optional[float] = None) -> Optional[float]:
    """Paper Table 5 (and Table 7's models): the final models against MobileNet-SSD."""
    if p is not None or not _final(row):
        return None
    return paper.TABLE5.get((row["arch"], row["alpha"]), (None,))[0]


@register_table("table6")
def table6(row: RowKey, p: Optional[float] = None) -> Optional[float]:
    """Paper Table 6: the final models on occluded clips (no clean column in the paper)."""
    if p is None or not _final(row):
        return None
    return paper.TABLE6.get((row["arch"], row["alpha"]), {}).get(p)


def figure4(records: List[TrialRecord], out: Path) -> Path:
    """Figure 4: mAP against the LSTM's output channels (alpha_lstm * 1024), as a PNG: the mean over seeds
    as a line with its std as error bars, each seed as a faint dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = sorted((float(r.config["model.alpha_lstm"]) * 1024, float(r.metric("val/vid_map50")) * 100) for r in records)
    widths = sorted({x for x, _ in points})
    by_width = [[y for x, y in points if x == w] for w in widths]
    means = [float(np.mean(ys)) for ys in by_width]
    stds = [float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0 for ys in by_width]
    seeds = max(len(ys) for ys in by_width)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, color="0.6", zorder=2,
               label="one seed" if seeds > 1 else "one run")
    if seeds > 1:
        ax.errorbar(widths, means, yerr=stds, marker="o", capsize=3, zorder=3, label=f"mean ± std, {seeds} seeds")
    else:
        ax.plot(widths, means, marker="o", zorder=3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LSTM output channels (alpha_lstm x 1024)")
    ax.set_ylabel("VID mAP@0.5 (%)")
    ax.set_title("Figure 4: mAP vs LSTM output channels")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _figure4(records: List[TrialRecord], folder: Path) -> List[str]:
    figure4(records, folder / "fig4.png")
    return ["![Figure 4](fig4.png)", ""]


@register_table("fig4", figure=_figure4)
@register_table("search")
def no_paper_cell(row: RowKey, p: Optional[float] = None) -> Optional[float]:
    """Figure 4 (a plot, no table in the paper) and search suites: no paper value per row."""
    return None
