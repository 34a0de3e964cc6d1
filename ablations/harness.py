"""Run a suite as one Optuna study: every grid point (x seed) exactly once, across workers and reruns.

- Grid points are enqueued once (under a lock) as WAITING trials carrying their key; workers pop
  them with `study.ask()`, which the RDB storage hands to exactly one worker.
- A trial whose process died (same host, pid gone; or a stale heartbeat from another machine) is
  marked FAIL on the next run and its key enqueued again, up to `MAX_RETRIES` times; so is a trial
  that raised an unexpected error.
- A trial that raised a `UserError` (a bad config, a data root or file the user must fix) stops the
  suite at once with that error: it is recorded as FAIL with `user_error`, and never counts as a try.
- Rerunning a suite skips every key that is COMPLETE (or PRUNED).
- After every trial the suite's results table (runs/<suite>/results.csv) is rewritten, atomically,
  from the study's records (user attributes): the only source the reports read.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import optuna
import pandas as pd
from filelock import FileLock
from optuna.trial import TrialState

from ablations.config import SPEED_KEYS, UserError, parse_override
from ablations.console import stdout_closed
from ablations.records import TrialRecord, from_trial, write_results
from ablations.records import records_frame as to_frame
from ablations.suite import Suite, TrialPoint

MAX_RETRIES = 3
HEARTBEAT_S = 30
GRACE_S = 180
SEARCH_SEED = 0  # a search's trial n samples with seed SEARCH_SEED + n (search_sampler)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class RunOptions:
    runs_dir: Path = Path("runs")
    storage: Optional[str] = None  # default: sqlite:///runs/<suite>/optuna.db
    profile: str = "synthetic"
    seeds: int = 1
    overrides: List[str] = field(default_factory=list)
    max_trials: Optional[int] = None  # stop this worker after N trials (tests, budgets)


@dataclass
class TrialContext:
    """What a trial function gets besides its config."""

    suite: Suite
    key: str
    point: Optional[TrialPoint]
    seed: int
    labels: Dict[str, str]
    run_dir: Path
    trial: optuna.trial.Trial
    options: RunOptions


TrialFn = Callable[[Any, TrialContext], Dict[str, Any]]


def suite_dir(suite: Suite, options: RunOptions) -> Path:
    return options.runs_dir / suite.name


def study_name(suite: Suite, options: RunOptions) -> str:
    return f"{suite.name}-{options.profile}"


def storage_url(suite: Suite, options: RunOptions) -> str:
    if options.storage:
        return options.storage
    path = suite_dir(suite, options) / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def search_sampler(trial_number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded by the trial it samples: each of a search's workers is a process with its own sampler,
    and samplers seeded alike drew the same points in every worker (the search's first two trials were
    one point twice); seeded by trial number, a rerun draws the same points and workers draw different ones."""
    return optuna.samplers.TPESampler(seed=SEARCH_SEED + trial_number)


def open_study(suite: Suite, options: RunOptions) -> optuna.Study:
    """Create or load the suite's study; creation is serialised (two workers may start at once)."""
    url = storage_url(suite, options)
    kwargs = {} if url.startswith("sqlite") else {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
    sampler = search_sampler(0) if suite.search else None
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3) if suite.search else optuna.pruners.NopPruner()
    with FileLock(suite_dir(suite, options) / "create.lock"), _server_creation_lock(url):
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
        return optuna.create_study(study_name=study_name(suite, options), storage=storage, load_if_exists=True,
                                   direction=suite.direction, sampler=sampler, pruner=pruner)


# Any fixed 63-bit number: the advisory lock that serialises schema creation on a PostgreSQL server.
_SCHEMA_LOCK_KEY = 0x7461666D_736368  # "tafmsch"


@contextlib.contextmanager
def _advisory_lock(engine: Any, key: int) -> Iterator[None]:
    """A PostgreSQL session-level advisory lock, held on one connection for the duration of the block."""
    from sqlalchemy import text

    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


@contextlib.contextmanager
def _server_creation_lock(url: str) -> Iterator[None]:
    """Workers on other machines share no file lock: on PostgreSQL, take a server-side one.

    Without it two workers starting at once on a fresh database both run Optuna's CREATE TYPE /
    CREATE TABLE, and the loser dies with a UniqueViolation on ``studydirection``.
    """
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with _advisory_lock(engine, _SCHEMA_LOCK_KEY):
            yield
    finally:
        engine.dispose()


def _engine_kwargs(url: str) -> dict:
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


