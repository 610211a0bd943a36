"""argv -> config -> (dataset, model, optimiser) -> epochs -> run directory.

`fit` is the whole training program; read it top to bottom."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .config import RESUME_SAFE, Config, checkpoint_interval, typed_value, validate
from .data import Dataset, load_dataset
from .data.loader import DeviceLoader
from .engine import LoopState, Precision, WeightEMA, check_finite, evaluate, train_one_epoch
from .envinfo import collect_env
from .errors import CnnlabError, Interrupted, TrainingDiverged
from .models import count_parameters, create_model
from .plots import plot_run, plot_utilization
from .progress import Progress
from .runs import RunDir, default_run_dir, load_checkpoint
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


def model_meta(cfg: Config, data: Dataset) -> dict:
    """Everything needed to rebuild the model and its preprocessing without the dataset."""
    return {"name": cfg.model, "options": {"pool": cfg.pool} if cfg.pool else {},
            "in_channels": data.channels, "num_classes": len(data.classes),
            "image_size": list(data.image_size), "classes": data.classes,
            "mean": list(data.mean), "std": list(data.std), "normalize": cfg.normalize}


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
    """The run's own configuration, with only the changes that are safe to make."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise CnnlabError(f"nothing to resume in {run_dir}: it has no checkpoint.pt")
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    values = dict(saved)
    for key, value in overrides.items():
        if value is None or value == saved.get(key):
            continue
        if key not in RESUME_SAFE:
            raise CnnlabError(f"--{key.replace('_', '-')} {value} differs from the run's "
                              f"{saved.get(key)}; a resumed run keeps its configuration "
                              "(start a new run to change it)")
        if key == "epochs" and (value < ckpt["epoch"] or saved["schedule"] != "constant"):
            raise CnnlabError(f"--epochs {value}: a resumed run may only add epochs, and only "
                              f"with the constant schedule (this run's schedule, "
                              f"'{saved['schedule']}', was laid out for {saved['epochs']})")
        values[key] = typed_value(key, value)  # as resolve() types a new run's options
    cfg = Config(**values)
    validate(cfg)
    if ckpt["epoch"] >= cfg.epochs:
        raise CnnlabError(f"{run_dir} already finished its {cfg.epochs} epochs; pass --epochs N "
                          "to train more (constant schedule only) or start a new run")
    return cfg, ckpt


def fit(cfg: Config, out: str | Path | None = None, *, progress: bool = True,
        resume: dict | None = None) -> dict:
    """Train as `cfg` says, write the run directory, return the summary. `resume` is a
    checkpoint (from resume_config) to continue from, in the run directory `out`."""
    wall_start = time.perf_counter()
    dist, device = distributed.setup(resolve_device(cfg.device))
    try:
        return _fit(cfg, out, progress, resume, dist, device, wall_start)
    finally:
        distributed.cleanup()


@dataclass
class Parts:
    """Everything a run trains with, built from a Config (shared by fit and the benchmarks)."""

    data: Dataset
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


def build(cfg: Config, device: torch.device, dist: distributed.Dist | None = None) -> Parts:
    dist = dist or distributed.Dist()
    torch.manual_seed(cfg.seed)
    if cfg.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
    # warn_only: a few CUDA backward kernels (adaptive pooling) have no deterministic version
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    precision = Precision(resolve_precision(cfg.precision, device), device)
    # channels-last is faster for these convnets on GPUs and on CPUs (oneDNN) alike
    channels_last = cfg.channels_last if cfg.channels_last is not None else True
    if not dist.main:
        dist.barrier()  # rank 0 downloads and decodes first; the others then read its cache
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                        skip_bad_files=cfg.skip_bad_files)
    if dist.main:
        dist.barrier()
    model = create_model(cfg.model, in_channels=data.channels, num_classes=len(data.classes),
                         image_size=data.image_size, pool=cfg.pool).to(device)
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
    return Parts(data, model, net, generator, train_batches, test_batches, optimizer, scheduler,
                 nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), precision,
                 channels_last, WeightEMA(model, cfg.ema) if cfg.ema else None)


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


