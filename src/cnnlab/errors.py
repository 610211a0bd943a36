"""The exceptions users see, and the one table of exit statuses the `cnnlab` command uses."""

from __future__ import annotations

import signal
from enum import IntEnum


class Exit(IntEnum):
    """Every exit status of `cnnlab` (README: "When things go wrong")."""

    OK = 0
    SOME_FILES_UNREADABLE = 1  # `predict`: some images could not be read, the others were
    BAD_INPUT = 2              # bad input or environment (also a full disk, out of memory)
    DIVERGED = 3               # the loss became NaN or infinite
    SIGNALLED = 128            # + the signal number: 130 SIGINT, 143 SIGTERM

    @staticmethod
    def for_signal(signum: int) -> int:
        """The status of a run stopped by signal `signum`, as a shell reports it."""
        return Exit.SIGNALLED + signum


INTERRUPTED = Exit.for_signal(signal.SIGINT)


class CnnlabError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits with `exit_code`."""

    exit_code: int = Exit.BAD_INPUT


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite, by optimiser step `step` of epoch `epoch`."""

    exit_code = Exit.DIVERGED

    def __init__(self, message: str, step: int | None = None, epoch: int | None = None) -> None:
        super().__init__(message)
        self.step, self.epoch = step, epoch


class Interrupted(CnnlabError):
    """Stopped by a signal (SIGINT: exit 130, SIGTERM: 143) after writing a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = Exit.for_signal(signum)


class StoppedAtOnce(BaseException):
    """A signal that asks to stop at once (one at start-up, a second one during training):
    like KeyboardInterrupt, it unwinds through every `finally`, so files being written are
    removed rather than left half written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace and line breaks collapsed) of at most
    `limit` characters, or its type's name when it has no message: for quoting a library's
    error inside one of ours."""
    text = " ".join(str(error).split())
    return text[:limit] if text else type(error).__name__


def failure_message(error: BaseException) -> str | None:
    """The one line a user sees for an error that is bad input or environment rather than a
    bug: cnnlab's own, an OSError (a full disk, a folder we may not write to), or memory
    running out. None for anything else."""
    if isinstance(error, CnnlabError):
        return str(error)
    if isinstance(error, OSError):
        return (f"{error.filename}: {error.strerror or error}" if error.filename
                else str(error.strerror or error))
    if isinstance(error, (MemoryError, RuntimeError)) and _out_of_memory(error):
        return f"out of memory ({one_line(error, 120)}); lower --batch-size"
    return None


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` says memory ran out: MemoryError, torch's OutOfMemoryError (GPUs), or
    the plain RuntimeError that torch's CPU allocator raises (known only by its text)."""
    import torch

    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        "DefaultCPUAllocator" in str(error) and "memory" in str(error))