@contextlib.contextmanager
def study_lock(suite: Suite, options: RunOptions, study: optuna.Study) -> Iterator[None]:
    """Serialise enqueueing across workers: a file lock for SQLite, an advisory lock for PostgreSQL."""
    url = storage_url(suite, options)
    if url.startswith("postgresql"):
        key = int.from_bytes(study_name(suite, options).encode()[:8].ljust(8, b"\0"), "big") & 0x7FFFFFFFFFFFFFFF
        storage = study._storage  # optuna wraps the RDBStorage in a cache: the engine is on the backend
        engine = getattr(storage, "engine", None) or storage._backend.engine  # type: ignore[attr-defined]
        with _advisory_lock(engine, key):
            yield
        return
    with FileLock(suite_dir(suite, options) / f"{study_name(suite, options)}.lock"):
        yield


def grid_keys(suite: Suite, options: RunOptions) -> Dict[str, tuple]:
    """key -> (point, seed) for every trial the grid asks for."""
    seeds = max(options.seeds, suite.seeds)
    return {f"{p.point_id}-s{s}": (p, s) for p in suite.points for s in range(seeds)}


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials whose worker is gone as FAIL, so their key is retried."""
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") == host and not pid_alive(int(attrs.get("pid", -1))):
            study._storage.set_trial_user_attr(trial._trial_id, "error", "worker died (killed or crashed)")  # type: ignore[attr-defined]
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # type: ignore[attr-defined]
            recovered += 1
    optuna.storages.fail_stale_trials(study)  # workers on other hosts: stale heartbeat (no-op without one)
    return recovered


def enqueue_missing(study: optuna.Study, keys: Dict[str, tuple], grid_index: Optional[Dict[str, int]] = None) -> List[str]:
    """Enqueue every key with no COMPLETE/PRUNED/RUNNING/WAITING trial and fewer than MAX_RETRIES failures, in
    the order of `keys`; each carries its `grid_index` (its place in the grid, for the records) if given."""
    by_key: Dict[str, List[TrialState]] = {}
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if "key" in attrs and is_try(attrs):
            by_key.setdefault(attrs["key"], []).append(trial.state)
    enqueued = []
    for key in keys:
        states = by_key.get(key, [])
        live = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING}
        if any(s in live for s in states) or states.count(TrialState.FAIL) >= MAX_RETRIES:
            continue
        attrs = {"key": key, **({"grid_index": grid_index[key]} if grid_index and key in grid_index else {})}
        study.enqueue_trial({}, user_attrs=attrs, skip_if_exists=False)
        enqueued.append(key)
    return enqueued


def is_try(attrs: Dict[str, Any]) -> bool:
    """Whether a failed trial counts towards its key's MAX_RETRIES: not a user's mistake (the suite stops), not
    a claim discarded unrun, not a run interrupted by the user (Ctrl-C or SIGTERM). A worker that died
    (killed, crashed, out of memory) does count: the same death would come again."""
    return not (attrs.get("user_error") or attrs.get("discarded") or attrs.get("interrupted"))


def _claim(study: optuna.Study) -> Optional[optuna.trial.Trial]:
    """Pop one WAITING trial; None when there is none (a trial created by a lost race is discarded)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    trial = study.ask()
    if "key" not in trial.user_attrs:  # another worker took the last waiting trial first
        _discard(study, trial)
        return None
    _own(trial)
    return trial


def _discard(study: optuna.Study, trial: optuna.trial.Trial) -> None:
    """End a claimed trial that is not this worker's to run: FAIL marked `discarded`, which counts as no try."""
    trial.set_user_attr("discarded", True)
    study.tell(trial, state=TrialState.FAIL)


