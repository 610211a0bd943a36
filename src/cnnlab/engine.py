"""The pieces of the loop: the training step, the evaluation, the training state and the
clock (no file I/O; `trainer.train_epochs` is the loop that puts them together).

The loss is read back to the host only at log steps, so the device never waits for Python
inside the inner loop; everything needed to stop and resume mid-epoch lives in TrainState."""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    window_correct: torch.Tensor | None = None  # on the device: the training step adds the
    #                                             images it gets right (make_train_step)
    window_images: int = 0             # the images trained on in it
    images: int = 0                    # images trained on in the whole run (this rank)
    train_seconds: float = 0.0
    best_acc: float = float("-inf")
    best_epoch: int = 0
    history: list[float] = field(default_factory=list)  # test accuracy per evaluated epoch
    last_eval: dict | None = None      # the last evaluation: {"loss", "accuracy"}
    last_val: dict | None = None       # the same on the validation split, when there is one
    best_test: float | None = None     # test accuracy of the best epoch (best.pt)
    compile_seconds: float | None = None  # with --compile: first steps, not in train_seconds

    def count(self, loss: torch.Tensor, images: int) -> None:
        """Account for one step: its loss joins the window on the device (no host sync)."""
        loss = loss.double()
        if self.window is None:
            self.window = torch.zeros(2, device=loss.device, dtype=torch.float64)
        self.window += torch.stack((loss, (~torch.isfinite(loss)).double()))
        self.step += 1
        self.batch += 1
        self.window_steps += 1
        self.window_images += images
        self.images += images

    def end_epoch(self, result: dict | None, val: dict | None = None) -> bool:
        """Record the epoch's evaluation on the test split (None: not evaluated) and on the
        validation split, if any, and move to the next epoch; True if it is the best epoch so
        far: by validation accuracy where there is a validation split, else by test accuracy."""
        chosen = val or result
        best = chosen is not None and chosen["accuracy"] > self.best_acc
        if result is not None:
            self.history.append(result["accuracy"])
            self.last_eval, self.last_val = result, val
        if best:
            self.best_acc, self.best_epoch = chosen["accuracy"], self.epoch
            self.best_test = result["accuracy"]
        self.epoch, self.batch, self.order = self.epoch + 1, 0, None
        return best

    def take_window(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                    ) -> tuple[float, float | None]:
        """The mean loss since the last call and the training accuracy in percent over the
        same images (None where the steps counted none), read in the one host sync of a log
        step (`reduce`: the mean over the ranks); raises TrainingDiverged if any of those
        losses was NaN or infinite."""
        counted = self.window_correct is not None
        correct = self.window_correct if counted else self.window.new_zeros(())
        values = torch.cat((self.window, torch.stack((correct, correct.new_tensor(
            float(self.window_images))))))
        loss_sum, bad, right, images = reduce(values).tolist()
        self.check_finite(bad)
        mean = loss_sum / max(1, self.window_steps)
        self.window.zero_()
        if counted:
            self.window_correct.zero_()
        self.window_steps = self.window_images = 0
        return mean, 100.0 * right / images if counted and images else None

    def check_finite(self, bad: float) -> None:
        """Stop with the step and the likely cause if a loss was NaN or infinite."""
        if bad:
            raise TrainingDiverged(
                f"the training loss became NaN or infinite by step {self.step} (epoch "
                f"{self.epoch}); the learning rate is probably too high - try a smaller --lr "
                "(--detect-anomaly finds the operation)", self.step, self.epoch)


POSITION = ("epoch", "step", "batch")  # LoopState's fields a state_dict keeps at its top level


class Precision:
    """Autocast and gradient scaling for fp32, bf16 or fp16 (fp16 with a GradScaler)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self, cache: bool = True):
        """The autocast context; `cache=False` inside a CUDA graph capture, where autocast's
        cache of cast weights must not outlive the capture."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache)


