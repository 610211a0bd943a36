"""Progress for people: a tqdm bar that moves every step on a terminal; plain lines with the
epoch, the step and the time left otherwise (logs, CI, notebooks), and one summary line an
epoch.

Steps are counted on the host, so showing progress never waits for the device."""

from __future__ import annotations

import shutil
import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, *, epochs: int, enabled: bool = True,
                 initial: int = 0) -> None:
        # a terminal that reports no width (some IDE consoles) gets the plain lines
        self.tty = enabled and sys.stderr.isatty() and shutil.get_terminal_size().columns > 0
        self.enabled, self.total, self.epochs = enabled, total_steps, epochs
        self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                        leave=True, disable=not self.tty)
        self.step, self.start_step, self.start = initial, initial, time.perf_counter()
        self.epoch_start, self.losses, self.acc = self.start, [], ""

    def advance(self) -> None:
        """One step done (every step: a counter and, on a terminal, tqdm's rate-limited
        redraw)."""
        self.step += 1
        if self.tty:
            self.bar.update(1)

    def eta(self) -> str:
        """The time left at this process's pace so far."""
        done = self.step - self.start_step
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - self.start) / done * (self.total - self.step)
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    def train(self, record: dict) -> None:
        self.losses.append(record["loss"])
        epoch = f"epoch {record['epoch']}/{self.epochs}"
        if self.tty:
            self.bar.set_postfix_str(f"{epoch} loss {record['loss']:.4f} {self.acc}"
                                     f"{record['images_per_second']:,.0f} img/s", refresh=False)
        elif self.enabled:
            print(f"{epoch} step {record['step']}/{self.total}: loss {record['loss']:.4f} "
                  f"lr {record['lr']:.3g} {record['images_per_second']:,.0f} img/s, "
                  f"ETA {self.eta()}", file=sys.stderr, flush=True)

    def eval(self, record: dict) -> None:
        """The epoch's summary line: time, train loss, test loss and accuracy, time left."""
        now = time.perf_counter()
        train_loss = (f"train loss {sum(self.losses) / len(self.losses):.4f}, "
                      if self.losses else "")
        self.acc = f"acc {record['test_acc']:.2f}% "
        val = (f", validation accuracy {record['val_acc']:.2f}%"
               if record.get("val_acc") is not None else "")
        line = (f"epoch {record['epoch']}/{self.epochs}: {now - self.epoch_start:.1f} s, "
                f"{train_loss}test loss {record['test_loss']:.4f}, test accuracy "
                f"{record['test_acc']:.2f}%{val}"
                + (f", ETA {self.eta()}" if record["epoch"] < self.epochs else ""))
        self.epoch_start, self.losses = now, []
        if self.tty:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
