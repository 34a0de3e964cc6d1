"""W&B tracking: one run per trial (group = suite, job_type = stage, a tag per axis value), offline by
default and never blocking without a network. Tables are built from our own records, not from W&B.
"""
from __future__ import annotations

import glob
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

MODES = ("offline", "online", "disabled")


def resolve_mode(cli_value: Optional[str]) -> str:
    """--wandb beats WANDB_MODE beats offline."""
    mode = cli_value or os.environ.get("WANDB_MODE") or "offline"
    if mode not in MODES:
        raise ValueError(f"--wandb / WANDB_MODE: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


class TrialRun:
    """A W&B run for one trial; `with TrialRun(...) as run: run.log(...); run.summary(...)`."""

    def __init__(self, mode: str, project: str, group: str, job_type: str, name: str, tags: Iterable[str],
                 config: Dict[str, Any], directory: Path):
        self.mode, self.project, self.group, self.job_type = mode, project, group, job_type
        self.name, self.tags, self.config, self.directory = name, list(tags), config, Path(directory)
        self.run = None

    def __enter__(self) -> "TrialRun":
        if self.mode == "disabled":
            return self
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=self.project, group=self.group, job_type=self.job_type, name=self.name,
                      tags=[t[:64] for t in self.tags], config=self.config, dir=str(self.directory),
                      reinit="finish_previous")
        try:
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
        except Exception as error:  # online without a network: keep the record offline instead of failing
            print(f"tafm: W&B {self.mode} init failed ({type(error).__name__}: {error}); logging offline instead")
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        return self

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if _is_number(v)}, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                if _is_number(value) or isinstance(value, str):
                    self.run.summary[key] = value

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if exc_type is None else 1)
            self.run = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_table(mode: str, project: str, group: str, name: str, frame, directory: Path, images: Dict[str, Path] = None) -> None:
    """One run (job_type `report`) holding a `wandb.Table` of the frame and optional plots as images."""
    if mode == "disabled" or frame is None or len(frame) == 0:
        return
    import wandb

    with TrialRun(mode, project, group, "report", name, [], {}, directory) as tracked:
        payload = {"results": wandb.Table(dataframe=frame.astype(str))}
        for key, path in (images or {}).items():
            payload[key] = wandb.Image(str(path))
        tracked.run.log(payload)


def sync_command(directory: Path) -> Optional[str]:
    """The command that uploads this directory's offline runs, or None when there are none."""
    runs = sorted(glob.glob(str(Path(directory) / "wandb" / "offline-run-*")))
    return f"wandb sync {' '.join(runs)}" if runs else None


def read_offline_run(run_dir: Path) -> Dict[str, Any]:
    """Read back an offline run file (LevelDB-style log of protobuf records): run info, config, summary."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("run-*.wandb"))
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(chunk)
            chunk = b""
        elif kind == 0:
            break
    out: Dict[str, Any] = {"config": {}, "summary": {}}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags))
            out["config"].update({i.key: i.value_json for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: i.value_json for i in record.config.update})
        elif kind == "summary":
            out["summary"].update({i.key: i.value_json for i in record.summary.update})
    return out
