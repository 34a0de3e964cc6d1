"""A quiet terminal: library chatter goes to the run's log file, tafm's own lines stay on the terminal."""
from __future__ import annotations

import logging
import os
import sys
import warnings

from ablations.console import library_log, quiet_libraries


def test_the_onnx_exporter_says_nothing_about_torchvision(capfd):
    quiet_libraries()
    import torch  # noqa: F401  (torch resets `torch.onnx`'s level when imported: the filter must outlive that)
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    ONNXRegistry.from_torchlib()  # what every torch.onnx.export builds first; it warns once per torchvision op
    out, err = capfd.readouterr()
    assert "torchvision" not in out + err


def test_library_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "runs" / "suite" / "libraries.log"
    with library_log(log):
        print("[suite] trial k: val/vid_map50 0.5")  # our progress line
        logging.getLogger("torchao").warning("Failed to load an optional kernel")  # a library's logger
        os.write(2, b"raw C++ write to descriptor 2\n")
        sys.stderr.write("[threadpool.cpp:")  # ExecuTorch's bindings write through sys.stderr, in pieces
        sys.stderr.write("66] Resetting threadpool to 1 threads.\n")
        warnings.warn_explicit("a library deprecation", UserWarning, "site-packages/lib/x.py", 1)
        print("tafm: error: something the user must read", file=sys.stderr)
    out, err = capfd.readouterr()
    assert "val/vid_map50 0.5" in out and "something the user must read" in err
    text = log.read_text()
    for noise in ("Failed to load", "raw C++ write", "Resetting threadpool", "a library deprecation"):
        assert noise in text and noise not in out + err
    os.write(2, b"after the block\n")  # descriptor 2 is back on the terminal
    assert "after the block" in capfd.readouterr().err
