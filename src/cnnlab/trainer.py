"""argv -> config -> (dataset, model, optimiser) -> epochs -> run directory.

`fit` is the whole training program; read it top to bottom."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .data import Dataset, load_dataset
from .data.loader import DeviceLoader
from .engine import evaluate, train_one_epoch
from .envinfo import collect_env
from .errors import CnnlabError
from .models import count_parameters, create_model
from .plots import plot_run
from .progress import Progress
from .runs import RunDir, default_run_dir


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adamax": torch.optim.Adamax}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def model_meta(cfg: Config, data: Dataset) -> dict:
    """Everything needed to rebuild the model and its preprocessing without the dataset."""
    return {"name": cfg.model, "options": {"pool": cfg.pool} if cfg.pool else {},
            "in_channels": data.channels, "num_classes": len(data.classes),
            "image_size": list(data.image_size), "classes": data.classes,
            "mean": list(data.mean), "std": list(data.std), "normalize": cfg.normalize}


def fit(cfg: Config, out: str | Path | None = None, *, progress: bool = True) -> dict:
    """Train as `cfg` says, write the run directory, return the summary."""
    wall_start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    model = create_model(cfg.model, in_channels=data.channels, num_classes=len(data.classes),
                         image_size=data.image_size, pool=cfg.pool).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    augment = frozenset() if cfg.augment == "none" else frozenset(cfg.augment.split(","))
    common = dict(mean=data.mean, std=data.std, device=device, normalize=cfg.normalize)
    train_batches = DeviceLoader(torch.from_numpy(data.train_x), torch.from_numpy(data.train_y),
                                 batch_size=cfg.batch_size, shuffle=True, augment=augment,
                                 generator=generator, **common)
    test_batches = DeviceLoader(torch.from_numpy(data.test_x), torch.from_numpy(data.test_y),
                                batch_size=cfg.eval_batch_size, **common)
    optimizer = build_optimizer(cfg, model.parameters())
    total_steps = cfg.epochs * len(train_batches)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    run = RunDir(out or default_run_dir(cfg.model, cfg.dataset))
    run.write_json("config.json", cfg.to_dict() | {"device": str(device)})
    run.write_json("env.json", collect_env(device))
    bar = Progress(total_steps, enabled=progress)
    meta = model_meta(cfg, data)
    step, best_acc, train_seconds, images, history = 0, -math.inf, 0.0, 0, []

    def on_train(record: dict) -> None:
        run.log(record)
        bar.train(record, record["step"])

    try:
        for epoch in range(1, cfg.epochs + 1):
            stats = train_one_epoch(model, train_batches, optimizer, scheduler, criterion,
                                    epoch=epoch, step=step, log_every=cfg.log_every,
                                    log=on_train)
            step, train_seconds = stats["step"], train_seconds + stats["seconds"]
            images += stats["images"]
            result = evaluate(model, test_batches)
            record = {"type": "eval", "epoch": epoch, "steps": step,
                      "train_loss": stats["loss"], "test_loss": result["loss"],
                      "test_acc": result["accuracy"], "train_seconds": train_seconds}
            run.log(record)
            bar.eval(record, step)
            history.append(result["accuracy"])
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                     "config": cfg.to_dict(), "model_meta": meta, "test_acc": result["accuracy"],
                     "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()}}
            run.save_checkpoint("checkpoint.pt", state)
            if result["accuracy"] > best_acc:
                best_acc = result["accuracy"]
                run.save_checkpoint("best.pt", state)
    finally:
        bar.close()
        run.close()

    plot_run(run.path)
    summary = {
        "model": cfg.model, "dataset": cfg.dataset, "preset": cfg.preset, "epochs": cfg.epochs,
        "final_test_acc": history[-1], "best_test_acc": best_acc,
        "best_epoch": history.index(best_acc) + 1, "final_test_loss": result["loss"],
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "images_per_second": round(images / train_seconds, 1), "steps": step,
        "parameters": count_parameters(model), "device": str(device),
        "run_dir": str(run.path),
    }
    run.write_json("summary.json", summary)
    return summary
