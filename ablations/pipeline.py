"""`run_suite`: a whole suite as one call (check, run the study, measure the extras, write the report).

    >>> from ablations import run_suite
    >>> records = run_suite("quick", seeds=3, workers=2)
    >>> records[0].metric("val/vid_map50")

The `tafm run` command only parses its arguments and calls this.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ablations.suite import Suite

if TYPE_CHECKING:  # records bring pandas: not loaded before the preflight checks
    from ablations.records import TrialRecord

Log = Callable[[str], None]
LIBRARY_LOG = "libraries.log"  # library warnings and C++ output of a quiet run, per suite
SESSIONS = "sessions.jsonl"  # one line per `tafm run` of a suite: when, how long, workers, seeds, commit
OPEN_SESSIONS = "sessions.open"  # a running (or killed) `tafm run`: its clock, rewritten every HEARTBEAT_S
HEARTBEAT_S = 30.0


@dataclass
class SuiteRequest:
    """Everything `run_suite` is asked; `argv` are the same as `tafm run` arguments, for helper workers."""

    suite: str
    overrides: List[str] = field(default_factory=list)
    seeds: int = 1
    storage: Optional[str] = None
    workers: int = 1
    runs_dir: Path = Path("runs")
    profile: str = "synthetic"
    data_root: Optional[str] = None
    wandb: Optional[str] = None
    report_dir: Path = Path("reports")
    max_trials: Optional[int] = None
    verbose: bool = False  # library output on the terminal instead of runs/<suite>/libraries.log

    def argv(self) -> List[str]:
        args = ["run", self.suite, "--runs-dir", str(self.runs_dir), "--profile", self.profile,
                "--seeds", str(self.seeds), "--report-dir", str(self.report_dir)]
        for key, value in (("--storage", self.storage), ("--data-root", self.data_root), ("--wandb", self.wandb),
                           ("--max-trials", self.max_trials)):
            if value is not None:
                args += [key, str(value)]
        for override in self.overrides:
            args += ["--set", override]
        return args + (["--verbose"] if self.verbose else [])


def preflight(request: SuiteRequest) -> Tuple[Suite, List[str]]:
    """Everything a user can get wrong, checked once before any heavy import, study or training:
    arguments, the suite, every trial's config, the storage URL, the data roots. Returns (suite, overrides)."""
    from ablations.preflight import (check_data, check_profile, check_seeds, check_storage, check_workers,
                                     trial_configs)
    from ablations.suite import load_suite

    check_seeds(request.seeds)
    check_workers(request.workers)
    check_profile(request.profile, request.data_root)
    suite = load_suite(request.suite)
    overrides = list(request.overrides)
    if request.data_root:
        overrides.append(f"data.root={Path(request.data_root).resolve()}")
    configs = trial_configs(suite, request.profile, overrides)
    check_storage(request.storage)
    check_data(configs)
    return suite, overrides


def run_options(request: SuiteRequest, overrides: Optional[List[str]] = None):
    from ablations.harness import RunOptions

    return RunOptions(runs_dir=Path(request.runs_dir), storage=request.storage, profile=request.profile,
                      seeds=request.seeds, overrides=list(request.overrides) if overrides is None else overrides,
                      max_trials=request.max_trials)


def run_suite(name_or_path: str, overrides: Sequence[str] = (), seeds: int = 1, storage: Optional[str] = None,
              workers: int = 1, *, runs_dir: Path = Path("runs"), profile: str = "synthetic",
              data_root: Optional[str] = None, wandb: Optional[str] = None, report_dir: Path = Path("reports"),
              max_trials: Optional[int] = None, verbose: bool = False, log: Log = print) -> List[TrialRecord]:
    """Run (or resume) a suite: every trial not yet recorded, then its extras and its report.
    Returns the records of every finished trial of the suite's study."""
    request = SuiteRequest(name_or_path, list(overrides), seeds, storage, workers, Path(runs_dir), profile,
                           data_root, wandb, Path(report_dir), max_trials, verbose)
    return run_request(request, log=log)


def run_request(request: SuiteRequest, worker_only: bool = False, log: Log = print) -> List[TrialRecord]:
    """`run_suite` of a prepared request; a helper worker (`worker_only`) only runs trials. Library
    output goes to runs/<suite>/libraries.log unless `request.verbose`."""
    suite, overrides = preflight(request)
    from ablations.console import library_log
    from ablations.tracking import resolve_mode

    mode = resolve_mode(request.wandb)
    options = run_options(request, overrides)
    folder = Path(options.runs_dir) / suite.name
    quiet = not request.verbose
    log(f"[{suite.name}] {suite.description}; profile {options.profile}; W&B {mode}; records in {folder}"
        + (f"; library messages in {folder / LIBRARY_LOG} (--verbose shows them)" if quiet and not worker_only else ""))
    if suite.search and options.seeds > 1 and not worker_only:
        log(f"[{suite.name}] a search trains each point TPE samples once, at seed 0: --seeds {options.seeds} "
            "repeats the points of grid suites only")
    helpers = start_workers(request) if request.workers > 1 and not worker_only else []
    try:
        with library_log(folder / LIBRARY_LOG) if quiet else contextlib.nullcontext():
            return _run_and_report(request, suite, options, mode, helpers, worker_only, log)
    finally:
        stop_workers(helpers)  # interrupted or failed before they were joined: they must not go on claiming trials


