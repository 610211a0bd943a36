"""argv -> config -> (dataset, model, optimiser) -> epochs -> run directory.

`fit` is the whole training program and `train_epochs` its loop; read them top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed, optim
from .checkpoint import ModelMeta
from .checks import checkpoint_interval, parse_image_size
from .config import run_config
from .data import Dataset, hold_out, load_dataset
from .data.loader import DeviceLoader, Loader
from .data.photos import PhotoLoader, Photos, default_workers
from .data.python import is_python
from .devices import resolve_device, resolve_precision
from .engine import (
    Batch,
    Lookahead,
    LoopState,
    Precision,
    Stopwatch,
    TrainState,
    WeightEMA,
    evaluate,
    make_train_step,
)
from .envinfo import collect_env
from .errors import CnnlabError, Interrupted, TrainingDiverged, one_line
from .files import atomic_write
from .limits import default_threads
from .models import REGISTRY, code, count_parameters, is_code, label
from .options import Config, format_value
from .plots import plot_run, plot_utilization
from .progress import Phase, Progress
from .results import format_epochs
from .resume import Resume
from .runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    DATA_INFO,
    DIVERGED,
    ENV,
    MODEL_SOURCE,
    SUMMARY,
    TENSORBOARD,
    RunDir,
    default_run_dir,
    new_dir,
)
from .stops import StopSignals
from .telemetry import Sampler


def parameter_groups(cfg: Config, model: nn.Module) -> list[dict]:
    """The trainable parameters in optimiser groups: batch-norm parameters learn
    `norm_lr_scale` times faster with the same weight decay per step (lr x weight decay),
    the rest at --lr. Frozen parameters (requires_grad off) are left out."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    scale = cfg.norm_lr_scale
    if scale == 1:
        return [{"params": trainable}]
    return [{"params": [p for p in trainable if id(p) not in norms]},
            {"params": [p for p in trainable if id(p) in norms], "lr": cfg.lr * scale,
             "weight_decay": cfg.weight_decay / scale}]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = parameter_groups(cfg, model)
    # fused: the whole update in one kernel rather than a loop of small ops per parameter
    fused = {"fused": True} if cfg.fused and cfg.optimizer != "adamax" else {}  # no fused Adamax
    if cfg.optimizer in ("sgd", "muon"):
        sgd = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                   weight_decay=cfg.weight_decay, **fused)
        if cfg.optimizer == "muon":  # Muon for the hidden layers' weights, this SGD for the rest
            return optim.MuonSGD(params, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
                                 matrices=hidden_weights(model), **sgd)
        return optim.SGD(params, **sgd)
    if cfg.cuda_graph:  # Adam's step counts stay on the device, as a graph needs
        fused["capturable"] = True
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "adamax": optim.Adamax}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def hidden_weights(model: nn.Module) -> list[nn.Parameter]:
    """What Muon updates: the weights of every convolution and every linear layer but the
    last (the head, which maps features to classes)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    head = next((m for m in reversed(layers) if isinstance(m, nn.Linear)), None)
    return [m.weight for m in layers if m is not head and m.weight.requires_grad]


def triangle(step: int, total_steps: int) -> float:
    """The triangle schedule's lr factor: linear from 0.2 up to 1 over the first 23% of the
    steps, then linear down to 0.07 at the last."""
    peak = max(1, int(0.23 * total_steps))
    if step < peak:
        return 0.2 + 0.8 * step / peak
    return 1.0 - 0.93 * (step - peak) / max(1, total_steps - peak)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    """A per-step schedule over the whole run (of each group's own peak lr)."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle" and total_steps >= 2:
        # a quarter of the run warms up; at least 1.5 steps, as OneCycleLR needs for very
        # short runs (fewer than 6 steps). The momentum stays --momentum: cycling it would
        # override the option, and a captured step (--cuda-graph) holds it fixed
        return sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                total_steps=total_steps, cycle_momentum=False,
                                pct_start=max(0.25, 1.5 / total_steps))
    if cfg.schedule == "triangle":
        return sched.LambdaLR(optimizer, lambda step: triangle(step, total_steps))
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "step":  # x0.1 at half and three quarters of the run
        return sched.MultiStepLR(optimizer, [total_steps // 2, total_steps * 3 // 4], 0.1)
    return sched.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class Training:
    """A run as built from its Config: the data and its loaders, the network the loop
    calls, the training step, and the TrainState that changes as it trains (shared by fit
    and `cnnlab bench`)."""

    cfg: Config
    device: torch.device
    dist: distributed.Dist
    data: Dataset
    meta: ModelMeta            # what rebuilds the model without the dataset
    net: nn.Module             # what the loop calls: the model, DDP-wrapped and/or compiled
    state: TrainState          # what changes as it trains, and what checkpoints hold
    train_step: Callable[[Batch], torch.Tensor]  # engine.make_train_step's, on `held`
    held: list[nn.Parameter]   # the parameters this epoch leaves as they are
    early: list[tuple[nn.Parameter, int]]  # (parameter, epochs): trained in those only
    train_batches: Loader       # DeviceLoader, or PhotoLoader for photos decoded each epoch
    test_batches: DeviceLoader
    val_batches: DeviceLoader | None  # the validation split best.pt is chosen on
    channels_last: bool
    total_steps: int           # epochs x batches per epoch, rounded: the last epoch may be cut
    own: OwnModel | None = None  # the user's own model: its code

    @property
    def epoch_count(self) -> int:
        """The epochs the run trains in, the last possibly in part."""
        return math.ceil(self.cfg.epochs)

    def epochs_done(self) -> float:
        return round(self.state.loop.step / len(self.train_batches), 4)


@contextlib.contextmanager
def torch_settings(cfg: Config, device: torch.device) -> Iterator[None]:
    """PyTorch's process-wide switches as `cfg` asks, restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             torch.get_num_threads())
    torch.set_num_threads(cfg.threads or default_threads())  # None: a Config outside fit
    if cfg.deterministic and device.type == "cuda" and saved[3] is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS needs it
    # warn_only: a few CUDA backward kernels (adaptive pooling) have no deterministic version.
    # Switched only when it changes (the call imports torch._inductor: a second or two);
    # while off, warn_only means nothing.
    switch = cfg.deterministic != saved[0] or (cfg.deterministic and not saved[1])
    if switch:
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    try:
        yield
    finally:
        if switch:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.set_num_threads(saved[4])
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def load_data(cfg: Config, progress: bool = True) -> Dataset:
    """The dataset `cfg` trains on, its validation split held out (downloaded and decoded
    on first use, cached after; `progress`: say how a long decode goes)."""
    size = parse_image_size(cfg.image_size) if cfg.image_size else None
    return hold_out(load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                                 skip_bad_files=cfg.skip_bad_files, image_size=size,
                                 progress=progress, in_memory=cfg.in_memory,
                                 photos="resized-crop" in cfg.augment),
                    cfg.val_split, cfg.seed)


def _check_graphable(cfg: Config, device: torch.device, dist: distributed.Dist,
                     precision: Precision) -> None:
    """What --cuda-graph needs of the machine (checks.validate checks the options)."""
    if cfg.cuda_graph and (device.type != "cuda" or dist.enabled):
        raise CnnlabError("--cuda-graph needs a GPU and one process: " + (
            f"this run trains on {device.type}; use --device cuda or leave --cuda-graph out"
            if device.type != "cuda" else "leave it out with torchrun or --nproc"))
    if cfg.cuda_graph and precision.scaler:
        raise CnnlabError("--cuda-graph: this GPU has no bf16, and fp16's loss scaling decides "
                          "on the host; use --precision fp32")


def _cpus(cfg: Config, device: torch.device) -> Config:
    """`cfg` with the CPU threads the loop trains with and, for photos decoded each epoch,
    the DataLoader workers that decode them - chosen once and kept in the run's
    configuration, so that a resume uses them. The workers share the CPUs with the loop
    rather than take theirs away: a worker busy only while it decodes leaves its core to
    the loop the rest of the time (ResNet-18 on the CIFAR-10 JPEGs, 2 cores: 164 img/s with
    the loop's 2 threads beside a worker, 92 with 1; benchmarks/RESULTS.md)."""
    threads = cfg.threads or default_threads()
    if "resized-crop" not in cfg.augment:
        return dataclasses.replace(cfg, threads=threads)
    workers = default_workers(device, threads) if cfg.workers is None else cfg.workers
    return dataclasses.replace(cfg, threads=threads, workers=workers)


def _loaders(cfg: Config, data: Dataset, device: torch.device, dist: distributed.Dist,
             generator: torch.Generator, channels_last: bool
             ) -> tuple[Loader, DeviceLoader, DeviceLoader | None]:
    """The training, test and (if there is one) validation batches, on the device."""
    augment = frozenset() if cfg.augment == "none" else frozenset(cfg.augment.split(","))
    common = dict(mean=data.mean, std=data.std, device=device, normalize=cfg.normalize,
                  channels_last=channels_last, rank=dist.rank, world_size=dist.world_size)

    def loader(x, y, **kwargs) -> DeviceLoader:
        return DeviceLoader(x if data.streamed else torch.from_numpy(x), torch.from_numpy(y),
                            on_disk=data.streamed, **common, **kwargs)

    # --compile, --cuda-graph: every training batch the same shape, or the last one would
    # recompile or not fit the graph
    shuffled = dict(batch_size=cfg.batch_size, shuffle=True, augment=augment,
                    generator=generator, drop_last=cfg.compile or cfg.cuda_graph)
    if isinstance(data.train_x, Photos):
        workers = default_workers(device, torch.get_num_threads()) if cfg.workers is None \
            else cfg.workers  # None: a Config outside fit (_cpus)
        train = PhotoLoader(data.train_x, torch.from_numpy(data.train_y), seed=cfg.seed,
                            workers=workers, skip_bad=cfg.skip_bad_files, **shuffled, **common)
    else:
        train = loader(data.train_x, data.train_y, **shuffled)
    test = loader(data.test_x, data.test_y, batch_size=cfg.eval_batch_size)
    val = None if data.val_x is None else loader(data.val_x, data.val_y,
                                                 batch_size=cfg.eval_batch_size)
    return train, test, val


@dataclass(frozen=True)
class OwnModel:
    """The user's own model as a run builds it: its class or function, or the instance given
    from Python; where its code comes from; and the bytes a new run keeps of it."""

    source: code.Source
    found: Callable[..., nn.Module] | None = None
    instance: nn.Module | None = None
    text: bytes | None = None  # None: the run has its copy already


def own_model(cfg: Config, resume: Resume | None = None, run_dir: str | Path | None = None,
              instance: nn.Module | None = None) -> OwnModel | None:
    """The code of the user's own model, for a new run or a resumed one (whose copy of the
    code is checked as eval's is: code.load_kept); None for other models."""
    if instance is None and not is_code(cfg.model):
        return None
    if resume is not None and resume.checkpoint is not None and instance is None:
        source = code.Source.from_dict(resume.checkpoint["model_meta"].get("source"))
        return OwnModel(source, code.load_kept(source, Path(run_dir) / MODEL_SOURCE,
                                               trust=resume.trust_code))
    if instance is not None:
        source, text = code.of_instance(instance)
        return OwnModel(source, type(instance), instance, text)
    found, source, text = code.load_new(cfg.model)
    return OwnModel(source, found, text=text)


def model_meta(cfg: Config, data: Dataset, own: OwnModel | None = None) -> ModelMeta:
    """What rebuilds the model `cfg` trains on `data`, and prepares its input, without them."""
    options = ({"pool": cfg.pool} if cfg.pool else {}) if cfg.model in REGISTRY else \
        code.parse_args(cfg.model_args)
    return ModelMeta(name=cfg.model, in_channels=data.channels, num_classes=len(data.classes),
                     image_size=data.image_size, classes=tuple(data.classes),
                     mean=tuple(data.mean), std=tuple(data.std), normalize=cfg.normalize,
                     options=options, fit="crop" if cfg.image_size else "resize",
                     source=own.source.to_dict() if own else None)


def _model(cfg: Config, meta: ModelMeta, own: OwnModel | None) -> nn.Module:
    """The model a run trains: built from its meta, or the instance given from Python, which
    its class must rebuild (eval, export and --resume rebuild it)."""
    if own is None or own.instance is None:
        return meta.build(found=own.found if own else None, pretrained=cfg.pretrained)
    if own.text is not None:
        with torch.random.fork_rng(devices=[]):  # the run's random numbers as they were
            rebuilt = meta.build(found=own.found)
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()}
                  for m in (rebuilt, own.instance)]
        if shapes[0] != shapes[1]:
            raise CnnlabError(f"{type(own.instance).__name__}(...) built by cnnlab with "
                              f"{', '.join(code.FACTS)} and model_args does not have the "
                              "layers of the model given; pass the arguments it was built with "
                              "as model_args={...}")
    return own.instance


def build(cfg: Config, device: torch.device, dist: distributed.Dist | None = None, *,
          progress: bool = True, own: OwnModel | None = None,
          data: Dataset | None = None) -> Training:
    """Load the data (or take `data`, handed over from Python) and build the model, loaders,
    optimiser and schedule (seeded by cfg)."""
    dist = dist or distributed.Dist()
    torch.manual_seed(cfg.seed)
    precision = Precision(resolve_precision(cfg.precision, device, cfg.model), device)
    _check_graphable(cfg, device, dist, precision)
    # channels-last is faster for these convnets on GPUs and on CPUs (oneDNN) alike
    channels_last = cfg.channels_last if cfg.channels_last is not None else True
    if not dist.main:
        dist.barrier()  # rank 0 downloads and decodes first; the others then read its cache
    data = load_data(cfg, progress and dist.main) if data is None else \
        hold_out(data, cfg.val_split, cfg.seed)
    if dist.main:
        dist.barrier()
    meta = model_meta(cfg, data, own)
    model = _model(cfg, meta, own).to(device)
    from .summary import check_model  # the layer where the images stop fitting, if any
    check_model(model, (meta.in_channels, *meta.image_size), meta.num_classes,
                label(cfg.model), cfg.dataset, built_in=cfg.model in REGISTRY)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    train, test, val = _loaders(cfg, data, device, dist, generator, channels_last)
    if hasattr(model, "init_from_data"):  # e.g. fastnet's whitening stem (a resume reloads)
        model.init_from_data(train.normalize(train.first_images(10_000)))
    optimizer = build_optimizer(cfg, model)
    total_steps = max(1, round(cfg.epochs * len(train)))
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    state = TrainState(model, optimizer, scheduler, precision, generator,
                       ema=WeightEMA(model, cfg.ema) if cfg.ema else None,
                       lookahead=Lookahead(model, total_steps) if cfg.lookahead else None,
                       loop=LoopState(window_correct=torch.zeros((), dtype=torch.float64,
                                                                 device=device)))
    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    held: list[nn.Parameter] = []
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_step = make_train_step(net, criterion, optimizer, scheduler, precision, held,
                                 graph=cfg.cuda_graph, correct=state.loop.window_correct)
    return Training(cfg=cfg, device=device, dist=dist, data=data, meta=meta, net=net,
                    state=state, train_step=train_step, held=held,
                    early=list(getattr(model, "early_parameters", list)()),
                    train_batches=train, test_batches=test, val_batches=val,
                    channels_last=channels_last, total_steps=total_steps, own=own)


def fit(cfg: Config, out: str | Path | None = None, *, progress: bool = True,
        on_eval: Callable[[dict], None] | None = None,
        resume: Resume | None = None, alone: bool = True,
        instance: nn.Module | None = None, data: Dataset | None = None) -> dict:
    """Train as `cfg` says, write the run directory, return the summary. `resume` (from
    resume_config) continues the run in the directory `out`; a run whose training is done
    but whose plots or summary are missing is only finished. `on_eval(record)` is called
    with each evaluation's metrics record once its checkpoints are written (a search's
    pruner may stop the run there by raising). `alone`: not one of a sweep's or search's runs
    (which compare recipes chosen on purpose): a run too short for its data says so.
    `instance`: the user's own model given as a module (from Python) rather than by name;
    `data`: the dataset handed over from Python (cfg.dataset names it)."""
    wall_start = time.perf_counter()
    dist, device = distributed.setup(resolve_device(cfg.device))
    cfg = _cpus(cfg, device)
    path = None
    try:
        path = _run_path(cfg, out, resume, dist)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_settings(cfg, device))
            own = own_model(cfg, resume, out, instance)
            training = build(cfg, device, dist, progress=progress, own=own, data=data)
            if progress and alone and dist.main and resume is None:
                _say_if_short(training)
            run = None
            if path is not None:  # a new run's config.json is its claim on the directory
                claim = None if resume else _run_config(training)
                if out is None:  # runs started in the same second get a directory each
                    path = new_dir(path)
                run = stack.enter_context(RunDir(path, config=claim))
            try:
                return _train_and_finish(training, run=run, resume=resume, on_eval=on_eval,
                            progress=progress, wall_start=wall_start)
            except TrainingDiverged as e:  # reports show the run as diverged at its step
                if run is not None:
                    run.write_json(DIVERGED, {"error": str(e), "step": e.step,
                                              "epoch": e.epoch})
                raise
    except OSError as e:  # a full disk: nothing written before is damaged
        if path is None:
            raise
        raise _unwritable(e, path) from None
    finally:
        distributed.cleanup()