def _own(trial: optuna.trial.Trial) -> None:
    """Record which worker holds a RUNNING trial, at once: a worker that dies at any point after the
    claim is then found by `recover_dead_trials` and its key retried."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class SuitePace:
    """When this worker started and how many of the suite's trials were done then: the ETA is the
    suite's own rate since (every worker's trials), so parallel workers and shared stages count."""

    start: float = field(default_factory=time.time)
    done_at_start: Optional[float] = None  # the work done then (trials, or Work units with a cost)


@dataclass(frozen=True)
class Work:
    """What a trial will train, in any one unit across a suite (e.g. control stage-2 steps): its own stages, and
    a stage it may share with other trials (stage 1) by name, counted once for all of them. A stage already
    cached counts 0. The grid is handed out by `own`, longest first; the ETA is work left at the work rate."""

    own: float
    shared: Optional[Tuple[str, float]] = None


def eta_seconds(elapsed: float, done: float, done_at_start: float, total: float) -> Optional[float]:
    """Seconds left at the rate work (trials, or Work units) was done since this worker started; None before
    any is done."""
    finished = done - done_at_start
    return elapsed / finished * (total - done) if finished > 0 and done < total else None


def suite_progress(study: optuna.Study, points: "GridPoints | SearchPoints", pace: SuitePace) -> str:
    """"k/n trials done, ETA ...": for a grid with a cost (`GridPoints.work`) the ETA weighs each trial by its
    work, so trials that trained a shared stage 1 and trials whose stages were cached do not skew it."""
    done_keys = [t.user_attrs["key"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                 if "key" in t.user_attrs]
    done, total = len(done_keys), points.total
    measured = isinstance(points, GridPoints) and points.work is not None
    amount = points.amount(done_keys) if measured else float(done)
    whole = points.amount(points.keys) if measured else float(total)
    if pace.done_at_start is None:
        pace.done_at_start = amount
    line = f"{done}/{total} trials done"
    eta = eta_seconds(time.time() - pace.start, amount, pace.done_at_start, whole)
    if eta is not None:
        line += f", ETA {_format_eta(eta)}"
    return line


def _run_one(study: optuna.Study, trial: optuna.trial.Trial, ctx: TrialContext, cfg: Any, trial_fn: TrialFn) -> None:
    """Run one trial and tell the study; an unexpected error is recorded (and retried later), a
    UserError is recorded and raised: the suite stops at once."""
    start = time.time()
    try:
        result = trial_fn(cfg, ctx)
        value = _suite_metric(ctx, result)
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("record", _record(ctx, cfg, {"pruned": str(pruned)}, time.time() - start))
        study.tell(trial, state=TrialState.PRUNED)
        return
    # Ctrl-C, SIGTERM (the CLI raises it) or the output closed (`tafm run quick | head`): retried, not a try
    except (KeyboardInterrupt, SystemExit, BrokenPipeError) as stop:
        if isinstance(stop, BrokenPipeError) and not stdout_closed():  # another pipe broke: a failed trial
            _failed_trial(ctx, study, trial, stop)
            return
        trial.set_user_attr("error", "interrupted")
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(stop, SystemExit):  # Lightning's fit() turns an interrupt into sys.exit(1)
            raise KeyboardInterrupt from stop
        raise
    except UserError as error:
        _fail(study, trial, error, user_error=True)
        raise
    except Exception as error:  # a failed trial must not stop the suite; it is retried up to MAX_RETRIES times
        _failed_trial(ctx, study, trial, error)
        return
    trial.set_user_attr("record", _record(ctx, cfg, result, time.time() - start))
    study.tell(trial, value)


def _failed_trial(ctx: TrialContext, study: optuna.Study, trial: optuna.trial.Trial, error: BaseException) -> None:
    """An unexpected error: recorded as a try (retried up to MAX_RETRIES times) and said; the suite goes on."""
    _fail(study, trial, error, user_error=False)
    print(f"[{ctx.suite.name}] trial {ctx.key} failed: {type(error).__name__}: {error_line(error)}", flush=True)


def _suite_metric(ctx: TrialContext, result: Dict[str, Any]) -> float:
    """The value the study optimises; a suite metric the trial does not produce is the suite's mistake."""
    value = result.get(ctx.suite.metric)
    if value is None:
        names = sorted(k for k, v in result.items() if isinstance(v, (int, float)) and "/ap/" not in k)
        raise UserError(f"{ctx.suite.source or ctx.suite.name}: the suite's metric {ctx.suite.metric!r} is not among "
                        f"trial {ctx.key}'s metrics; valid: {', '.join(names)}")
    return float(value)