def _float_tensors(m: nn.Module) -> list[torch.Tensor]:
    """A model's parameters and float buffers (batch-norm statistics), in a fixed order."""
    return [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]


class WeightEMA:
    """An exponential moving average of a model's weights and float buffers, updated after
    every optimiser step with decay min(decay, (1 + step) / (10 + step)), so that the random
    initial weights fade within the first steps. The step comes from the host: unlike
    torch.optim.swa_utils.AveragedModel, an update never reads a counter back from the GPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._source, self._average = _float_tensors(model), _float_tensors(self.module)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._average, self._source, 1.0 - decay)


class Lookahead:
    """Lookahead (Zhang et al. 2019) on a schedule: every 5 steps the slow weights move
    towards the model's (fast) weights, and the model restarts from them. The slow weights
    keep a share decay = 0.95^5 x (step / total)^3 of themselves: none early on, where
    training moves fast, 77% at the end; the last step ends the model on the slow weights.
    Batch-norm statistics are averaged with the weights."""

    EVERY = 5

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps
        self.module = copy.deepcopy(model).requires_grad_(False)
        self._fast, self._slow = _float_tensors(model), _float_tensors(self.module)

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step == self.total_steps:
            decay = 1.0
        elif step % self.EVERY == 0:
            decay = 0.95 ** self.EVERY * (step / self.total_steps) ** 3
        else:
            return
        torch._foreach_lerp_(self._slow, self._fast, 1.0 - decay)
        torch._foreach_copy_(self._fast, self._slow)


@dataclass
class TrainState:
    """Everything that changes as a run trains: the weights, the optimiser's and schedule's
    state, the weight averages, the loss scaler, where the loop is and the random state.
    `state_dict()` gives it as plain data (tensors, numbers, lists and dicts: what a
    checkpoint holds) and `load_state_dict()` puts it back, so that training goes on bitwise
    as if it had never stopped."""

    model: nn.Module               # the plain model (not DDP-wrapped or compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision           # with fp16, its loss scaler
    generator: torch.Generator     # the training loader's: sample order and augmentation
    ema: WeightEMA | None = None   # the averaged weights, when --ema is on
    lookahead: Lookahead | None = None  # the slow weights, when --lookahead is on
    loop: LoopState = field(default_factory=LoopState)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def evaluated(self) -> nn.Module:
        """The model whose accuracy a run records and whose weights its checkpoints hold."""
        return self.ema.module if self.ema else self.model

    def update_averages(self) -> None:
        """After an optimiser step: move the weight averages (--ema, --lookahead)."""
        if self.ema:
            self.ema.update(self.loop.step)
        if self.lookahead:
            self.lookahead.update(self.loop.step)

    def models(self) -> dict[str, nn.Module]:
        """Each model whose weights the state holds, by its state_dict key: `model` the
        evaluated one (with --ema the average), `train_model` the trained one with --ema,
        `lookahead` the slow weights."""
        return {"model": self.evaluated, **({"train_model": self.model} if self.ema else {}),
                **({"lookahead": self.lookahead.module} if self.lookahead else {})}

    def rng_state(self) -> dict[str, torch.Tensor | None]:
        device = self.device
        return {"torch": torch.get_rng_state(), "loader": self.generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def state_dict(self) -> dict[str, Any]:
        loop, scaler = self.loop, self.precision.scaler
        return {
            # plain contiguous tensors (channels-last ones are views that safetensors and
            # other readers refuse); loading copies them into the model's own layout
            **{key: {name: value.contiguous() for name, value in model.state_dict().items()}
               for key, model in self.models().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "epoch": loop.epoch - 1, "step": loop.step, "batch": loop.batch,  # epochs finished
            "loop": {k: v for k, v in vars(loop).items() if k not in POSITION},
            "rng": self.rng_state(), "device_type": self.device.type,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a state_dict() of a state built the same way (checked to fit first:
        checkpoint.check_fits)."""
        for key, model in self.models().items():
            model.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler and state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        loop, device = self.loop, self.device
        for key, value in state["loop"].items():
            if isinstance(getattr(loop, key), torch.Tensor) and value is not None:
                getattr(loop, key).copy_(value)  # in place: the training step writes to it
            else:
                setattr(loop, key, value.to(device) if isinstance(value, torch.Tensor)
                        else value)
        loop.epoch, loop.step, loop.batch = state["epoch"] + 1, state["step"], state["batch"]
        if "best_epoch" not in state["loop"] and loop.history:  # written before it was kept
            loop.best_epoch = loop.history.index(loop.best_acc) + 1
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["loader"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)


