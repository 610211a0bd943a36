"""The loop: one training epoch and one evaluation, nothing else (no file I/O).

The loss is read back to the host only at log steps, so the device never waits for Python
inside the inner loop; everything needed to stop and resume mid-epoch lives in LoopState."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TrainingDiverged


@dataclass
class LoopState:
    """Where training is: enough to checkpoint at any step and resume bitwise."""

    epoch: int = 1
    step: int = 0                      # optimiser steps done in the whole run
    batch: int = 0                     # batches done in the current epoch
    order: torch.Tensor | None = None  # the current epoch's sample order
    window: torch.Tensor | None = None  # on the device: loss sum, non-finite count since
    window_steps: int = 0               # the last log record
    images: int = 0                    # images trained on in the whole run (this rank)
    train_seconds: float = 0.0
    best_acc: float = float("-inf")
    history: list[float] = field(default_factory=list)  # test accuracy per epoch


class Precision:
    """Autocast and gradient scaling for fp32, bf16 or fp16 (fp16 with a GradScaler)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


class WeightEMA:
    """An exponential moving average of a model's weights and float buffers, updated after
    every optimiser step with decay min(decay, (1 + step) / (10 + step)), so that the random
    initial weights fade within the first steps. The step comes from the host: unlike
    torch.optim.swa_utils.AveragedModel, an update never reads a counter back from the GPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

        def tensors(m: nn.Module) -> list[torch.Tensor]:
            return [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]

        self._source, self._average = tensors(model), tensors(self.module)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._average, self._source, 1.0 - decay)


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scheduler, criterion: nn.Module,
                    state: LoopState, *, precision: Precision, log_every: int,
                    log: Callable[[dict], None],
                    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                    after_step: Callable[[LoopState], bool] = lambda s: False,
                    ema: WeightEMA | None = None) -> bool:
    """Train over `batches`, advancing `state`; `log` a `train` record every `log_every`
    steps. Returns True if `after_step` asked to stop before the epoch's end."""
    model.train()
    if state.window is None:
        state.window = torch.zeros(2, device=next(model.parameters()).device,
                                   dtype=torch.float64)
    window_images, window_start = 0, time.perf_counter()
    for x, y in batches:
        with precision.autocast():
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_step(loss, optimizer)
        scheduler.step()
        loss = loss.detach().double()
        state.window += torch.stack((loss, (~torch.isfinite(loss)).double()))
        state.step += 1
        if ema is not None:
            ema.update(state.step)
        state.batch += 1
        state.window_steps += 1
        state.images += len(y)
        window_images += len(y)
        if state.step % log_every == 0:
            loss_sum, bad = reduce_mean(state.window).tolist()  # the only host sync here
            check_finite(bad, state)
            now = time.perf_counter()
            log({"type": "train", "step": state.step, "epoch": state.epoch,
                 "loss": loss_sum / state.window_steps, "lr": optimizer.param_groups[0]["lr"],
                 "images_per_second": window_images / (now - window_start)})
            state.window.zero_()
            state.window_steps = window_images = 0
            window_start = now
        if after_step(state):
            return True
    return False


def check_finite(bad: float, state: LoopState) -> None:
    """Stop with the step and the likely cause if a loss since the last check was NaN/inf."""
    if bad:
        raise TrainingDiverged(
            f"the training loss became NaN or infinite by step {state.step} (epoch "
            f"{state.epoch}); the learning rate is probably too high - try a smaller --lr "
            "(--detect-anomaly finds the operation)")


def scores(model: nn.Module, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """The model's fp32 logits for `x`; `tta_flip`: the mean of those of each image and its
    mirror image."""
    logits = model(x).float()
    if tta_flip:
        logits = (logits + model(x.flip(3)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             precision: Precision | None = None, tta_flip: bool = False,
             reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Test loss (plain cross-entropy) and accuracy in percent, summed over all ranks;
    `tta_flip` scores the mean logits of each image and its mirror image."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in batches:
        with precision.autocast() if precision else contextlib.nullcontext():
            logits = scores(model, x, tta_flip)
        totals[0] += F.cross_entropy(logits, y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    loss_sum, correct, total = reduce_sum(totals).tolist()
    return {"loss": loss_sum / total, "accuracy": 100.0 * correct / total}
