"""A record's commit is marked +dirty only when code differs from it, not docs or regenerated reports."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from ablations.provenance import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_only_code_changes_mark_the_commit_dirty(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "reports" / "quick").mkdir(parents=True)
    files = {"pkg/model.py": "x = 1\n", "README.md": "# r\n", "reports/quick/strip.png": "png",
             "pkg/suite.yaml": "a: 1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    clean = git_commit(tmp_path / "pkg")
    assert clean and len(clean) == 40
    (tmp_path / "README.md").write_text("# edited\n")
    (tmp_path / "reports" / "quick" / "strip.png").write_text("another picture")
    (tmp_path / "pkg" / "notes.py").write_text("untracked = True\n")
    assert git_commit(tmp_path / "pkg") == clean
    (tmp_path / "pkg" / "suite.yaml").write_text("a: 2\n")
    assert git_commit(tmp_path / "pkg") == clean + "+dirty"
    assert git_commit(tmp_path.parent / "nowhere") is None
