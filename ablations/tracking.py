"""W&B tracking, offline by default and never blocking without a network. One run per training stage
(`stage_run`: job_type stage1 / stage2 / control, its curves streamed by Lightning's WandbLogger), one
per trial (`TrialRun`: job_type trial, its evaluation, `stage_run_id` naming the stage that trained it),
one per suite invocation (`log_report`: job_type report, the tables and pictures); group = suite.
Tables are built from our own records, not from W&B.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

MODES = ("offline", "online", "disabled")
PROJECT = "tafm"
STAGE_RUN_FILE = "wandb.json"  # in a stage's folder: the id of its W&B run


def resolve_mode(cli_value: Optional[str]) -> str:
    """--wandb beats WANDB_MODE beats offline."""
    mode = cli_value or os.environ.get("WANDB_MODE") or "offline"
    if mode not in MODES:
        raise ValueError(f"--wandb / WANDB_MODE: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


@dataclass(frozen=True)
class Tracking:
    """Where a suite's W&B runs go: the mode, the group (the suite) and the folder (runs/<suite>)."""

    mode: str
    group: str
    directory: Path


def stage_run_id(stage_dir: Path, job_type: str) -> str:
    """A stage's W&B run id: made once (job type, stage hash, a random suffix, so a fresh runs folder
    never resumes an old online run) and kept in the stage's folder, so a resumed stage keeps it."""
    known = recorded_run_id(stage_dir)
    if known is not None:
        return known
    run_id = f"{job_type}-{Path(stage_dir).name}-{secrets.token_hex(3)}"
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    (Path(stage_dir) / STAGE_RUN_FILE).write_text(json.dumps({"id": run_id, "job_type": job_type}))
    return run_id


def recorded_run_id(stage_dir: Optional[Path]) -> Optional[str]:
    """The W&B run id of the stage trained in `stage_dir`, None when it was trained without W&B."""
    path = Path(stage_dir) / STAGE_RUN_FILE if stage_dir is not None else None
    return json.loads(path.read_text())["id"] if path is not None and path.is_file() else None


class TrialRun:
    """A W&B run for one trial; `with TrialRun(...) as run: run.log(...); run.summary(...)`."""

    def __init__(self, mode: str, project: str, group: str, job_type: str, name: str, tags: Iterable[str],
                 config: Dict[str, Any], directory: Path):
        self.mode, self.project, self.group, self.job_type = mode, project, group, job_type
        self.name, self.tags, self.config, self.directory = name, list(tags), config, Path(directory)
        self.run = None

    def __enter__(self) -> "TrialRun":
        if self.mode != "disabled":
            self.run = init_run(self.mode, self.directory, project=self.project, group=self.group,
                                job_type=self.job_type, name=self.name, tags=self.tags, config=self.config)
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


def init_run(mode: str, directory: Path, run_id: Optional[str] = None, console: str = "auto", **kwargs: Any):
    """`wandb.init` beside the other runs of this process (a stage's run opens while nothing else is
    finished); online without a network, it falls back to offline instead of failing or blocking."""
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    kwargs.update(dir=str(directory), reinit="create_new", tags=[t[:64] for t in kwargs.get("tags") or []])
    if run_id is not None:
        kwargs.update(id=run_id, resume="allow" if mode == "online" else None)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True, console=console), **kwargs)
    except Exception as error:  # online without a network: keep the record offline instead of failing
        print(f"tafm: W&B {mode} init failed ({type(error).__name__}: {error}); logging offline instead")
        kwargs.pop("resume", None)
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True, console=console), **kwargs)


