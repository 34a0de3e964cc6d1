"""What `tafm run` checks before it opens a study or trains anything, each once: the arguments, every
trial's config, the storage URL (parsed, then connected) and the data root of every trial (layout, and
frames with annotations in the chosen splits).

A mistake is a `UserError` whose one-line message says what was wrong, where, and what is valid.
Light to import: no torch, Lightning or Optuna, so a bad suite or argument fails in well under 2 s.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from ablations.config import ConfigError, TafmConfig, UserError
from ablations.suite import Suite, trial_config

STORAGE_CONNECT_TIMEOUT_S = 3
STORAGE_EXAMPLES = "sqlite:///PATH.db or postgresql+psycopg2://USER@HOST:5432/DB"


def check_seeds(seeds: int) -> None:
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1 (seeds per grid point), got {seeds}")


def check_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (trials run at once on this machine), got {workers}")


def check_profile(profile: str, data_root: Optional[str]) -> None:
    if profile == "vid" and not data_root:
        raise UserError("--profile vid trains at the paper's settings on ImageNet VID: pass --data-root PATH")


def trial_configs(suite: Suite, profile: str, overrides: List[str]) -> List[TafmConfig]:
    """The config of every grid point (a search suite: its base), so no trial fails later on a bad key."""
    trial_config(overrides, suite.delta(profile))  # a bad --set is named on its own first
    configs = []
    for point in suite.points:
        try:
            configs.append(trial_config(overrides, suite.delta(profile, point.overrides)))
        except ConfigError as error:
            raise ConfigError(f"{error} (grid point {point.labels} of {suite.source})") from None
    return configs


def _storage_url(url: str):
    """The parsed SQLAlchemy URL and its dialect; a bad URL or an unknown database is a UserError."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"--storage {url!r} is not a database URL; valid: {STORAGE_EXAMPLES}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise UserError(f"--storage {url!r}: unknown database {parsed.drivername!r}; valid: {STORAGE_EXAMPLES}") from None
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # SQLAlchemy 2 / 1.4
    except ImportError as error:
        raise UserError(f"--storage {url!r}: the driver of {parsed.drivername!r} is not installed ({error}); "
                        f"for PostgreSQL: pip install psycopg2-binary") from None
    return parsed


def check_storage(url: Optional[str]) -> None:
    """Parse and connect to an Optuna storage URL (None: the suite's own SQLite file, nothing to check)."""
    if url is None:
        return
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    parsed = _storage_url(url)
    shown = parsed.render_as_string(hide_password=True)
    timeout = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": STORAGE_CONNECT_TIMEOUT_S}
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool, connect_args=timeout)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        cause = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UserError(f"--storage {shown}: cannot connect ({cause}); is the server running and the URL right? "
                        f"valid: {STORAGE_EXAMPLES}") from None
    finally:
        engine.dispose()


def _data_roots(configs: List[TafmConfig]) -> List[Tuple[Path, str, TafmConfig, str]]:
    """(root, split, config, the key that names the root) once per distinct root, split, strictness and
    cache of the trials."""
    seen, checks = set(), []
    for cfg in configs:
        # None: the synthetic benchmark, generated, nothing to check; stage 1 may train on its own root
        for root in [r for r in dict.fromkeys((cfg.data.root, cfg.sweep.stage1_data_root)) if r is not None]:
            for split in (cfg.data.train_split, cfg.data.val_split):
                key = (root, split, cfg.data.strict, cfg.data.cache_dir)
                if key not in seen:
                    seen.add(key)
                    checks.append((Path(root), split, cfg,
                                   "data.root" if root == cfg.data.root else "sweep.stage1_data_root"))
    return checks


def check_data(configs: List[TafmConfig]) -> None:
    """Read every trial's data root once (the index is kept for the trials): layout, lists, strict-mode
    files, and at least one frame with an image and a readable annotation in each split."""
    from datamodules.synthetic import MANIFEST, is_synthetic
    from datamodules.vid import VidDataError, VidLayoutError, read_vid

    for cfg in configs:
        root = cfg.data.root
        if cfg.data.synthetic_cue_prob is not None and not is_synthetic(root):
            raise UserError(f"data.synthetic_cue_prob={cfg.data.synthetic_cue_prob}: data.root {root} is not a "
                            f"synthetic dataset (no {MANIFEST}), so it has no twin to generate; valid: unset, or "
                            "a data.root written by `tafm data synth` (or no data.root: the built-in benchmark)")
    for root, split, cfg, key in _data_roots(configs):
        try:
            _, summary = read_vid(root, split, strict=cfg.data.strict, cache_dir=cfg.data.cache_dir, memo=True)
        except VidLayoutError as error:
            raise UserError(f"{key}: {error}") from None
        except VidDataError as error:
            raise UserError(f"data.strict=true stops at the first bad file: {error}; "
                            f"set data.strict=false to skip and count bad files") from None
        if summary.frames == 0:
            skipped = ", ".join(f"{kind.replace('_', ' ')}: {getattr(summary, kind)}"
                                for kind in summary.PROBLEMS if getattr(summary, kind))
            raise UserError(f"{key}: ImageNet VID root {root} has no {split} frame with both an image and a "
                            f"readable annotation (skipped: {skipped or 'nothing listed'}); "
                            f"see the warnings above, fix the files or pass another --data-root")
