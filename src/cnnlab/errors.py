"""The exceptions users see, and the one table of exit statuses the `cnnlab` command uses."""

from __future__ import annotations

import os
import re
import signal
from enum import IntEnum

from .rank import env_rank


class Exit(IntEnum):
    """Every exit status of `cnnlab` (docs/troubleshooting.md)."""

    OK = 0
    SOME_FILES_UNREADABLE = 1  # `predict`: some images could not be read, the others were
    SOME_TRIALS_REFUSED = 1    # sweep, tune: trials a study's storage held were refused
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


class StoppedAtOnce(KeyboardInterrupt):
    """A signal that asks to stop at once: SIGTERM outside a StopSignals block (SIGINT there
    is Python's own KeyboardInterrupt), or a second signal inside one. A KeyboardInterrupt,
    handled wherever Ctrl-C is, with the signal's number: it unwinds through every
    `finally`, so files being written are removed rather than left half written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace and line breaks collapsed) of at most
    `limit` characters, or its type's name when it has no message: for quoting a library's
    error inside one of ours."""
    text = " ".join(str(error).split())
    return text[:limit] if text else type(error).__name__


def shown(value: object, limit: int = 120) -> str:
    """A value read from a study, safe to print: non-printable characters (escape sequences,
    line breaks) as Python escapes, at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def failure_message(error: BaseException) -> str | None:
    """The one line a user sees for an error that is bad input or environment rather than a
    bug: cnnlab's own, an OSError (a full disk, a folder we may not write to), memory
    running out, or another rank gone under torchrun. None for anything else."""
    if isinstance(error, CnnlabError):
        return str(error)
    if isinstance(error, OSError):
        return (f"{error.filename}: {error.strerror or error}" if error.filename
                else str(error.strerror or error))
    if isinstance(error, (MemoryError, RuntimeError)) and _out_of_memory(error):
        return f"out of memory ({one_line(error, 120)}); lower --batch-size"
    if _storage_fault(error):  # wherever a study's storage is used without patient()
        return f"the study storage failed: {one_line(error.__cause__ or error, 200)}"
    if lost_contact(error):
        detail = re.sub(r"^\[[^]]*\]\s*", "", one_line(error)).split(". ")[0][:120]
        return (f"rank {env_rank()} lost contact with the other ranks ({detail}); another "
                "rank ended or hangs")
    return None


# What gloo says when the process at the other end of a connection is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "connectFullMesh failed")


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective failing under torchrun because another rank ended or
    hangs: one of torch's distributed errors (a timeout, a lost store), or gloo's plain
    RuntimeError about a closed connection. Not a bug here: the cause is elsewhere."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    return (dist.is_available() and isinstance(error, dist.DistError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_GONE))


def _storage_fault(error: BaseException) -> bool:
    """Whether `error` is SQLAlchemy's or Optuna's storage error (known by its module and
    name: neither is imported for it)."""
    kind = type(error)
    return kind.__module__.startswith("sqlalchemy.") or (
        kind.__module__.startswith("optuna.") and kind.__name__ == "StorageInternalError")


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` says memory ran out: MemoryError, torch's OutOfMemoryError (GPUs), or
    the plain RuntimeError that torch's CPU allocator raises (known only by its text)."""
    import torch

    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        "DefaultCPUAllocator" in str(error) and "memory" in str(error))


def did_you_mean(word: str, choices) -> str:
    """'; did you mean X?' for the choice nearest to a mistyped `word` (difflib's ratio), or
    '' when none is near: for the end of an "unknown ..." message."""
    from difflib import get_close_matches

    near = get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


def unknown_choice(what: str, word: str, choices) -> str:
    """"unknown WHAT 'word'; choose one of ...", led by the nearest choice where there is one
    ("unknown model 'lenet'; did you mean lenet5? (choose one of lenet5, ...)")."""
    listed = ", ".join(map(str, choices))
    hint = did_you_mean(word, choices)
    return f"unknown {what} '{word}'" + (f"{hint} (choose one of {listed})" if hint
                                         else f"; choose one of {listed}")
