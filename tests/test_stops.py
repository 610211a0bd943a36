"""StopSignals, the one way a loop stops on a signal (the training loop, a parent waiting
for its workers), in this process: the first signal asks, a second stops at once."""

import signal
import threading

import pytest

from cnnlab.errors import StoppedAtOnce
from cnnlab.stops import StopSignals


def test_the_first_signal_asks_a_second_stops_at_once_then_the_handlers_are_back():
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    with pytest.raises(StoppedAtOnce) as stopped, StopSignals(seen.append) as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.signum == signal.SIGTERM and seen == [signal.SIGTERM]
        signal.raise_signal(signal.SIGINT)
    assert stopped.value.signum == signal.SIGINT
    assert isinstance(stopped.value, KeyboardInterrupt)  # handled wherever Ctrl-C is
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_parent_passes_every_signal_on_and_raises_none():
    passed = []
    with StopSignals(None, pass_on=passed.append) as signals:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert passed == [signal.SIGINT, signal.SIGTERM] and signals.signum == signal.SIGINT


def test_off_the_main_thread_it_takes_no_signals():
    seen = []

    def run() -> None:
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGINT)]


def test_the_commands_own_signal_handling_makes_sigterm_an_interrupt():
    """process.stop_on_signals (what the `cnnlab` command sets for itself): SIGTERM raises
    StoppedAtOnce, a KeyboardInterrupt with the signal, so `finally` blocks run. Restored
    after, as every test must leave pytest's own handlers."""
    import os
    import signal

    import pytest

    from cnnlab.errors import StoppedAtOnce
    from cnnlab.process import stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_on_signals()
        with pytest.raises(StoppedAtOnce) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1)  # the handler runs by the next bytecode
        assert stopped.value.signum == signal.SIGTERM
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
