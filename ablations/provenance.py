"""What a record needs to be reproduced: git commit, package versions, machine."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("tafm", "torch", "pytorch-lightning", "optuna", "omegaconf", "fvcore", "wandb", "numpy", "pandas")


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """{git_commit, versions, machine} of this process (cached: it does not change during a run)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    machine = f"{platform.node()} {platform.machine()} {platform.processor() or ''} python {platform.python_version()}"
    return {"git_commit": commit, "versions": versions, "machine": machine.strip()}