def _unwritable(e: OSError, path: Path) -> CnnlabError:
    then = (f"continue with: cnnlab train --resume {path}"
            if (path / CONFIG).is_file() else "run the same command again")
    fix = ("free some space, then" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "once it can be written,")
    return CnnlabError(f"cannot write {e.filename or path}: {e.strerror or e}; {fix} {then}")


SHORT_RUN = 200  # training steps below which a run is too short to learn much


def _say_if_short(t: Training) -> None:
    """A note where the run is short for its data (a small folder under a preset made for
    MNIST-sized data: 1,437 images give 1.5 epochs of 34 steps), with what to pass."""
    if t.total_steps >= SHORT_RUN:
        return
    per_epoch = max(1, round(t.total_steps / t.cfg.epochs))
    enough = math.ceil(SHORT_RUN * 2 / per_epoch)
    steps, epochs = t.total_steps, t.cfg.epochs
    print(f"cnnlab: note: this run is short for its data: {steps} training "
          f"step{'' if steps == 1 else 's'} ({format_value(epochs)} "
          f"epoch{'' if epochs == 1 else 's'} of {len(t.data.train_y):,} images in batches "
          f"of {t.cfg.batch_size}); for a model that learns, pass --epochs {enough} or more",
          file=sys.stderr)


def _python_data(data: Dataset) -> dict:
    """data.json: the shapes, classes and digest of data handed over from Python."""
    return {"dataset": data.name, "digest": data.digest, "classes": data.classes,
            "train": list(data.train_x.shape), "test": list(data.test_x.shape),
            "resume": "from Python with the same data: cnnlab.train(resume=RUN_DIR, "
                      "dataset=DATA)"}