def synchronize(device: torch.device) -> None:
    """Wait until `device` has done the work queued on it (on the CPU, work is done when the
    call that queued it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds of device work. A GPU runs behind the host, which only queues its work: the
    device is synchronised at each edge of a timed span (`start`, `lap`) and never inside
    one, so that a span's seconds are those of the work queued in it, as a stopwatch around
    the device would show, rather than of the queueing (with the rest billed to whatever
    waits for the device next, e.g. the evaluation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def lap(self) -> float:
        """The seconds since `start` or the last lap, once the device has done the work
        queued in them; the next span starts now."""
        synchronize(self.device)
        now = time.perf_counter()
        seconds, self.started = now - self.started, now
        return seconds


Batch = tuple[torch.Tensor, torch.Tensor]


def make_train_step(net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
                    held: Sequence[torch.Tensor] = (), *, graph: bool = False,
                    correct: torch.Tensor | None = None) -> Callable[[Batch], torch.Tensor]:
    """`train_step(batch) -> loss`: forward, loss, backward, optimiser and lr-schedule step on
    one batch. The device work of training and nothing else: it never reads a value back to
    the host, so the caller decides when to wait for the device (log steps). Parameters in
    `held` (a list the caller may change between steps) keep their values: no gradient
    reaches the optimiser, which then leaves them as they are. `graph`: all but the schedule
    (host arithmetic) runs as a CUDA graph (see CapturedStep). `correct` (a device tensor):
    each step adds to it how many of its images the logits it computed anyway got right - no
    other forward pass, and no sync."""
    scaler = precision.scaler

    def update(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with precision.autocast(cache=not graph):
            out = net(x)
            loss = criterion(out, y)
        if correct is not None:
            correct.add_((out.argmax(1) == y).sum())
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            for p in held:
                p.grad = None
            optimizer.step()
        else:  # fp16: scale the loss so that small gradients do not underflow
            scaler.scale(loss).backward()
            for p in held:
                p.grad = None
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    step = CapturedStep(update, optimizer, held) if graph else update

    def train_step(batch: Batch) -> torch.Tensor:
        loss = step(*batch)
        scheduler.step()
        return loss

    return train_step


def cuda_graph(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Record `fn`'s kernels as a CUDA graph (nothing runs yet): (replay, fn's output)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's CUDA calls must keep off the device while capturing
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


class CapturedStep:
    """`update(x, y) -> loss` (forward, backward, optimiser step) recorded once as a CUDA
    graph and replayed for every batch after: one launch per step instead of one per kernel,
    so a small model on a fast GPU no longer waits for Python (--cuda-graph).

    A replay reads its batch from fixed input tensors (each batch is copied in: every batch
    must have the shape of the first) and the learning rates from one device tensor per
    parameter group, which the host refills from the scheduler's values before each replay;
    everything else the step touches (weights, gradients, the optimiser's state, batch-norm
    statistics) stays where the capture found it. The first WARMUP steps, and the first
    after the held parameters change (a different set to update: a new graph), run eagerly
    on a side stream: lazy initialisation, cuDNN's algorithm search and the optimiser's
    state happen outside the graph. The optimiser must take a tensor lr in a capturable
    step (fused SGD, fused and capturable Adam/AdamW); its other hyperparameters are fixed
    at capture."""

    WARMUP = 3

    def __init__(self, update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, held: Sequence[torch.Tensor]) -> None:
        self.update, self.optimizer, self.held = update, optimizer, held
        self.key: tuple[int, ...] | None = None  # the held parameters the graph was made for
        self.replay: Callable[[], None] | None = None
        self.warmup = 0  # eager steps left before the next capture
        self.inputs: tuple[torch.Tensor, ...] = ()  # the batch a replay reads
        self.lrs: list[torch.Tensor] = []  # the learning rates a replay reads
        self.loss: torch.Tensor | None = None  # where a replay writes the loss
        self.side: torch.cuda.Stream | None = None  # the warm-up steps' stream

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = tuple(id(p) for p in self.held)
        if key != self.key:
            self.key, self.replay, self.warmup = key, None, self.WARMUP
        if self.warmup:
            self.warmup -= 1
            return self._eager(x, y)
        if self.replay is None:
            self.inputs = (x.clone(), y.clone())  # same strides as every batch
            # float32: what the fused CUDA kernels read (elsewhere the step reads it back)
            dtype = torch.float32 if x.is_cuda else torch.float64
            self.lrs = [torch.tensor(float(g["lr"]), device=x.device, dtype=dtype)
                        for g in self.optimizer.param_groups]
            # on the batch's GPU: a capture records the current device's work only
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                self.replay, self.loss = cuda_graph(self._captured)
        for tensor, batch in zip(self.inputs, (x, y)):
            if tensor.shape != batch.shape:  # copy_ would broadcast a smaller batch
                raise RuntimeError(f"a captured step takes batches of {tuple(tensor.shape)}, "
                                   f"not {tuple(batch.shape)}")
            tensor.copy_(batch)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self.replay()
        return self.loss.clone()  # the next replay overwrites self.loss

    def _captured(self) -> torch.Tensor:
        """The step as the graph records it: the optimiser reads its lr from self.lrs."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for group, lr in zip(groups, self.lrs):
            group["lr"] = lr
        try:
            return self.update(*self.inputs)
        finally:  # the scheduler and checkpoints go on with plain numbers
            for group, lr in zip(groups, floats):
                group["lr"] = lr

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.update(x, y)
        if self.side is None:
            self.side = torch.cuda.Stream(x.device)
        side, main = self.side, torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimiser warns once when it steps outside a graph, as here
            warnings.filterwarnings("ignore", message=".*capturable")
            loss = self.update(x, y)
        main.wait_stream(side)
        return loss