def error_line(error: BaseException) -> str:
    """The error's message on one line; for one re-raised from a DataLoader worker (whose message is the
    worker's whole traceback), the worker's own message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


def _fail(study: optuna.Study, trial: optuna.trial.Trial, error: BaseException, user_error: bool) -> None:
    trial.set_user_attr("error", f"{type(error).__name__}: {error_line(error)}")
    if user_error:
        trial.set_user_attr("user_error", True)
    study.tell(trial, state=TrialState.FAIL)


def _record(ctx: TrialContext, cfg: Any, metrics: Dict[str, Any], wall_time: float) -> Dict[str, Any]:
    from ablations.provenance import provenance
    from ablations.config import to_flat_dict

    return {"key": ctx.key, "seed": ctx.seed, "labels": ctx.labels, "metrics": metrics,
            "config": to_flat_dict(cfg), "wall_time_s": round(wall_time, 2), **provenance()}


def study_records(study: optuna.Study) -> List[TrialRecord]:
    """One record per finished trial (complete or pruned), from the study's user attributes; a grid's in grid
    order (workers take the longest trials first, so the order they finish in is not the table's), then as run."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    trials = sorted(trials, key=lambda t: (t.user_attrs.get("grid_index", float("inf")), t.number))
    return [from_trial(t.number, t.state.name, t.value, t.user_attrs["record"]) for t in trials if t.user_attrs.get("record")]


def records_frame(study: optuna.Study) -> pd.DataFrame:
    """The study's records as the results table (one row per finished trial)."""
    return to_frame(study_records(study))


def write_records(study: optuna.Study, path: Path) -> List[TrialRecord]:
    """Rewrite the suite's results table from the study; returns the records."""
    records = study_records(study)
    write_results(records, path)
    return records


@dataclass
class _Claimed:
    """A claimed trial, ready to run: its context and its config delta."""

    ctx: TrialContext
    delta: Dict[str, Any]


class GridPoints:
    """Hands out the suite's grid (x seeds): every key exactly once, a dead worker's key again."""

    def __init__(self, suite: Suite, options: RunOptions, study: optuna.Study, log: Callable[[str], None],
                 cost: Optional[Callable[[Dict[str, Any]], Work]] = None):
        self.suite, self.options, self.study, self.log = suite, options, study, log
        self.keys = grid_keys(suite, options)
        self.grid_index = {key: i for i, key in enumerate(self.keys)}
        self.work: Optional[Dict[str, Work]] = None
        if cost is not None:
            self.work = {key: cost({**suite.delta(options.profile, point.overrides), "seed": seed})
                         for key, (point, seed) in self.keys.items()}
            own: Dict[str, List[float]] = {}
            for key, (point, _) in self.keys.items():
                own.setdefault(point.point_id, []).append(self.work[key].own)
            self.keys = longest_first(self.keys, lambda point: sum(own[point.point_id]) / len(own[point.point_id]))
        self.total = len(self.keys)

    def amount(self, keys: Iterable[str]) -> float:
        """The work of these trials (of this grid): their own stages, and each stage they share once."""
        chosen = [self.work[key] for key in keys if key in self.work] if self.work is not None else []
        shared = {work.shared for work in chosen if work.shared is not None}
        return sum(work.own for work in chosen) + sum(cost for _, cost in shared)

    def claim(self) -> Optional[optuna.trial.Trial]:
        recovered = recover_dead_trials(self.study)
        if recovered:
            self.log(f"[{self.suite.name}] {recovered} interrupted trial(s) will be retried")
        enqueue_missing(self.study, self.keys, self.grid_index)
        trial = _claim(self.study)
        while trial is not None and trial.user_attrs["key"] not in self.keys:
            # enqueued by a run of this study with more seeds (or grid points): left to such a run, not a try
            self.log(f"[{self.suite.name}] trial {trial.user_attrs['key']} is not one of this run's "
                     f"{len(self.keys)} (another --seeds?): skipped, a run with it re-queues it")
            _discard(self.study, trial)
            trial = _claim(self.study)
        return trial

    def prepare(self, trial: optuna.trial.Trial) -> _Claimed:
        key = trial.user_attrs["key"]
        point, seed = self.keys[key]
        run_dir = suite_dir(self.suite, self.options) / "trials" / key
        ctx = TrialContext(self.suite, key, point, seed, point.labels, run_dir, trial, self.options)
        return _Claimed(ctx, {**self.suite.delta(self.options.profile, point.overrides), "seed": seed})


def longest_first(keys: Dict[str, tuple], cost: Callable[[TrialPoint], float]) -> Dict[str, tuple]:
    """`keys` with the points of the largest `cost` first (grid order among equals), each point's seeds
    together: workers claim the longest trials first, so the suite does not end on one long trial while
    the other workers have nothing left to run."""
    costs: Dict[str, float] = {}
    for point, _ in keys.values():
        if point.point_id not in costs:
            costs[point.point_id] = cost(point)
    return dict(sorted(keys.items(), key=lambda item: -costs[item[1][0].point_id]))


class SearchPoints:
    """TPE over the suite's search space until `search.trials` trials are finished (across workers)."""

    def __init__(self, suite: Suite, options: RunOptions, study: optuna.Study, log: Callable[[str], None]):
        self.suite, self.options, self.study = suite, options, study
        self.total = int(suite.search["trials"])
        self.failed_before = _failures(study)

    def claim(self) -> Optional[optuna.trial.Trial]:
        recover_dead_trials(self.study)
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        done = [t for t in self.study.get_trials(deepcopy=False) if t.state in live]
        if len(done) >= self.total or _failures(self.study) - self.failed_before >= MAX_RETRIES:  # failing again and again
            return None
        trial = self.study.ask()
        trial.set_user_attr("key", f"search-{trial.number:04d}")
        _own(trial)
        return trial

    def prepare(self, trial: optuna.trial.Trial) -> _Claimed:
        key = trial.user_attrs["key"]
        self.study.sampler = search_sampler(trial.number)  # the study's sampler is the one trial.suggest_* uses
        params = _suggest(trial, self.suite.search["space"])
        labels = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in params.items()}
        ctx = TrialContext(self.suite, key, None, 0, labels, suite_dir(self.suite, self.options) / "trials" / key,
                           trial, self.options)
        return _Claimed(ctx, {**self.suite.delta(self.options.profile, params), "seed": 0})