def _eval_steps(t: Training) -> float:
    """What one evaluation costs, in training steps, before one has been timed: its images
    (times the views test-time averaging takes) at a third of a training step's time each
    (a forward pass, no backward)."""
    views = {"flip": 2, "flip,translate": 6}.get(t.cfg.tta, 1)
    images = len(t.test_batches.labels) + (len(t.val_batches.labels) if t.val_batches else 0)
    return views * images / (3 * t.cfg.batch_size)


def _run_config(t: Training) -> dict:
    """config.json: the options as asked, and what they resolved to."""
    return run_config(t.cfg, t.device, t.state.precision.name, t.dist.world_size,
                      t.channels_last)


def _train_and_finish(t: Training, *, run: RunDir | None, resume: Resume | None,
         on_eval: Callable[[dict], None] | None, progress: bool, wall_start: float) -> dict:
    """Continue or start the training, then finish: plots and summary.json."""
    cfg, dist, loop = t.cfg, t.dist, t.state.loop
    resumed_from = None
    if resume is not None and resume.checkpoint is not None:  # rank 0 alone has the path
        where = run.path / CHECKPOINT if run is not None else CHECKPOINT
        offset = restore(t, resume.checkpoint, where)
        resumed_from = loop.step
        if run is not None:
            run.truncate_metrics(offset)
    elif resume is not None and run is not None:  # stopped before its first checkpoint
        run.truncate_metrics(0)
    if run is not None:
        if resume is not None:  # with the changes --resume allowed
            run.write_json(CONFIG, _run_config(t))
        if resume is None or resume.checkpoint is None:
            run.write_json(ENV, collect_env(t.device))
            if t.own is not None and t.own.text is not None:
                atomic_write(run.path / MODEL_SOURCE, t.own.text)
                code.remember(t.own.source)
            if is_python(cfg.dataset):  # what can be told of data that is not on disk
                run.write_json(DATA_INFO, _python_data(t.data))
        if cfg.tensorboard:
            run.add_sink(tensorboard_sink(run.path))
    with StopSignals() as signals:
        if loop.epoch <= t.epoch_count:
            with Progress(t.total_steps, epochs=t.epoch_count, planned=cfg.epochs,
                          enabled=progress and dist.main, initial=loop.step,
                          eval_every=cfg.eval_every, eval_steps=_eval_steps(t),
                          epoch=loop.epoch) as bar, \
                    Sampler(run.log if run else None, t.device, cfg.telemetry if run else 0,
                            lambda: loop.images * dist.world_size):
                train_epochs(t, run, bar, signals, on_eval)
        # Trained: the checkpoint holds the end. What follows, --resume redoes if it is cut.
        summary = _summary(t, wall_start, run.path if run else None)
        if resumed_from is not None:
            summary["resumed_from_step"] = resumed_from
        if run is not None:  # rank 0 alone writes
            for write in (plot_run, plot_utilization,
                          lambda path: run.write_json(SUMMARY, summary)):
                if signals.signum is not None:
                    raise _interrupted(signals.signum, loop, run, finishing=True)
                write(run.path)
    return summary


