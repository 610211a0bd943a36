"""argv -> config -> (dataset, model, optimiser) -> epochs -> run directory.

`fit` is the whole training program and `train_epochs` its loop; read them top to bottom."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed
from .checkpoint import ModelMeta
from .config import (
    RESUME_SAFE,
    Config,
    checkpoint_interval,
    default_data_dir,
    option_name,
    typed_value,
    validate,
)
from .data import Dataset, load_dataset
from .data.loader import DeviceLoader
from .engine import LoopState, Precision, WeightEMA, evaluate, make_train_step
from .envinfo import collect_env
from .errors import CnnlabError, Interrupted, TrainingDiverged, one_line
from .models import count_parameters
from .plots import plot_run, plot_utilization
from .progress import Progress
from .runs import RunDir, default_run_dir
from .telemetry import Sampler


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise CnnlabError(f"bad device '{spec}'; use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise CnnlabError(f"--device {spec}: no CUDA GPU is available here; "
                              "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CnnlabError(f"--device {spec}: this machine has {count} GPU(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return device
    raise CnnlabError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N")


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    # fused: the whole update in one kernel rather than a loop of small ops per parameter
    fused = {"fused": True} if cfg.fused and cfg.optimizer != "adamax" else {}  # no fused Adamax
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **fused)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adamax": torch.optim.Adamax}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    """A per-step schedule over the whole run."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                pct_start=0.25)
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "step":  # x0.1 at half and three quarters of the run
        return sched.MultiStepLR(optimizer, [total_steps // 2, total_steps * 3 // 4], 0.1)
    return sched.LambdaLR(optimizer, lambda _: 1.0)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPU."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise CnnlabError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class StopSignals:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 130/143. Second: exit now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # atomic writes in progress clean up their temp files
        self.signum = signum
        print(f"\ncnnlab: {signal.Signals(signum).name}: stopping after this step and writing a "
              "checkpoint (press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def requested(self, dist: distributed.Dist, collective: bool) -> bool:
        """Whether to stop now. Under torchrun every rank stops at the same step: the ranks
        agree at `collective` steps (log steps) only, as agreeing costs a host sync."""
        if not dist.enabled:
            return self.signum is not None
        return dist.any(self.signum is not None) if collective else False

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_config(run_dir: str | Path, overrides: dict) -> tuple[Config, dict]:
    """The run's own configuration, with only the changes that are safe to make, and its
    checkpoint."""
    saved, epochs_done, ckpt = checkpoint.load_for_resume(run_dir)
    values = dict(saved)
    for key, value in overrides.items():
        if key == "data_dir" and value is not None:
            value = default_data_dir(value)  # stored absolute, as a new run's
        if value is None or value == saved.get(key):
            continue
        if key not in RESUME_SAFE:
            raise CnnlabError(f"--{option_name(key)} {value} differs from the run's "
                              f"{saved.get(key)}; a resumed run keeps its configuration "
                              "(start a new run to change it)")
        if key == "epochs" and (value < epochs_done or saved["schedule"] != "constant"):
            raise CnnlabError(f"--epochs {value}: a resumed run may only add epochs, and only "
                              f"with the constant schedule (this run's schedule, "
                              f"'{saved['schedule']}', was laid out for {saved['epochs']})")
        values[key] = typed_value(key, value)  # as resolve() types a new run's options
    cfg = Config(**values)
    validate(cfg)
    if epochs_done >= cfg.epochs:
        raise CnnlabError(f"{run_dir} already finished its {cfg.epochs} epochs; pass --epochs N "
                          "to train more (constant schedule only) or start a new run")
    return cfg, ckpt


@dataclass
class Training:
    """Everything a run trains with, built from a Config (shared by fit and the benchmarks)."""

    cfg: Config
    device: torch.device
    dist: distributed.Dist
    data: Dataset
    meta: ModelMeta            # what rebuilds the model without the dataset
    model: nn.Module           # the plain model (what checkpoints hold)
    net: nn.Module             # what the loop calls: the model, DDP-wrapped and/or compiled
    generator: torch.Generator
    train_batches: DeviceLoader
    test_batches: DeviceLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    precision: Precision
    channels_last: bool
    ema: WeightEMA | None      # the averaged weights, when --ema is on

    @property
    def evaluated(self) -> nn.Module:
        """The model whose accuracy a run records and whose weights its checkpoints hold."""
        return self.ema.module if self.ema else self.model


@contextlib.contextmanager
def torch_settings(cfg: Config, device: torch.device) -> Iterator[None]:
    """PyTorch's process-wide switches as `cfg` asks, restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if cfg.deterministic and device.type == "cuda" and saved[3] is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS needs it
    # warn_only: a few CUDA backward kernels (adaptive pooling) have no deterministic version
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def build(cfg: Config, device: torch.device, dist: distributed.Dist | None = None) -> Training:
    """Load the data and build the model, loaders, optimiser and schedule (seeded by cfg)."""
    dist = dist or distributed.Dist()
    torch.manual_seed(cfg.seed)
    precision = Precision(resolve_precision(cfg.precision, device), device)
    # channels-last is faster for these convnets on GPUs and on CPUs (oneDNN) alike
    channels_last = cfg.channels_last if cfg.channels_last is not None else True
    if not dist.main:
        dist.barrier()  # rank 0 downloads and decodes first; the others then read its cache
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                        skip_bad_files=cfg.skip_bad_files)
    if dist.main:
        dist.barrier()
    meta = ModelMeta.of(cfg, data)
    model = meta.build().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    augment = frozenset() if cfg.augment == "none" else frozenset(cfg.augment.split(","))
    common = dict(mean=data.mean, std=data.std, device=device, normalize=cfg.normalize,
                  channels_last=channels_last, rank=dist.rank, world_size=dist.world_size)
    train_batches = DeviceLoader(torch.from_numpy(data.train_x), torch.from_numpy(data.train_y),
                                 batch_size=cfg.batch_size, shuffle=True, augment=augment,
                                 generator=generator, **common)
    test_batches = DeviceLoader(torch.from_numpy(data.test_x), torch.from_numpy(data.test_y),
                                batch_size=cfg.eval_batch_size, **common)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, cfg.epochs * len(train_batches))
    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return Training(cfg, device, dist, data, meta, model, net, generator, train_batches,
                    test_batches, optimizer, scheduler,
                    nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), precision,
                    channels_last, WeightEMA(model, cfg.ema) if cfg.ema else None)


def fit(cfg: Config, out: str | Path | None = None, *, progress: bool = True,
        resume: dict | None = None) -> dict:
    """Train as `cfg` says, write the run directory, return the summary. `resume` is a
    checkpoint (from resume_config) to continue from, in the run directory `out`."""
    wall_start = time.perf_counter()
    dist, device = distributed.setup(resolve_device(cfg.device))
    try:
        path = _run_path(cfg, out, resume, dist)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_settings(cfg, device))
            training = build(cfg, device, dist)
            run = stack.enter_context(RunDir(path, resume=resume is not None)) if path else None
            state, resumed_from = LoopState(), None
            if resume is not None:
                offset = checkpoint.restore(resume, training, state, device)
                resumed_from = state.step
                if run is not None:
                    run.truncate_metrics(offset)
            elif run is not None:
                run.write_json("config.json", cfg.to_dict() | {
                    "device": str(device), "precision_used": training.precision.name,
                    "world_size": dist.world_size})
                run.write_json("env.json", collect_env(device))
            if run is not None and cfg.tensorboard:
                run.add_sink(tensorboard_sink(run.path))
            bar = Progress(cfg.epochs * len(training.train_batches),
                           enabled=progress and dist.main, initial=state.step)
            with bar, Sampler(run.log if run else None, device, cfg.telemetry if run else 0,
                              lambda: state.images * dist.world_size):
                result = train_epochs(training, state, run, bar)
            summary = _summary(training, state, result, wall_start, run.path if run else out)
            if resumed_from is not None:
                summary["resumed_from_step"] = resumed_from
            if run is not None:  # rank 0 alone writes
                plot_run(run.path)
                plot_utilization(run.path)
                run.write_json("summary.json", summary)
        return summary
    finally:
        distributed.cleanup()


def train_epochs(t: Training, state: LoopState, run: RunDir | None, bar: Progress) -> dict:
    """The loop: train each epoch step by step, evaluate it, log, checkpoint, and stop cleanly
    on a signal. Host-side decisions sit between calls of `train_step`, which only computes.
    Returns the last evaluation (with `compile_seconds` under --compile)."""
    cfg, dist = t.cfg, t.dist
    every, unit = checkpoint_interval(cfg.checkpoint_every)
    train_step = make_train_step(t.net, t.criterion, t.optimizer, t.scheduler, t.precision)
    compile_seconds = None  # with --compile: the first step's time, kept out of train_seconds
    with StopSignals() as signals, _anomalies_as_divergence(cfg.detect_anomaly, state):
        while state.epoch <= cfg.epochs:
            if state.batch == 0:
                state.order = t.train_batches.new_order()
            t.net.train()
            started = window_start = time.perf_counter()
            window_images = 0
            for batch in t.train_batches.batches(state.order, state.batch):
                loss = train_step(batch)
                state.count(loss, len(batch[1]))
                window_images += len(batch[1])
                if t.ema:
                    t.ema.update(state.step)
                if cfg.compile and compile_seconds is None:  # the first step compiled
                    compile_seconds = _synced_seconds_since(started, t.device)
                    _log(run, {"type": "compile", "step": state.step, "seconds": compile_seconds})
                    started = window_start = time.perf_counter()
                    window_images = 0
                log_step = state.step % cfg.log_every == 0
                if log_step:
                    now = time.perf_counter()
                    _log(run, {"type": "train", "step": state.step, "epoch": state.epoch,
                               "loss": state.take_window(dist.reduce_mean),
                               "lr": t.optimizer.param_groups[0]["lr"],
                               "images_per_second": window_images / (now - window_start)},
                         bar.train)
                    window_start, window_images = now, 0
                stop = signals.requested(dist, collective=log_step)
                if stop or (unit == "step" and state.step % every == 0):
                    save_checkpoint(t, state, run)
                if stop:
                    raise _interrupted(signals.signum, state, run)
            state.train_seconds += time.perf_counter() - started
            result = evaluate(t.evaluated if t.ema else t.net, t.test_batches,
                              precision=t.precision, tta_flip=cfg.tta == "flip",
                              reduce_sum=dist.reduce_sum)
            best = state.end_epoch(result["accuracy"])
            _log(run, {"type": "eval", "epoch": state.epoch - 1, "steps": state.step,
                       "test_loss": result["loss"], "test_acc": result["accuracy"],
                       "train_seconds": state.train_seconds}, bar.eval)
            if unit == "step" or state.epoch > cfg.epochs or (state.epoch - 1) % every == 0:
                save_checkpoint(t, state, run)
            if best:
                save_checkpoint(t, state, run, "best.pt")
    return result | ({"compile_seconds": compile_seconds} if cfg.compile else {})


def _log(run: RunDir | None, record: dict, show=None) -> None:
    """Append `record` to metrics.jsonl (rank 0 only) and `show` it on the progress output."""
    if run is not None:
        run.log(record)
        if show is not None:
            show(record)


@contextlib.contextmanager
def _anomalies_as_divergence(detect: bool, state: LoopState) -> Iterator[None]:
    """--detect-anomaly: autograd names the operation that produced a NaN; report it as a
    divergence (exit status 3) rather than a crash."""
    with torch.autograd.set_detect_anomaly(detect):
        try:
            yield
        except RuntimeError as e:
            if not (detect and "nan values" in str(e)):
                raise
            raise TrainingDiverged(
                f"anomaly detected at step {state.step + 1}: {one_line(e)}; the learning "
                "rate is probably too high - try a smaller --lr") from None


def _synced_seconds_since(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _interrupted(signum: int | None, state: LoopState, run: RunDir | None) -> Interrupted:
    signum = signum or signal.SIGTERM  # under torchrun: another rank received it
    return Interrupted(f"{signal.Signals(signum).name} at step {state.step} (epoch "
                       f"{state.epoch}); checkpoint written - resume with: cnnlab train "
                       f"--resume {run.path if run else ''}", signum)


def save_checkpoint(t: Training, state: LoopState, run: RunDir | None,
                    name: str = "checkpoint.pt") -> None:
    """Write the training state as `name` in the run directory (rank 0), after checking that
    no loss since the last log step was NaN: never save weights after a non-finite loss."""
    if state.window is not None:
        state.check_finite(t.dist.reduce_sum(state.window)[1].item())
    if run is not None:
        run.save_checkpoint(name, checkpoint.state(t.cfg, t.meta, t, state, t.device,
                                                   run.metrics_offset()))


def _summary(t: Training, state: LoopState, result: dict, wall_start: float,
             run_dir: str | Path | None) -> dict:
    cfg, world = t.cfg, t.dist.world_size
    summary = {
        "model": cfg.model, "dataset": cfg.dataset, "preset": cfg.preset,
        "epochs": cfg.epochs, "final_test_acc": state.history[-1],
        "best_test_acc": state.best_acc,
        "best_epoch": state.history.index(state.best_acc) + 1,
        "final_test_loss": result["loss"], "train_seconds": round(state.train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "images_per_second": round(state.images * world / state.train_seconds, 1),
        "steps": state.step, "parameters": count_parameters(t.model), "device": str(t.device),
        "precision": t.precision.name, "channels_last": t.channels_last,
        "world_size": world, "run_dir": str(run_dir),
    }
    if cfg.compile:  # compiling the model, not in train_seconds
        summary["compile_seconds"] = round(result["compile_seconds"] or 0.0, 3)
    return summary


def _run_path(cfg: Config, out, resume: dict | None, dist: distributed.Dist) -> Path | None:
    """Rank 0 checks, before anything trains or is written, that the run directory can be
    used and --tensorboard works; every rank learns the outcome, so a refusal stops all."""
    path, error = None, None
    if dist.main:
        path = Path(out or default_run_dir(cfg.model, cfg.dataset))
        try:
            RunDir.check(path, resume=resume is not None)
            if cfg.tensorboard:
                tensorboard_sink.check()
        except CnnlabError as e:
            error = e
    if dist.any(error is not None):
        raise error or CnnlabError("rank 0 refused the run directory (see its error)")
    return path


class tensorboard_sink:  # noqa: N801 - used like a function
    """A RunDir sink writing loss, accuracy, lr and utilisation as TensorBoard scalars."""

    KEYS = {"train": ("loss", "lr", "images_per_second"), "eval": ("test_loss", "test_acc"),
            "telemetry": ("cpu_percent", "rss_mb", "gpu_util", "gpu_mem_mb")}

    def __init__(self, run_path: Path) -> None:
        self.check()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_path / "tensorboard"))

    @staticmethod
    def check() -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise CnnlabError("--tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from None

    def __call__(self, record: dict) -> None:
        kind = record.get("type")
        x = record.get("step", record.get("elapsed", 0))
        for key in self.KEYS.get(kind, ()):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{kind}/{key}", record[key], x)

    def close(self) -> None:
        self.writer.close()