#: --set keys a resumed study may be given other values of (every other override must be its first run's): the
#: speed keys, and NHWC, which keeps the maths but is hashed as NCHW for the stages cached before it (runner)
RESUMABLE_KEYS = (*SPEED_KEYS, "train.channels_last")
INPUTS_ATTR = "overrides"
SETTINGS_ATTR = "suite_settings"
EVALUATE_ATTR = "suite_evaluate"


def _measured_overrides(overrides: List[str]) -> Dict[str, Any]:
    """{key: parsed value} of the overrides that change what trials measure (the last value of a repeated key;
    parsed as the config parses them, so `train.lr=1e-3` and `train.lr=0.001` are one setting)."""
    pairs = (parse_override(item) for item in overrides)
    return {key: value for key, value in pairs if key not in RESUMABLE_KEYS}


def _suite_settings(suite: Suite, profile: str) -> Dict[str, Any]:
    """What every trial of the suite's profile shares (its base, its profile block and the recipe defaults
    under it) less the speed keys, as JSON stores it (a study attribute round-trips through JSON)."""
    return _as_stored({key: value for key, value in suite.delta(profile).items() if key not in RESUMABLE_KEYS})


def _as_stored(value: Any) -> Any:
    """`value` as a study attribute gives it back (it round-trips through JSON), to compare with a stored one."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _shown(pairs: Dict[str, Any]) -> str:
    return ", ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                     for key, value in sorted(pairs.items())) or "none"


def _changed(stored: Dict[str, Any], given: Dict[str, Any]) -> str:
    """`key: old -> new` for each key whose value differs (`unset` where one side lacks it)."""
    def shown(pairs: Dict[str, Any], key: str) -> str:
        return json.dumps(pairs[key]) if key in pairs else "unset"
    return "; ".join(f"{key}: {shown(stored, key)} -> {shown(given, key)}"
                     for key in sorted(set(stored) | set(given)) if stored.get(key, ...) != given.get(key, ...))


def check_settings(study: optuna.Study, suite: Suite, options: RunOptions) -> None:
    """A study's records are of the settings it first ran with: resuming it with other --set / --data-root
    values, or after its suite file's base or profile (or the recipe defaults under them) or its `evaluate:` block
    changed, would report its finished trials as this run's (their keys are the grid's, not the settings'). The
    first run stores them on the study; a later one with others is a UserError. A study made before a check existed
    has nothing stored for it: it takes this run's (what it ran with before cannot be known)."""
    def refused(ran_with: str, to_resume: str) -> UserError:
        return UserError(f"{storage_url(suite, options)}: study {study.study_name!r} was run with {ran_with}: its "
                         f"finished trials would be reported as this run's. {to_resume}, another --runs-dir (or "
                         f"--storage) for the new settings, or remove {suite_dir(suite, options)} to start again")

    checks = (
        (INPUTS_ATTR, _measured_overrides(options.overrides),
         lambda stored, now: f"the overrides [{_shown(stored)}], this run gives [{_shown(now)}]",
         "Give the same --set / --data-root to resume it"),
        (SETTINGS_ATTR, _suite_settings(suite, options.profile),
         lambda stored, now: f"other settings than suite {suite.name!r} ({suite.source}) now gives its "
                             f"{options.profile!r} profile ({_changed(stored, now)}; the suite file's base or profile "
                             f"block, or the recipe defaults in ablations/suite.py PROFILE_DEFAULTS)",
         "Restore those settings to resume it"),
        # a finished trial was scored with the evaluations its suite asked for then: it lacks a new p's column
        (EVALUATE_ATTR, _as_stored(suite.evaluate),
         lambda stored, now: f"other evaluations than suite {suite.name!r} ({suite.source}) now asks for (its "
                             f"`evaluate:` block: {_changed(stored, now)}; a finished trial is not scored again, and "
                             f"a new study scores the stages cached in the runs folder without training them)",
         "Restore the `evaluate:` block to resume it"),
    )
    for attr, now, ran_with, to_resume in checks:
        stored = study.user_attrs.get(attr)
        if stored is None:
            study.set_user_attr(attr, now)
        elif stored != now:
            raise refused(ran_with(stored, now), to_resume)


