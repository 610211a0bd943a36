"""Progress for people: a tqdm bar that moves every step on a terminal; plain lines with the
epoch, the step and the time left otherwise (logs, CI, notebooks), and one summary line an
epoch. `Phase` does the same for the long phases outside the loop (decoding a folder of
images, evaluating a checkpoint).

Steps are counted on the host, so showing progress never waits for the device."""

from __future__ import annotations

import os
import sys
import time

from .results import format_epochs

QUIET_SECONDS = 10.0  # the longest a plain-line output stays silent while work goes on


def say(command: str, message: str) -> None:
    """A line of `cnnlab COMMAND` about its runs (a sweep's, a search's), on stderr. With
    functools.partial, a `say` that a worker process can be given (it pickles)."""
    print(f"cnnlab {command}: {message}", file=sys.stderr, flush=True)


def silent(message: str) -> None:
    """The `say` of --quiet."""


def on_terminal() -> bool:
    """Whether stderr is a terminal that reports its size, so a bar can be drawn there; a
    terminal that reports none (some IDE consoles: 0 columns) gets the plain lines."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):  # no file descriptor (a notebook's stream)
        return False


class Phase:
    """Progress of one long phase: `what` (e.g. "decoding cifar10-jpeg/train") over `total`
    `unit`s. On a terminal a bar, shown once the phase has taken a second; elsewhere a line
    `cnnlab: what: done of total unit (n%)` once it has taken QUIET_SECONDS and every
    QUIET_SECONDS after, and a last line saying how long it took - a short phase prints
    nothing."""

    def __init__(self, what: str, total: int, unit: str = "images", *,
                 enabled: bool = True) -> None:
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.tty = enabled and on_terminal()
        self.enabled = enabled
        from tqdm import tqdm  # here: `cnnlab --help` does without its 20 ms

        self.bar = tqdm(total=total, desc=what, unit=f" {unit}", unit_scale=False, delay=1.0,
                        leave=False, dynamic_ncols=True, disable=not self.tty)
        self.start = self.last = time.perf_counter()
        self.printed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= QUIET_SECONDS:
            self.last = time.perf_counter()
            self.printed = True
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            print(f"cnnlab: {self.what}: {self.done:,} of {self.total:,} {self.unit}{share}, "
                  f"{self.last - self.start:.0f} s", file=sys.stderr, flush=True)

    def close(self, failed: bool = False) -> None:
        self.bar.close()
        if self.printed and not failed:
            print(f"cnnlab: {self.what}: done, {self.done:,} {self.unit} in "
                  f"{time.perf_counter() - self.start:.0f} s", file=sys.stderr, flush=True)
            self.printed = False

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(failed=kind is not None)  # an error says what happened instead


class Progress:
    """The training's progress: a bar or lines, and the time left - the steps to go at the
    pace so far, and the evaluations to come (`eval_every` epochs and the last; each as
    long as the last one took, or before the first `eval_steps` training steps' time).
    Epochs are counted as the report counts them: those done of the `planned` (1.5 of 1.5,
    not "epoch 2")."""

    def __init__(self, total_steps: int, *, epochs: int, enabled: bool = True,
                 initial: int = 0, eval_every: int = 1, eval_steps: float = 0.0,
                 epoch: int = 1, planned: float | None = None) -> None:
        self.tty = enabled and on_terminal()
        self.enabled, self.total, self.epochs = enabled, total_steps, epochs
        self.planned = format_epochs(epochs if planned is None else planned)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                        leave=True, disable=not self.tty)
        self.step, self.start_step, self.start = initial, initial, time.perf_counter()
        self.epoch_start, self.losses, self.acc = self.start, [], ""
        self.last_line = self.start  # plain lines: when the last one was printed
        self.eval_every, self.eval_steps = eval_every, eval_steps
        self.next_eval_epoch = epoch  # the first epoch whose evaluation is still to come
        self.eval_last: float | None = None  # seconds the last evaluation took
        self.eval_total = 0.0

    def evals_left(self) -> int:
        return sum(1 for e in range(self.next_eval_epoch, self.epochs + 1)
                   if e % self.eval_every == 0 or e == self.epochs)

    def advance(self, epochs_done: float) -> None:
        """One step done, `epochs_done` epochs after it (every step: a counter and, on a
        terminal, tqdm's rate-limited redraw; elsewhere a line when none came for
        QUIET_SECONDS, as between the log steps of a slow model)."""
        self.step += 1
        if self.tty:
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last_line >= QUIET_SECONDS:
            self._print(f"epoch {format_epochs(epochs_done)}/{self.planned} step "
                        f"{self.step}/{self.total}, ETA {self.eta()}")

    def _print(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.last_line = time.perf_counter()

    def eta(self) -> str:
        """The time left at this process's pace so far, the evaluations to come counted."""
        done = self.step - self.start_step
        if done <= 0:
            return "?"
        pace = max(0.0, time.perf_counter() - self.start - self.eval_total) / done
        each = self.eval_last if self.eval_last is not None else pace * self.eval_steps
        seconds = pace * (self.total - self.step) + self.evals_left() * each
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    def train(self, record: dict) -> None:
        self.losses.append(record["loss"])
        epoch = f"epoch {self._done(record)}/{self.planned}"
        if self.tty:
            self.bar.set_postfix_str(f"{epoch} loss {record['loss']:.4f} {self.acc}"
                                     f"{record['images_per_second']:,.0f} img/s", refresh=False)
        elif self.enabled:
            self._print(f"{epoch} step {record['step']}/{self.total}: loss {record['loss']:.4f} "
                        f"lr {record['lr']:.3g} {record['images_per_second']:,.0f} img/s, "
                        f"ETA {self.eta()}")

    def eval(self, record: dict) -> None:
        """The epoch's summary line: time, train loss, test loss and accuracy, time left."""
        now = time.perf_counter()
        self.eval_last = record.get("eval_seconds", 0.0)
        self.eval_total += self.eval_last
        self.next_eval_epoch = record["epoch"] + 1
        train_loss = (f"train loss {sum(self.losses) / len(self.losses):.4f}, "
                      if self.losses else "")
        self.acc = f"acc {record['test_acc']:.2f}% "
        val = (f", validation accuracy {record['val_acc']:.2f}%"
               if record.get("val_acc") is not None else "")
        line = (f"epoch {self._done(record)}/{self.planned}: {now - self.epoch_start:.1f} s, "
                f"{train_loss}test loss {record['test_loss']:.4f}, test accuracy "
                f"{record['test_acc']:.2f}%{val}"
                + (f", ETA {self.eta()}" if self.evals_left() else ""))
        self.epoch_start, self.losses = now, []
        if self.tty:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            self._print(line)

    @staticmethod
    def _done(record: dict) -> str:
        return format_epochs(record.get("epochs_done", record["epoch"]))

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