def _fit(cfg, out, progress, resume, dist, device, wall_start) -> dict:
    path = _run_path(cfg, out, resume, dist)
    p = build(cfg, device, dist)
    run = RunDir(path, resume=resume is not None) if path is not None else None
    with run or contextlib.nullcontext():
        if run is not None and cfg.tensorboard:
            run.add_sink(tensorboard_sink(run.path))
        state = LoopState()
        if resume is not None:
            restore(resume, p, state, device)
        if run is not None and resume is None:
            run.write_json("config.json", cfg.to_dict() | {"device": str(device),
                                                          "precision_used": p.precision.name,
                                                          "world_size": dist.world_size})
            run.write_json("env.json", collect_env(device))
        elif run is not None:
            run.truncate_metrics(resume["metrics_offset"])
        result = _train_epochs(cfg, p, state, run, progress, dist, device)
        summary = {
            "model": cfg.model, "dataset": cfg.dataset, "preset": cfg.preset,
            "epochs": cfg.epochs, "final_test_acc": state.history[-1],
            "best_test_acc": state.best_acc,
            "best_epoch": state.history.index(state.best_acc) + 1,
            "final_test_loss": result["loss"], "train_seconds": round(state.train_seconds, 3),
            "wall_seconds": round(time.perf_counter() - wall_start, 3),
            "images_per_second": round(state.images * dist.world_size / state.train_seconds, 1),
            "steps": state.step, "parameters": count_parameters(p.model), "device": str(device),
            "precision": p.precision.name, "channels_last": p.channels_last,
            "world_size": dist.world_size, "run_dir": str(run.path if run else out),
        }
        if cfg.compile:  # compiling the model, not in train_seconds
            summary["compile_seconds"] = round(result["compile_seconds"] or 0.0, 3)
        if resume is not None:
            summary["resumed_from_step"] = resume["step"]
        if run is not None:  # rank 0 alone writes
            plot_run(run.path)
            plot_utilization(run.path)
            run.write_json("summary.json", summary)
    return summary