def _run_and_report(request: SuiteRequest, suite: Suite, options, mode: str, helpers: list, worker_only: bool,
                    log: Log) -> List[TrialRecord]:
    from ablations.tracking import sync_command

    if worker_only:
        return _run_trials(suite, options, mode, [], worker_only, log)[0]
    clock = SessionClock(Path(options.runs_dir) / suite.name, request)
    try:
        records, prepared = _run_trials(suite, options, mode, helpers, worker_only, log)
    finally:
        clock.stop()  # a run that raised or was interrupted keeps its open session: its time still counts
    clock.finish(len(records))
    log(f"[{suite.name}] {len(records)} trial(s) recorded in {Path(options.runs_dir) / suite.name / 'results.csv'}")
    if records:
        run_extras(suite, Path(options.runs_dir), log, prepared)
        run_pictures(suite, records, Path(options.runs_dir), Path(request.report_dir), log)
        report_suites([request.suite], Path(options.runs_dir), Path(request.report_dir), mode, log=log)
        log("\n".join(results_table(records, suite.metric)))
    else:
        shutil.rmtree(Path(options.runs_dir) / suite.name / "extras" / TABLE7_MODELS, ignore_errors=True)
    command = sync_command(Path(options.runs_dir) / suite.name)
    if command and mode == "offline":
        log(f"[{suite.name}] upload the W&B runs with: {command}")
    return records


def _run_trials(suite: Suite, options, mode: str, helpers: list, worker_only: bool,
                log: Log) -> Tuple[List[TrialRecord], Dict[str, Any]]:
    """Every trial of the study run here and by the helpers; with the extras prepared meanwhile."""
    from ablations.harness import open_study, run_study
    from ablations.runner import run_trial, trial_work
    from ablations.suite import trial_config

    # with helper workers, what the extras need that is not a timing is done now, while a helper trains stage 1
    prepared = prepare_extras(suite, Path(options.runs_dir), log) if helpers else {}
    records = run_study(suite, options, lambda cfg, ctx: run_trial(cfg, ctx, mode),
                        lambda delta: trial_config(options.overrides, delta), log=log,
                        cost=lambda delta: trial_work(trial_config(options.overrides, delta), Path(options.runs_dir)))
    lend = trial_config(options.overrides, suite.delta(options.profile)).sweep.lend_idle_cores
    if worker_only:
        if lend:  # this worker's core to the trials the others are still training
            study = open_study(suite, options)
            _lend_until(lambda: not _running_here(study), options)
        return records, prepared
    if helpers:
        if lend:
            _lend_until(lambda: all(helper.poll() is not None for helper in helpers), options)
        records = join_workers(helpers, suite, options)
    return records, prepared


def _lend_until(done, options) -> None:
    from ablations.cores import lend_until
    from ablations.runner import STAGES_DIR

    lend_until(done, Path(options.runs_dir) / STAGES_DIR)


