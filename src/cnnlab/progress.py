"""Progress for people: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, *, enabled: bool = True, initial: int = 0) -> None:
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                        leave=True, disable=not self.tty)
        self.acc = ""

    def train(self, record: dict) -> None:
        step = record["step"]
        if self.tty:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"epoch {record['epoch']} loss {record['loss']:.4f} "
                                     f"{self.acc}{record['images_per_second']:,.0f} img/s")
        elif self.enabled:
            print(f"epoch {record['epoch']} step {record['step']}: loss {record['loss']:.4f} "
                  f"lr {record['lr']:.3g} {record['images_per_second']:,.0f} img/s",
                  file=sys.stderr, flush=True)

    def eval(self, record: dict) -> None:
        step = record["steps"]
        self.acc = f"acc {record['test_acc']:.2f}% "
        line = (f"epoch {record['epoch']}: test loss {record['test_loss']:.4f}, "
                f"test accuracy {record['test_acc']:.2f}%")
        if self.tty:
            self.bar.update(step - self.bar.n)
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
