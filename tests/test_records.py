"""The typed trial record: the results file round-trips, older files load, unreadable ones say what to do."""
from __future__ import annotations

import pandas as pd
import pytest

from ablations.records import (CLEAN, SCHEMA_VERSION, Provenance, RecordError, TrialRecord, occluded_name,
                               read_results, split_metrics, write_results)


def _record() -> TrialRecord:
    flat = {"val/vid_map50": 0.5, "val/coco_ap50": 0.6, occluded_name(0.25, "val/vid_map50"): 0.3,
            "params": 3_000_000, "macs": 1_100_000_000, "latency_ms_median": 12.5, "checkpoint": "runs/x.ckpt",
            "artifact.detections": "trials/k/detections.parquet", "single_frame_cap": 0.7}
    return TrialRecord(key="k-s0", trial=0, state="COMPLETE", seed=0, value=0.5, axes={"model.alpha": "0.5"},
                       config={"model.alpha": 0.5, "model.recurrent.after": ["conv13"]}, **split_metrics(flat),
                       provenance=Provenance("abc", "host", {"torch": "2"}, 1.5))


def test_metrics_by_stream_and_occlusion():
    record = _record()
    assert record.metric("val/vid_map50") == 0.5 and record.metric("val/vid_map50", 0.25) == 0.3
    assert record.occlusions == [0.25] and record.metric("single_frame_cap", CLEAN) == 0.7
    assert record.costs == {"params": 3_000_000, "macs": 1_100_000_000}
    assert record.latency == {"latency_ms_median": 12.5}
    assert record.artifacts == {"detections": "trials/k/detections.parquet"}
    assert record.extra == {"checkpoint": "runs/x.ckpt"}


def test_results_file_round_trips(tmp_path):
    path = tmp_path / "results.csv"
    write_results([_record()], path)
    (back,) = read_results(path)
    assert back == _record()
    assert pd.read_csv(path)["schema"].tolist() == [SCHEMA_VERSION]


def test_a_file_from_before_the_schema_column_loads(tmp_path):
    path = tmp_path / "results.csv"
    write_results([_record()], path)
    pd.read_csv(path).drop(columns=["schema"]).to_csv(path, index=False)
    assert read_results(path) == [_record()]


def test_newer_or_foreign_files_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "results.csv"
    write_results([_record()], path)
    frame = pd.read_csv(path)
    frame.assign(schema=SCHEMA_VERSION + 1).to_csv(path, index=False)
    with pytest.raises(RecordError, match=f"{path}.*newer.*rerun the suite"):
        read_results(path)
    frame.drop(columns=["seed"]).to_csv(path, index=False)
    with pytest.raises(RecordError, match=f"{path}.*no column seed.*tafm run"):
        read_results(path)
