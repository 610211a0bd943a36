"""The one way cnnlab stops cleanly on a signal: `StopSignals` around the training loop, and
around a parent process waiting for its workers (a sweep's, a search's, torchrun's ranks).
Everywhere else a signal is a plain KeyboardInterrupt (SIGTERM too, in cnnlab's own
processes: process.py)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import StoppedAtOnce
from .rank import env_rank

if TYPE_CHECKING:
    from .distributed import Dist


def say_stopping(signum: int) -> None:
    """The training loop's note on the first signal, on rank 0 alone (under torchrun every
    rank is told)."""
    if env_rank() == 0:
        print(f"\ncnnlab: {signal.Signals(signum).name}: stopping after this step and writing "
              "a checkpoint (press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)


class StopSignals:
    """While the `with` block runs, SIGINT and SIGTERM ask to stop: the first is recorded in
    `signum` (and `on_signal(signum)` called) for the loop to stop at its next check; a
    second raises StoppedAtOnce. With `pass_on`, a parent's: every signal is also passed to
    `pass_on(signum)` (its child processes, which stop themselves - at once on the second)
    and none raises, the parent waiting for them. The previous handlers are restored at the
    end. Off the main thread (where Python takes no handlers) it does nothing."""

    def __init__(self, on_signal: Callable[[int], None] | None = say_stopping, *,
                 pass_on: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self._on_signal, self._pass_on = on_signal, pass_on
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if self._on_signal is not None:
                self._on_signal(signum)
        elif self._pass_on is None:
            raise StoppedAtOnce(signum)  # atomic writes in progress remove their temp files
        if self._pass_on is not None:
            self._pass_on(signum)

    def requested(self, dist: Dist, collective: bool) -> bool:
        """Whether to stop now. Under torchrun every rank stops at the same step: the ranks
        agree at `collective` steps (log steps) only, as agreeing costs a host sync."""
        if not dist.enabled:
            return self.signum is not None
        return dist.any(self.signum is not None) if collective else False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