def _train_epochs(cfg: Config, p: Parts, state: LoopState, run: RunDir | None, progress: bool,
                  dist: distributed.Dist, device: torch.device) -> dict:
    """The epochs: train, evaluate, log, checkpoint; stop cleanly on a signal. Returns the
    last evaluation."""
    every, unit = checkpoint_interval(cfg.checkpoint_every)
    meta = model_meta(cfg, p.data)
    bar = Progress(cfg.epochs * len(p.train_batches), enabled=progress and dist.main,
                   initial=state.step)

    def log(record: dict) -> None:
        if run is not None:
            run.log(record)
            bar.train(record)

    def checkpoint(name: str = "checkpoint.pt") -> None:
        if state.window is not None:  # never save weights after a non-finite loss
            check_finite(dist.reduce_sum(state.window)[1].item(), state)
        if run is None:
            return
        run.save_checkpoint(name, {
            "model": p.evaluated.state_dict(),  # with --ema, the average; else the weights
            **({"train_model": p.model.state_dict()} if p.ema else {}),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(), "epoch": state.epoch - 1,
            "step": state.step, "batch": state.batch, "config": cfg.to_dict(),
            "model_meta": meta, "test_acc": state.history[-1] if state.history else None,
            "loop": {k: v for k, v in vars(state).items() if k not in ("epoch", "step", "batch")},
            "rng": {"torch": torch.get_rng_state(), "loader": p.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "device_type": device.type,
            "scaler": p.precision.scaler.state_dict() if p.precision.scaler else None,
            "metrics_offset": run.metrics_offset()})

    compile_seconds = None  # with --compile: the first step's time, kept out of train_seconds

    def after_step(s: LoopState) -> bool:
        nonlocal compile_seconds
        if cfg.compile and compile_seconds is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_seconds = time.perf_counter() - t0
            if run is not None:
                run.log({"type": "compile", "step": s.step, "seconds": compile_seconds})
        stop = signals.signum is not None
        if dist.enabled:  # every rank stops at the same (log) step
            stop = dist.any(stop) if s.step % cfg.log_every == 0 else False
        if stop or (unit == "step" and s.step % every == 0):
            checkpoint()
        return stop

    with StopSignals() as signals, Sampler(run.log if run else None, device,
                                           cfg.telemetry if run else 0,
                                           lambda: state.images * dist.world_size), \
            torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
        try:
            while state.epoch <= cfg.epochs:
                if state.batch == 0:
                    state.order = p.train_batches.new_order()
                t0 = time.perf_counter()
                compiling = cfg.compile and compile_seconds is None
                try:
                    stopped = train_one_epoch(
                        p.net, p.train_batches.batches(state.order, state.batch), p.optimizer,
                        p.scheduler, p.criterion, state, precision=p.precision,
                        log_every=cfg.log_every, log=log, reduce_mean=dist.reduce_mean,
                        after_step=after_step, ema=p.ema)
                except RuntimeError as e:
                    if not (cfg.detect_anomaly and "nan values" in str(e)):
                        raise
                    raise TrainingDiverged(
                        f"anomaly detected at step {state.step + 1}: "
                        f"{str(e).splitlines()[0]}; the learning rate is probably too high "
                        "- try a smaller --lr") from None
                state.train_seconds += time.perf_counter() - t0 - (
                    (compile_seconds or 0.0) if compiling else 0.0)
                if stopped:
                    raise Interrupted(
                        f"{signal.Signals(signals.signum).name} at step {state.step} (epoch "
                        f"{state.epoch}); checkpoint written - resume with: cnnlab train "
                        f"--resume {run.path if run else ''}", 128 + signals.signum)
                result = evaluate(p.evaluated if p.ema else p.net, p.test_batches,
                                  precision=p.precision, tta_flip=cfg.tta == "flip",
                                  reduce_sum=dist.reduce_sum)
                state.history.append(result["accuracy"])
                record = {"type": "eval", "epoch": state.epoch, "steps": state.step,
                          "test_loss": result["loss"], "test_acc": result["accuracy"],
                          "train_seconds": state.train_seconds}
                if run is not None:
                    run.log(record)
                    bar.eval(record)
                best = result["accuracy"] > state.best_acc
                state.best_acc = max(state.best_acc, result["accuracy"])
                state.epoch, state.batch, state.order = state.epoch + 1, 0, None
                if unit == "step" or state.epoch > cfg.epochs or (state.epoch - 1) % every == 0:
                    checkpoint()
                if best:
                    checkpoint("best.pt")
        finally:
            bar.close()
    return result | ({"compile_seconds": compile_seconds} if cfg.compile else {})


def restore(ckpt: dict, p: Parts, state: LoopState, device: torch.device) -> None:
    """Put every piece of training state back as it was when `ckpt` was written."""
    saved = ckpt.get("device_type", "cpu")
    if saved != device.type:
        raise CnnlabError(f"this run was trained on {saved} and can only resume there "
                          f"(its random state is {saved}'s); pass --device {saved}")
    p.evaluated.load_state_dict(ckpt["model"])
    if p.ema:
        p.model.load_state_dict(ckpt["train_model"])
    p.optimizer.load_state_dict(ckpt["optimizer"])
    p.scheduler.load_state_dict(ckpt["scheduler"])
    if p.precision.scaler and ckpt.get("scaler"):
        p.precision.scaler.load_state_dict(ckpt["scaler"])
    for key, value in ckpt["loop"].items():
        setattr(state, key, value.to(device) if isinstance(value, torch.Tensor) else value)
    state.epoch, state.step, state.batch = ckpt["epoch"] + 1, ckpt["step"], ckpt["batch"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    p.generator.set_state(ckpt["rng"]["loader"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)


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