def _running_here(study) -> bool:
    """Whether a worker on this host still runs a trial of the study (a dead one's trial is failed first)."""
    import socket

    from ablations.harness import recover_dead_trials
    from optuna.trial import TrialState

    recover_dead_trials(study)
    host = socket.gethostname()
    return any(t.user_attrs.get("host") == host for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


class SessionClock:
    """The wall clock of one `tafm run` of a suite (start until every trial is recorded, before extras and
    report), for the report's provenance. While it runs, runs/<suite>/sessions.open/<start>-<pid>-<id>.json holds
    the time so far, rewritten every HEARTBEAT_S by a daemon thread: a run killed or interrupted leaves it,
    so its time (to within HEARTBEAT_S) still counts. `finish` appends the whole run to sessions.jsonl and
    removes the open file."""

    def __init__(self, folder: Path, request: SuiteRequest, heartbeat_s: float = HEARTBEAT_S):
        from ablations.provenance import provenance

        self.folder = Path(folder)
        self.started = time.time()
        self.entry = {"started": dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(timespec="seconds"),
                      "wall_s": 0.0, "workers": request.workers, "seeds": request.seeds,
                      "git_commit": provenance().get("git_commit")}
        self.path = self.folder / OPEN_SESSIONS / f"{int(self.started)}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(heartbeat_s,), daemon=True, name="session-clock")
        self._thread.start()

    def _beat(self) -> None:
        self.entry["wall_s"] = round(time.time() - self.started, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entry))
        os.replace(tmp, self.path)

    def _run(self, heartbeat_s: float) -> None:
        while not self._stopped.wait(heartbeat_s):
            self._beat()

    def stop(self) -> None:
        """Stop the heartbeat, with the time so far written: the open file stays until `finish`."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._thread.join()
            self._beat()

    def finish(self, trials: int) -> None:
        self.stop()
        entry = {**self.entry, "trials_recorded": trials}
        with open(self.folder / SESSIONS, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.path.unlink(missing_ok=True)


def results_table(records: Sequence[TrialRecord], metric: str) -> List[str]:
    """The terminal's closing table: one row per trial, its axes, seed and the suite's metric (clean and
    at each occlusion level). The report has every column."""
    from lightning_modules.markdown import markdown_table

    axes = sorted({axis for r in records for axis in r.axes})
    levels = sorted({p for r in records for p in r.occlusions})
    header = [*axes, "seed", metric, *(f"{metric} p={p:g}" for p in levels)]

    def cell(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4g}"

    rows = [[*(r.axes.get(a, "") for a in axes), r.seed, cell(r.metric(metric)), *(cell(r.metric(metric, p)) for p in levels)]
            for r in records]  # in the records' order: a grid's, whatever order its trials ran in
    return markdown_table(header, rows)


def start_workers(request: SuiteRequest) -> list:
    """request.workers - 1 more `tafm run` processes on the same study: each claims grid points as the
    harness hands them out (stage 1 is trained once, under its file lock), so trials use every core."""
    argv = [sys.executable, "-m", "ablations.cli", *request.argv(), "--workers", "1", "--worker-only"]
    return [subprocess.Popen(argv) for _ in range(request.workers - 1)]


def stop_workers(helpers: list, grace_s: float = 5.0, timeout_s: float = 60.0) -> None:
    """End the helper workers still running: a Ctrl-C reaches them too (give them `grace_s` to record their
    interrupted trial), a SIGTERM or an error in this process does not. Each gets SIGTERM, which the CLI turns
    into an interrupt (the trial is recorded, the stage keeps its checkpoint), then SIGKILL after `timeout_s`."""
    running = [helper for helper in helpers if helper.poll() is None]
    if not running:
        return
    deadline = time.time() + grace_s
    while running and time.time() < deadline:
        time.sleep(0.1)
        running = [helper for helper in running if helper.poll() is None]
    for helper in running:
        helper.terminate()
    for helper in running:
        try:
            helper.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


def join_workers(helpers: list, suite: Suite, options) -> List[TrialRecord]:
    """Wait for the helper workers, then the records of every trial they and this one finished."""
    from ablations.harness import open_study, suite_dir, write_records

    for helper in helpers:
        helper.wait()
    return write_records(open_study(suite, options), suite_dir(suite, options) / "results.csv")


def unfinished(request: SuiteRequest) -> Optional[str]:
    """One line on the trials of the suite that did not finish and the first cause, or None when all did."""
    from ablations.harness import MAX_RETRIES, failed_keys, first_failure, grid_keys, open_study
    from ablations.suite import load_suite

    suite = load_suite(request.suite)
    options = run_options(request)
    study = open_study(suite, options)
    if suite.search:
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED"))
        missing, names = suite.search["trials"] - done, ""
    else:
        keys = failed_keys(study, grid_keys(suite, options))
        missing, names = len(keys), f" ({', '.join(keys)})"
    if missing <= 0:
        return None
    cause = first_failure(study)
    why = f"failed {MAX_RETRIES} times; first cause: {cause}" if cause else "still running in another worker"
    return f"{missing} trial(s) of suite {suite.name} not finished{names}: {why}"


TABLE7_MODELS = "table7_models"  # prepare_extras' exports, under runs/<suite>/extras until they are timed


def _extras_folder(suite: Suite, runs_dir: Path) -> Path:
    folder = runs_dir / suite.name / "extras"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _table7_runtime(suite: Suite, log: Log) -> Optional[str]:
    """The runtime the suite's Table 7 is timed in: the one it asks for, else the one installed (None: neither)."""
    from ablations.extras.latency_table import installed

    fmt = suite.extras["table7"]
    if installed(fmt):
        return fmt
    fallback = next((r for r in ("executorch", "onnx") if installed(r)), None)
    if fallback is None:
        log(f"[{suite.name}] Table 7 skipped: neither ExecuTorch nor onnxruntime is installed")
    else:
        log(f"[{suite.name}] {fmt} is not installed (pip install -e '.[mobile]' brings ExecuTorch): "
            f"Table 7 through {fallback}")
    return fallback


