"""What the `cnnlab` command sets for its whole process, and for the worker processes it
starts; never `cnnlab.train()` called from Python, whose process is its caller's."""

from __future__ import annotations

import os
import signal
import sys
import threading

from .errors import StoppedAtOnce


def set_up_command() -> None:
    """All of it, for a process that is the `cnnlab` command."""
    stop_on_signals()
    library_warnings_off()
    keep_freed_memory()


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise StoppedAtOnce, a KeyboardInterrupt with the signal's number
    (SIGTERM would otherwise end the process on the spot, leaving half-written files): the
    `finally` blocks run, and the command exits 130 or 143 with its one-line message."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)


def _stop(signum: int, frame: object) -> None:
    # Not inside an import (importlib marks the spec of a module whose code runs): torch's
    # C++ start-up code imports numpy, and a KeyboardInterrupt raised there is swallowed (the
    # command goes on) or leaves numpy half imported (a traceback: "cannot load module more
    # than once per process"); elsewhere in torch's start-up it can abort the process
    # ("terminate called after throwing an instance of 'pybind11::error_already_set'"). The
    # signal comes again in 50 ms, until no import runs. tests/test_reliability.py
    # reproduces it.
    if any(getattr(getattr(m, "__spec__", None), "_initializing", False)
           for m in list(sys.modules.values())):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
        return
    raise StoppedAtOnce(signum)


def library_warnings_off() -> None:
    """The command says what it has to say in its own lines: warnings of torch, torchvision
    or Pillow (a deprecation, Pillow's decompression-bomb size warning) would add lines of
    their own, mid-bar or after an error's one line. Off in this process and the ones it
    starts (decoding workers, ranks, sweep jobs); -W or PYTHONWARNINGS set by the user
    rule instead."""
    import warnings

    # torch's C++ logger (a rank losing the others logs stack frames) reads this at import
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    if sys.warnoptions or os.environ.get("PYTHONWARNINGS"):
        return
    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"


def keep_freed_memory() -> None:
    """Have glibc keep the memory a training step frees for the next step. By default it
    hands every freed block over 128 KiB back to the system and faults it in again page by
    page on the next step: about 700,000 page faults in one CPU epoch of LeNet-5, a tenth of
    its time. Blocks up to glibc's largest setting, 32 MiB, now come from the heap, which is
    trimmed only past 256 MiB free. Nothing where there is no glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return
    mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
