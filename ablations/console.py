"""The terminal of `tafm run`: our progress lines on it, library chatter in a log file.

Libraries talk through three channels, and `library_log` sends each to one file for the length of
a run: Python warnings (tafm's own, e.g. a skipped corrupt frame, stay on the terminal), the
logging module (torch's ONNX exporter: `torchvision is not installed. Skipping torchvision::nms`,
torchao's optional kernels), and raw writes to file descriptor 2 from C++ (ExecuTorch's
`[threadpool.cpp:66] Resetting threadpool`, cpuinfo; its Python bindings write those lines through
`sys.stderr`, so lines of that shape are picked out of it too). Our own lines go to stdout, and other
Python-level `sys.stderr` writes (errors) still reach the terminal. `tafm run --verbose` skips all of this.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, TextIO

OUR_PACKAGES = ("ablations", "datamodules", "lightning_modules", "reports")
# loggers that talk on every run; child loggers where the parent's level is reset by its library:
# importing pytorch_lightning resets its top logger to INFO, importing torch resets `torch.onnx`
# (torch._logging) but not the exporter's own module logger
NOISY_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.seed",
                 "torch.onnx._internal.exporter._registration")
NATIVE_LOG_LINE = re.compile(r"^\[[\w./-]+\.(?:cpp|cc|c|h|hpp):\d+\]")  # `[threadpool.cpp:66] ...`


def stdout_closed() -> bool:
    """Whether stdout's reader has gone (a pipe whose read end is closed polls as an error on Linux and macOS), so a
    BrokenPipeError is `tafm run quick | head` and not another pipe (a socket, a child process's pipe); True where it
    cannot be told (no poll, no file descriptor), as every BrokenPipeError was taken before."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def quiet_libraries() -> None:
    """Keep tafm's own lines readable on every command: no Lightning banners or tips, no exporter
    warnings about torchvision, no library deprecation noise. Imports nothing heavy."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    os.environ.setdefault("WANDB_SILENT", "true")


def _ours(category: type, filename: str) -> bool:
    """A warning tafm raised itself (a data problem the user must see), not a library's."""
    if category.__module__.split(".")[0] in OUR_PACKAGES:
        return True
    parts = Path(filename).parts
    return any(p in OUR_PACKAGES for p in parts) and "site-packages" not in parts


@contextlib.contextmanager
def library_log(path: Path) -> Iterator[Path]:
    """Within the block, library output goes to `path` (appended), ours to the terminal."""
    import pytorch_lightning  # noqa: F401  their log handlers bind today's stderr, which becomes the log
    import torch  # noqa: F401

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: tafm {' '.join(sys.argv[1:])}\n")
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        others, root.handlers = root.handlers, [handler]  # propagated records go to the log only
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if _ours(category, filename):
                show(message, category, filename, lineno, file, line)
            else:
                log.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = showwarning
        try:
            with _descriptor_2_to(log) as terminal:
                original, sys.stderr = sys.stderr, _SortedLines(terminal, log)
                lines = sys.stderr
                try:
                    yield path
                finally:
                    lines.close_line()
                    sys.stderr = original
        finally:
            warnings.showwarning = show
            root.handlers = others


@contextlib.contextmanager
def _descriptor_2_to(log: TextIO) -> Iterator[TextIO]:
    """Point file descriptor 2 at `log` (C and C++ writes land there) and give back a stream on the
    terminal's stderr for Python-level writes; descriptor 2 is restored on the way out. When
    sys.stderr is not descriptor 2 (a test's capture), it is given back as it is."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        own = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        own = False
    terminal = (open(saved, "w", buffering=1, closefd=False, encoding=sys.stderr.encoding, errors="backslashreplace")
                if own else sys.stderr)
    os.dup2(log.fileno(), 2)
    try:
        yield terminal
    finally:
        for stream in (terminal, log):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved, 2)
        if own:
            terminal.close()
        os.close(saved)


class _SortedLines:
    """sys.stderr for the block: native libraries' log lines go to the log, every other line to the terminal."""

    def __init__(self, terminal: TextIO, log: TextIO) -> None:
        self.terminal, self.log, self.pending = terminal, log, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._route(line + "\n")
        return len(text)

    def _route(self, text: str) -> None:
        (self.log if NATIVE_LOG_LINE.match(text) else self.terminal).write(text)

    def flush(self) -> None:  # a partial line waits for its end: the bindings flush after every piece
        self.terminal.flush()
        self.log.flush()

    def close_line(self) -> None:
        if self.pending:
            self._route(self.pending)
            self.pending = ""
        self.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno...: the terminal's
        return getattr(self.terminal, name)