def run_study(suite: Suite, options: RunOptions, trial_fn: TrialFn, make_config: Callable[[Dict[str, Any]], Any],
              log: Callable[[str], None] = print,
              cost: Optional[Callable[[Dict[str, Any]], Work]] = None) -> List[TrialRecord]:
    """Claim and run trials (the grid's points, or TPE's) until none is left or `options.max_trials`
    are done; returns the records of every finished trial of the study. `cost` (a grid trial's config
    delta, seed included -> its `Work`) orders the grid longest first and weighs the ETA."""
    study = open_study(suite, options)
    check_settings(study, suite, options)
    points = SearchPoints(suite, options, study, log) if suite.search else GridPoints(suite, options, study, log, cost)
    results = suite_dir(suite, options) / "results.csv"
    pace = SuitePace()
    finished = 0
    while options.max_trials is None or finished < options.max_trials:
        with study_lock(suite, options, study):
            trial = points.claim()
        if trial is None:
            break
        claimed = points.prepare(trial)
        cfg = _trial_config(study, trial, make_config, claimed.delta)
        _run_and_record(study, trial, claimed.ctx, cfg, trial_fn, pace, points, results, log)
        finished += 1
    return write_records(study, results)


run_grid = run_search = run_study  # the suite says which: a `search:` block or a grid


def _trial_config(study: optuna.Study, trial: optuna.trial.Trial, make_config: Callable[[Dict[str, Any]], Any],
                  delta: Dict[str, Any]) -> Any:
    """The claimed trial's config; a bad one (e.g. a sampled search point) fails the trial, not leaves it RUNNING."""
    try:
        return make_config(delta)
    except UserError as error:
        _fail(study, trial, error, user_error=True)
        raise


def _run_and_record(study: optuna.Study, trial: optuna.trial.Trial, ctx: TrialContext, cfg: Any, trial_fn: TrialFn,
                    pace: SuitePace, points: "GridPoints | SearchPoints", results: Path,
                    log: Callable[[str], None]) -> None:
    """Run one claimed trial, then rewrite the records and report suite progress."""
    log(f"[{ctx.suite.name}] trial {ctx.key} {ctx.labels} seed {ctx.seed}: starting "
        f"({suite_progress(study, points, pace)})")
    _run_one(study, trial, ctx, cfg, trial_fn)
    write_records(study, results)
    log(f"[{ctx.suite.name}] {suite_progress(study, points, pace)}")


def failed_keys(study: optuna.Study, keys: Dict[str, tuple]) -> List[str]:
    """Keys that never completed after MAX_RETRIES failures."""
    done = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
    return [k for k in keys if k not in done]


def first_failure(study: optuna.Study) -> Optional[str]:
    """'trial KEY: ERROR' of the earliest failed trial of a key that never finished: the first thing to fix."""
    done = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        key, error = trial.user_attrs.get("key"), trial.user_attrs.get("error")
        if key and error and key not in done and not trial.user_attrs.get("discarded"):
            return f"trial {key}: {error}"
    return None


def _failures(study: optuna.Study) -> int:
    """Failed trials that count as tries (`is_try`)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if "key" in t.user_attrs and is_try(t.user_attrs))


def _suggest(trial: optuna.trial.Trial, space: Dict[str, Any]) -> Dict[str, Any]:
    """Sample a search space: {low, high[, log]} floats, {low, high, int: true} ints, {choices: [...]}."""
    values: Dict[str, Any] = {}
    for key, spec in space.items():
        if "choices" in spec:
            labels = [json.dumps(c) for c in spec["choices"]]  # Optuna categoricals must be scalars
            values[key] = json.loads(trial.suggest_categorical(key, labels))
        elif spec.get("int"):
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values