def prepare_extras(suite: Suite, runs_dir: Path, log: Log = print) -> Dict[str, Any]:
    """The extras' work that times nothing and needs no trained model (the cost tables; exporting and
    parity-checking Table 7's models and the peak's GEMMs), done while the other workers train: about 40 s
    of the main job's end. A failure here costs nothing: `run_extras` then does that work itself."""
    prepared: Dict[str, Any] = {}
    if not suite.extras:
        return prepared
    folder = _extras_folder(suite, runs_dir)
    try:
        if suite.extras.get("cost_tables"):
            prepared["cost_tables"] = _cost_tables(suite, log)
        if suite.extras.get("table7"):
            from ablations.extras.latency_table import export_table7

            fmt = _table7_runtime(suite, log)
            if fmt is not None:
                log(f"[{suite.name}] exporting paper Table 7's models ({fmt}) while the trials train; timed at the end")
                prepared["table7"] = export_table7(fmt, folder / TABLE7_MODELS)
    except Exception as error:  # noqa: BLE001  the same work runs again at the end, and fails there if it must
        log(f"[{suite.name}] preparing the extras failed ({type(error).__name__}: {error}); they run at the end")
    return prepared


def _cost_tables(suite: Suite, log: Log) -> str:
    from ablations.extras.cost_table import cost_tables

    log(f"[{suite.name}] counting parameters and MACs for paper Tables 3-5 (fvcore)")
    return "## Costs (paper Tables 3-5)\n\n" + cost_tables() + "\n"


def run_extras(suite: Suite, runs_dir: Path, log: Log = print, prepared: Optional[Dict[str, Any]] = None) -> None:
    """The suite's extra measurements, saved as markdown beside its records for the report; what
    `prepare_extras` did already (`prepared`) is not done again."""
    prepared = prepared or {}
    folder = _extras_folder(suite, runs_dir)
    if suite.extras.get("cost_tables"):
        (folder / "1_cost_tables.md").write_text(prepared.get("cost_tables") or _cost_tables(suite, log))
    if suite.extras.get("table7"):
        from ablations.extras.latency_table import table7

        exports = prepared.get("table7")
        fmt = exports.fmt if exports is not None else _table7_runtime(suite, log)
        if fmt is None:
            return
        log(f"[{suite.name}] {'timing' if exports is not None else 'exporting and timing'} paper Table 7's models "
            f"({fmt}, 1 thread, pinned)")
        (folder / "2_table7.md").write_text("## Latency (paper Table 7)\n\n" + table7(fmt, exports=exports).format() + "\n")
        shutil.rmtree(folder / TABLE7_MODELS, ignore_errors=True)  # ~100 MB of untrained models, timed


def run_pictures(suite: Suite, records: Sequence[TrialRecord], runs_dir: Path, report_dir: Path,
                 log: Log = print) -> None:
    """The report's picture of the baseline against the best row (paper Figure 5). A picture that cannot
    be drawn costs one line, never the suite's results."""
    from ablations.extras.pictures import write_strip

    try:
        path = write_strip(records, suite.metric, suite.direction == "maximize", report_dir / suite.name,
                           runs_dir / suite.name / "extras", log)
    except Exception as error:  # the records and the report matter more than the picture
        log(f"[{suite.name}] no picture: {type(error).__name__}: {error}")
        return
    if path is not None:
        log(f"[{suite.name}] drew the baseline and the best row in {path}")


def report_suites(names: Sequence[str], runs_dir: Path, out_dir: Path, mode: str, every: bool = False,
                  log: Log = print) -> List[Path]:
    """Write each suite's report (with `every`, skipping suites without records), then the index of every
    suite's report in out_dir (reports/README.md)."""
    from ablations.records import records_frame
    from ablations.suite import available_suites, load_suite
    from ablations.tracking import log_report
    from reports.tables import ReportError, load_records, write_index, write_report

    written = []
    for name in names:
        suite = load_suite(name)
        try:
            path = write_report(suite.name, suite.table, suite.description, runs_dir, out_dir)
        except ReportError as error:
            if not every:
                raise
            log(f"skipped {name}: {error}")
            continue
        written.append((suite.name, suite.description, path))
        log(f"wrote {path}")
        log_report(mode, suite.name, runs_dir / suite.name, records_frame(load_records(runs_dir, suite.name)), path)
    if written:  # every built-in suite, and a suite from a file (`tafm run PATH.yaml`) just reported
        built_in = available_suites()
        listed = [(name, load_suite(name).description) for name in built_in]
        listed += [(name, description) for name, description, _ in written if name not in built_in]
        log(f"wrote {write_index(listed, out_dir)}")
    return [path for _, _, path in written]
