"""User errors end in one clear line naming the key, the bad value and what is valid."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ablations.cli import main


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.alpha=0", ["model.alpha", "> 0", "0.0"]),
        ("model.alpha=-0.5", ["model.alpha", "> 0"]),
        ("model.recurrent.after=[conv13,fm9]", ["model.recurrent.after", "'fm9'", "conv3, conv13, fm1"]),
        ("model.recurrent.type=rnn", ["model.recurrent.type", "'rnn'", "bottleneck_lstm"]),
        ("model.alpah=1", ["unknown config key 'model.alpah'", "model.alpha"]),
        ("model.input_size=300", ["model.input_size", "multiple of 32", "300"]),
        ("model.input_size=0", ["model.input_size", "multiple of 32"]),
        ("alpha", ["not key=value"]),
    ],
)
def test_user_error_is_one_line(capsys, override, expected):
    assert main(["cost", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tafm: error:") and "\n" not in err
    for text in expected:
        assert text in err


def test_no_traceback_from_console_script():
    proc = subprocess.run([sys.executable, "-m", "ablations.cli", "cost", "--set", "model.recurrent.type=rnn"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "model.recurrent.type" in proc.stderr