def restore(t: Training, ckpt: dict, path: str | Path = CHECKPOINT) -> int:
    """Put the training state back as `ckpt` (the file `path`) holds it, once checked to fit
    this run as built; returns the byte offset metrics.jsonl had when it was written."""
    shapes = [p.shape for group in t.state.optimizer.param_groups for p in group["params"]]
    checkpoint.check_fits(ckpt, checkpoint.ResumeTarget(
        fresh=t.state.state_dict(), parameter_shapes=shapes, data_digest=t.data.digest,
        dataset=t.cfg.dataset, images=len(t.train_batches.labels),
        batches=len(t.train_batches), total_steps=t.total_steps), path)
    try:  # what the checks do not see, torch's loading does
        t.state.load_state_dict(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise checkpoint.damaged(path, f"its state does not load into this run: "
                                 f"{one_line(e, 200)}") from None
    return ckpt["metrics_offset"]


def train_epoch(t: Training, after_step: Callable[[], None] = lambda: None,
                until: int | None = None) -> None:
    """Train the current epoch from its next batch to its end, or to step `until`, or to the
    run's last step: each batch one `t.train_step` (device work only), the weight averages
    moved, then `after_step()`, the host's part (log, checkpoint, stop), which may end the
    epoch by raising. The one epoch runner: fit's loop and `cnnlab bench` both call it."""
    loop = t.state.loop
    last = t.total_steps if until is None else min(until, t.total_steps)
    if loop.order is None:  # a new epoch
        loop.order = t.train_batches.new_order()
    t.held[:] = [p for p, epochs in t.early if loop.epoch > epochs]
    t.net.train()
    for batch in t.train_batches.batches(loop.order, loop.batch, loop.epoch):
        if loop.step >= last:  # a fraction of an epoch: the run ends here
            break
        loop.count(t.train_step(batch), len(batch[1]))
        t.state.update_averages()
        after_step()


def train_epochs(t: Training, run: RunDir | None, bar: Progress, signals: StopSignals,
                 on_eval: Callable[[dict], None] | None = None) -> None:
    """The loop: train each epoch step by step, evaluate it, record it, checkpoint it; on a
    signal, checkpoint and stop - within a step or an evaluation batch. The host's part of
    each piece is a method of `Host`; `train_step` only computes."""
    loop, clock = t.state.loop, Stopwatch(t.device)
    host = Host(t, run, bar, signals, clock)
    with _anomalies_as_divergence(t.cfg.detect_anomaly, loop):
        while loop.epoch <= t.epoch_count:
            clock.start()  # the epoch's training time: synchronised at its edges only
            host.new_window()
            train_epoch(t, host.after_step)
            loop.train_seconds += clock.lap()
            result, val = host.evaluate() if host.evaluation_due() else (None, None)
            host.stop_if_asked(collective=True)
            best = loop.end_epoch(result, val)
            record = host.log_eval(result, val) if result is not None else None
            host.checkpoint_epoch(best)
            if on_eval is not None and record is not None:  # e.g. a search's pruner
                on_eval(record)


class Host:
    """The host-side pieces of the loop, each small and named: log records, checkpoint
    cadence, stop requests and the evaluation, between calls of the training step."""

    def __init__(self, t: Training, run: RunDir | None, bar: Progress, signals: StopSignals,
                 clock: Stopwatch) -> None:
        self.t, self.run, self.bar, self.signals, self.clock = t, run, bar, signals, clock
        self.loop = t.state.loop
        self.every, self.unit = checkpoint_interval(t.cfg.checkpoint_every)
        self.compiling = t.cfg.compile  # with --compile: the first step's time is kept apart
        self.window_start, self.window_images = 0.0, 0
        self.eval_seconds = 0.0

    def new_window(self) -> None:
        """The images/s of the next train record count from here."""
        self.window_start, self.window_images = self.clock.started, self.loop.images

    def after_step(self) -> None:
        loop = self.loop
        self.bar.advance(loop.step / len(self.t.train_batches))
        if self.compiling:  # the first step compiled the model
            self.compiling, seconds = False, self.clock.lap()
            loop.compile_seconds = (loop.compile_seconds or 0.0) + seconds
            self._log({"type": "compile", "step": loop.step, "seconds": seconds})
            self.new_window()
        log_step = loop.step % self.t.cfg.log_every == 0
        if log_step:
            self.log_train()
        stop = self.signals.requested(self.t.dist, collective=log_step)
        if stop or (self.unit == "step" and loop.step % self.every == 0):
            loop.train_seconds += self.clock.lap()  # the checkpoint keeps it
            self.checkpoint()
            self.clock.start()
        if stop:
            raise self.interrupted()

    def log_train(self) -> None:
        """The loss and training accuracy since the last record (the one host sync of a log
        step: after it, the window's time is real) and the images per second."""
        loop = self.loop
        mean, accuracy = loop.take_window(self.t.dist.reduce_mean)
        now = time.perf_counter()
        self._log({"type": "train", "step": loop.step, "epoch": loop.epoch,
                   "epochs_done": self.t.epochs_done(), "loss": mean, "train_acc": accuracy,
                   "lr": self.t.state.optimizer.param_groups[0]["lr"],
                   "images_per_second": (loop.images - self.window_images)
                   / (now - self.window_start)}, self.bar.train)
        self.window_start, self.window_images = now, loop.images

    def evaluation_due(self) -> bool:
        epoch = self.loop.epoch
        return epoch % self.t.cfg.eval_every == 0 or epoch == self.t.epoch_count

    def evaluate(self) -> tuple[dict, dict | None]:
        """The epoch's test (and validation) loss and accuracy; on a signal mid-way, a
        checkpoint of the epoch's steps (--resume evaluates) and Interrupted."""
        t = self.t
        # evaluated eagerly (torch.compile's module keeps the one it compiled as _orig_mod):
        # the compiled one would recompile for eval mode and batch size
        eager = t.state.evaluated if t.state.ema else getattr(t.net, "_orig_mod", t.net)
        started = time.perf_counter()
        splits = [("test", t.test_batches), ("validation", t.val_batches)]
        total = sum(len(b.labels) for _, b in splits if b) * t.dist.world_size
        with Phase(f"epoch {format_epochs(t.epochs_done())}: evaluating", total, "images",
                   enabled=self.bar.enabled) as phase:
            result, val = (evaluate(eager, _counted(batches, phase, t.dist.world_size),
                                    precision=t.state.precision, tta=t.cfg.tta,
                                    reduce_sum=t.dist.reduce_sum,
                                    stop=lambda: self.signals.requested(t.dist,
                                                                        collective=False))
                           if batches else None for _, batches in splits)
        self.eval_seconds = time.perf_counter() - started  # its .tolist() waited for it
        if result is None or (t.val_batches and val is None):
            self.checkpoint()
            raise self.interrupted()
        return result, val

    def stop_if_asked(self, collective: bool) -> None:
        if self.signals.requested(self.t.dist, collective=collective):
            self.checkpoint()
            raise self.interrupted()

    def log_eval(self, result: dict, val: dict | None) -> dict:
        loop = self.loop
        record = {"type": "eval", "epoch": loop.epoch - 1, "steps": loop.step,
                  "epochs_done": self.t.epochs_done(),
                  "test_loss": result["loss"], "test_acc": result["accuracy"],
                  **({"val_loss": val["loss"], "val_acc": val["accuracy"]} if val else {}),
                  "train_seconds": loop.train_seconds,
                  "eval_seconds": round(self.eval_seconds, 4)}
        self._log(record, self.bar.eval)
        return record

    def checkpoint_epoch(self, best: bool) -> None:
        """best.pt if the epoch was the best so far, checkpoint.pt at the cadence asked."""
        loop, t = self.loop, self.t
        due = (self.unit == "step" or loop.epoch > t.epoch_count
               or (loop.epoch - 1) % self.every == 0)
        # best.pt first: a resume from an older checkpoint.pt writes it again
        names = (BEST,) * best + (CHECKPOINT,) * due
        if names:
            self.checkpoint(*names)

    def checkpoint(self, *names: str) -> None:
        save_checkpoint(self.t, self.run, *names)

    def interrupted(self) -> Interrupted:
        return _interrupted(self.signals.signum, self.loop, self.run)

    def _log(self, record: dict, show: Callable[[dict], None] | None = None) -> None:
        """Append `record` to metrics.jsonl (rank 0 only) and `show` it on the progress
        output."""
        if self.run is not None:
            self.run.log(record)
            if show is not None:
                show(record)


@contextlib.contextmanager
def _anomalies_as_divergence(detect: bool, loop: LoopState) -> Iterator[None]:
    """--detect-anomaly: autograd names the operation that produced a NaN; report it as a
    divergence (exit status 3) rather than a crash."""
    with torch.autograd.set_detect_anomaly(detect):
        try:
            yield
        except RuntimeError as e:
            if not (detect and "nan values" in str(e)):
                raise
            raise TrainingDiverged(
                f"anomaly detected at step {loop.step + 1}: {one_line(e)}; the learning "
                "rate is probably too high - try a smaller --lr", loop.step + 1,
                loop.epoch) from None


def _interrupted(signum: int | None, loop: LoopState, run: RunDir | None,
                 finishing: bool = False) -> Interrupted:
    signum = signum or signal.SIGTERM  # under torchrun: another rank received it
    where = ("while writing the plots and summary; training is complete - finish"
             if finishing else f"at step {loop.step} (epoch {loop.epoch}); checkpoint "
             "written - resume")
    return Interrupted(f"{signal.Signals(signum).name} {where} with: cnnlab train --resume "
                       f"{run.path if run else ''}", signum)


def save_checkpoint(t: Training, run: RunDir | None, *names: str) -> None:
    """Write the training state as each of `names` (default checkpoint.pt) in the run
    directory (rank 0), serialised once, after checking that no loss since the last log step
    was NaN: never save weights after a non-finite loss."""
    loop = t.state.loop
    if loop.window is not None:
        loop.check_finite(t.dist.reduce_sum(loop.window)[1].item())
    if run is not None:
        checkpoint.save({
            "format": checkpoint.FORMAT, **t.state.state_dict(),
            "model_meta": t.meta.to_dict(), "config": t.cfg.to_dict(),
            "data_digest": t.data.digest, "epochs_done": t.epochs_done(),
            "test_acc": loop.history[-1] if loop.history else None,
            "val_acc": loop.last_val["accuracy"] if loop.last_val else None,
            "metrics_offset": run.metrics_offset(),
        }, *(run.path / name for name in names or (CHECKPOINT,)))


def _summary(t: Training, wall_start: float, run_dir: str | Path | None) -> dict:
    cfg, world, loop = t.cfg, t.dist.world_size, t.state.loop
    best_done = round(min(loop.best_epoch, loop.step / len(t.train_batches)), 4)
    summary = {
        "model": cfg.model, "dataset": cfg.dataset, "preset": cfg.preset,
        "epochs": cfg.epochs, "epochs_done": t.epochs_done(),
        # the evaluation that chose best.pt ended its epoch, or the run (a fractional last one)
        "best_epochs_done": best_done,
        "final_test_acc": loop.history[-1],
        "best_test_acc": max(loop.history),  # best on test: an optimistic figure
        "best_epoch": best_done,  # the same count; best.pt's: chosen on validation if any
        "selected_on": "validation" if t.val_batches else "test",
        "final_test_loss": loop.last_eval["loss"],
        "train_seconds": round(loop.train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "images_per_second": round(loop.images * world / loop.train_seconds, 1),
        "steps": loop.step, "parameters": count_parameters(t.state.model),
        "device": str(t.device), "precision": t.state.precision.name,
        "channels_last": t.channels_last, "world_size": world, "run_dir": str(run_dir),
    }
    if t.val_batches:  # the honest figure: test accuracy of the model chosen on validation
        summary.update(final_val_acc=loop.last_val["accuracy"], best_val_acc=loop.best_acc,
                       test_acc_at_best=loop.best_test, val_images=len(t.data.val_y),
                       val_source=t.data.val_source)
    if cfg.compile:  # compiling the model, not in train_seconds
        summary["compile_seconds"] = round(loop.compile_seconds or 0.0, 3)
    return summary


def _run_path(cfg: Config, out, resume: Resume | None, dist: distributed.Dist) -> Path | None:
    """Rank 0 checks, before anything trains or is written, that the run directory can be
    used and --tensorboard works; every rank learns the outcome, so a refusal stops all."""
    path, error = None, None
    if dist.main:
        path = Path(out or default_run_dir(cfg.model, cfg.dataset))
        try:
            if out is not None:  # else the first free name is taken when it is created
                RunDir.check(path, resume=resume is not None)
            if cfg.tensorboard:
                tensorboard_sink.check()
        except CnnlabError as e:
            error = e
    if dist.any(error is not None):
        raise error or CnnlabError("rank 0 refused the run directory (see its error)")
    return path


def _counted(batches: Iterable, phase: Phase, ranks: int) -> Iterator:
    """`batches`, each counted in `phase` once it is handed on (the images of every rank)."""
    for x, y in batches:
        yield x, y
        phase.update(len(y) * ranks)


class tensorboard_sink:  # noqa: N801 - used like a function
    """A RunDir sink writing every figure the run's plots show - training loss, accuracy, lr
    and speed, test and validation loss and accuracy, utilisation - as TensorBoard scalars
    at their global step (utilisation at the last step trained, with its wall time)."""

    KEYS = {"train": ("loss", "train_acc", "lr", "images_per_second"),
            "eval": ("test_loss", "test_acc", "val_loss", "val_acc"),
            "telemetry": ("cpu_percent", "rss_mb", "gpu_util", "gpu_mem_mb")}
    STEP = {"train": "step", "eval": "steps"}  # the record's key of its global step

    def __init__(self, run_path: Path) -> None:
        self.check()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_path / TENSORBOARD))
        self.step = 0

    @staticmethod
    def check() -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise CnnlabError("--tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from None

    def __call__(self, record: dict) -> None:
        kind = record.get("type")
        if kind in self.STEP:
            self.step = record[self.STEP[kind]]
        for key in self.KEYS.get(kind, ()):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{kind}/{key}", record[key], self.step,
                                       walltime=record.get("time"))

    def close(self) -> None:
        self.writer.close()
