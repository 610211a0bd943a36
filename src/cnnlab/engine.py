"""The loop: one training epoch and one evaluation, nothing else (no file I/O).

The loss is read back to the host only at log steps, so the device never waits for Python
inside the inner loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scheduler, criterion: nn.Module, *,
                    epoch: int, step: int, log_every: int,
                    log: Callable[[dict], None]) -> dict:
    """Train over `batches`; call `log` with a `train` record every `log_every` steps.
    Returns the epoch's step count, mean loss, images and seconds."""
    model.train()
    device_loss = torch.zeros((), device=next(model.parameters()).device)
    window_loss = torch.zeros_like(device_loss)
    window_steps = window_images = images = 0
    start = window_start = time.perf_counter()
    for x, y in batches:
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        window_steps += 1
        window_images += len(y)
        images += len(y)
        window_loss += loss.detach()
        if step % log_every == 0:
            mean = window_loss.item() / window_steps  # the only host sync in the loop
            now = time.perf_counter()
            log({"type": "train", "step": step, "epoch": epoch, "loss": mean,
                 "lr": optimizer.param_groups[0]["lr"],
                 "images_per_second": window_images / (now - window_start)})
            device_loss += window_loss
            window_loss.zero_()
            window_steps = window_images = 0
            window_start = now
    device_loss += window_loss
    seconds = time.perf_counter() - start
    return {"step": step, "loss": device_loss.item() / max(1, len(batches)),  # type: ignore[arg-type]
            "images": images, "seconds": seconds}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Test loss (plain cross-entropy) and accuracy in percent."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    for x, y in batches:
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    return {"loss": loss_sum.item() / total, "accuracy": 100.0 * correct.item() / total}