def logits(model: nn.Module, x: torch.Tensor, tta: str | None = None) -> torch.Tensor:
    """The model's fp32 logits for `x`. Test-time averaging: `tta="flip"` gives the mean of
    the logits of each image and its mirror image; "flip,translate" weighs that pair 1/2 and
    the pairs shifted one pixel up-left and one pixel down-right (mirrored border) 1/4 each."""
    if tta in (None, "none"):
        return model(x).float()
    out = (model(x).float() + model(x.flip(3)).float()) / 2
    if tta == "flip,translate":
        h, w = x.shape[2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = (padded[:, :, :h, :w], padded[:, :, 2:, 2:])
        out = out / 2 + sum(logits(model, v, "flip") for v in shifted) / 4
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *,
             precision: Precision | None = None, tta: str | None = None,
             reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Test loss (plain cross-entropy) and accuracy in percent, summed over all ranks, of the
    logits with test-time averaging `tta` (see `logits`). None if `stop()`, asked after every
    batch, said to stop."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in batches:
        with precision.autocast() if precision else contextlib.nullcontext():
            out = logits(model, x, tta)
        totals[0] += F.cross_entropy(out, y, reduction="sum")
        totals[1] += (out.argmax(1) == y).sum()
        totals[2] += len(y)
        if stop():
            return None
    loss_sum, correct, total = reduce_sum(totals).tolist()
    return {"loss": loss_sum / total, "accuracy": 100.0 * correct / total}