@contextlib.contextmanager
def stage_run(tracking: Optional[Tracking], stage_dir: Path, job_type: str, name: str,
              config: Dict[str, Any]) -> Iterator[List[Any]]:
    """A training stage's own W&B run, as the Lightning loggers to train it with (none when disabled):
    Lightning's WandbLogger streams the loss parts, lr, grad norm, frames/s and every validation metric
    against `trainer/global_step`. Its id is kept in the stage's folder (`stage_run_id`), so a resumed
    stage continues the same run (online; offline, `wandb sync` uploads each piece under that id)."""
    if tracking is None or tracking.mode == "disabled":
        yield []
        return
    from pytorch_lightning.loggers import WandbLogger

    run = init_run(tracking.mode, tracking.directory, stage_run_id(stage_dir, job_type), project=PROJECT,
                   group=tracking.group, job_type=job_type, name=name, tags=[job_type], config=config, console="off")
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    try:
        yield [WandbLogger(experiment=run)]
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish(exit_code=0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_report(mode: str, group: str, directory: Path, frame, report: Path) -> None:
    """The suite's view, one run (job_type `report`) per invocation: every record as the `results`
    table, each table of the written report (`report/<heading>`) and every picture in its folder
    (`pictures/<name>`: Figure 4, the detection strip) as images."""
    if mode == "disabled" or frame is None or len(frame) == 0:
        return
    import wandb

    payload = {"results": wandb.Table(dataframe=frame.astype(str))}
    for name, (header, rows) in markdown_tables(Path(report).read_text()).items():
        payload[f"report/{name}"] = wandb.Table(columns=header, data=rows)
    for picture in sorted(Path(report).parent.glob("*.png")):
        payload[f"pictures/{picture.stem}"] = wandb.Image(str(picture))
    with TrialRun(mode, PROJECT, group, "report", f"{group}-report", [], {"suite": group, "report": str(report)},
                  directory) as tracked:
        tracked.run.log(payload)


def markdown_tables(text: str) -> Dict[str, Tuple[List[str], List[List[str]]]]:
    """The markdown tables of a text, each as (header, rows), named after the heading above it (`main`
    under the title; a second table under one heading gets `_2`). Repeated headers get ` (2)`."""
    tables: Dict[str, Tuple[List[str], List[List[str]]]] = {}
    heading, block = "main", []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            name = heading if heading not in tables else f"{heading}_{sum(k.startswith(heading) for k in tables) + 1}"
            tables[name] = (_unique(block[0]), [row + [""] * (len(block[0]) - len(row)) for row in block[2:]])
        block = []
        if line.startswith("## "):
            heading = re.sub(r"[^a-z0-9]+", "_", line[3:].lower()).strip("_")
    return tables


def _unique(header: List[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for name in header:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def sync_command(directory: Path) -> Optional[str]:
    """The command that uploads this directory's offline runs, or None when there are none."""
    runs = sorted(glob.glob(str(Path(directory) / "wandb" / "offline-run-*")))
    return f"wandb sync {' '.join(runs)}" if runs else None


def read_offline_run(run_dir: Path, wait_s: float = 10.0) -> Dict[str, Any]:
    """Read back an offline run file (LevelDB-style log of protobuf records): run info (id, group, job
    type, tags), config, summary and history (one dict per logged row, values as JSON text). W&B's
    service may still be writing the file just after `finish`: it is read again until it holds the exit
    record, for up to `wait_s` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        out = _read_run_file(next(Path(run_dir).glob("run-*.wandb")))
        if out.pop("finished") or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def _read_run_file(path: Path) -> Dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

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
    out: Dict[str, Any] = {"config": {}, "summary": {}, "history": [], "finished": False}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type,
                       tags=list(record.run.tags))
            out["config"].update({i.key: i.value_json for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: i.value_json for i in record.config.update})
        elif kind == "history":
            out["history"].append({_item_key(i): i.value_json for i in record.history.item})
        elif kind == "exit":
            out["finished"] = True
        elif kind == "summary":
            out["summary"].update({_item_key(i): i.value_json for i in record.summary.update})
    return out


def _item_key(item: Any) -> str:
    """A history or summary item's key: `key`, or its `nested_key` parts joined by '/'."""
    return item.key or "/".join(item.nested_key)
