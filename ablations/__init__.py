"""ablations package: suites, the study that runs them, and one typed record per trial.

`run_suite` (ablations/pipeline.py) is imported on first use: `import ablations` stays light.
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "run_suite":
        from ablations.pipeline import run_suite

        return run_suite
    raise AttributeError(f"module 'ablations' has no attribute {name!r}")
