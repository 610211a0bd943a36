"""`cnnlab bench`: time-to-accuracy and throughput against the reference pipeline in
benchmarks/reference.py (the lab report's way), measured in the same process where it can be."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import resolve
from .errors import CnnlabError
from .files import write_json
from .runs import read_metrics

if TYPE_CHECKING:
    import torch

# torch and the trainer are imported where a benchmark runs: a missing input is reported
# before that, in well under a second.

REPO = Path(__file__).resolve().parents[2]


def _reference():
    path = REPO / "benchmarks" / "reference.py"
    if not path.is_file():
        raise CnnlabError("cnnlab bench needs the benchmarks/ folder of a source checkout")
    spec = importlib.util.spec_from_file_location("cnnlab_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cnnlab_epoch(model: str, dataset: str, data_dir: str, max_steps: int | None = None,
                 warmup: int = 0, **options) -> dict:
    """Time cnnlab's own training step (no evaluation, no process start) over one epoch or
    `max_steps` steps after `warmup` untimed ones, counting losses as the loop does."""
    from .engine import LoopState, make_train_step
    from .trainer import build, resolve_device, torch_settings

    cfg = resolve(model, dataset, overrides={"data_dir": data_dir, "epochs": 1,
                                              "telemetry": 0, **options})
    device = resolve_device(cfg.device)
    with torch_settings(cfg, device):
        t = build(cfg, device)
        train_step = make_train_step(t.net, t.criterion, t.optimizer, t.scheduler, t.precision,
                                     graph=cfg.cuda_graph)
        batches = t.train_batches.batches(t.train_batches.new_order())
        state = LoopState()
        t.net.train()
        start = None
        for batch in batches:
            if state.step == warmup:
                _sync(device)
                start, first = time.perf_counter(), state.images
            if max_steps and state.step == warmup + max_steps:
                break
            state.count(train_step(batch), len(batch[1]))
            if t.ema:
                t.ema.update(state.step)
        _sync(device)
    if start is None:
        raise CnnlabError(f"{dataset} has fewer than {warmup} warm-up steps of training")
    seconds = time.perf_counter() - start
    images = state.images - first
    return {"seconds": seconds, "images": images, "images_per_second": images / seconds,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in options}}


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _process(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise CnnlabError(f"benchmark command failed: {' '.join(cmd)}: "
                          f"{res.stderr.strip().splitlines()[-1:]}")
    return seconds, res.stdout


def time_to_accuracy(run_dir: Path, target: float) -> float | None:
    """Training seconds (evaluation excluded) until the first eval at >= target %."""
    for r in read_metrics(run_dir):
        if r.get("type") == "eval" and r["test_acc"] >= target:
            return r["train_seconds"]
    return None


# Every row's "ratio" says how many times better cnnlab is (> 1: cnnlab wins): reference /
# cnnlab for times ("unit": "s"), cnnlab / reference for rates ("img/s").


def cpu_suite(data_dir: str, folder: str | None, emit: Callable[[dict], None],
              say: Callable[[str], None]) -> None:
    """The CPU rows, each handed to `emit` as soon as it is measured. Without `folder` (CIFAR-10
    as an image folder) the ResNet-18 rows are left out."""
    ref = _reference()
    # 1. the seed recipe's training loop, one epoch
    say("next: the lab report's LeNet-5 recipe, one epoch of the loop, reference then cnnlab "
        "(about 30 s)")
    reference = ref.lenet_mnist_epoch(data_dir)
    ours = cnnlab_epoch("lenet5", "mnist", data_dir, preset="seed", device="cpu")
    emit({"name": "LeNet-5/MNIST seed recipe, one epoch of the loop (s)",
          "reference": reference["seconds"], "cnnlab": ours["seconds"],
          "ratio": reference["seconds"] / ours["seconds"], "unit": "s", "target": ">= 3.0"})
    py = sys.executable
    ref_cmd = [py, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import reference; "
               "reference.lenet_mnist_epoch(sys.argv[2])", str(REPO / "benchmarks"), data_dir]
    with tempfile.TemporaryDirectory() as tmp:
        say("next: the same as whole processes (about 40 s)")
        ref_s, _ = _process(ref_cmd)
        our_s, _ = _process([py, "-m", "cnnlab", "train", "lenet5", "mnist", "--preset", "seed",
                             "--epochs", "1", "--data-dir", data_dir, "--quiet",
                             "--out", f"{tmp}/seed"])
        emit({"name": "  same, whole process incl. start, data and evaluation (s)",
              "reference": ref_s, "cnnlab": our_s, "ratio": ref_s / our_s, "unit": "s",
              "target": "(reported)"})
        # 2. time-to-accuracy of the fast preset, whole process, on 5 seeds; each run
        # follows a whole-process epoch of the reference, which shows the machine's speed
        say("next: `cnnlab train lenet5 mnist` on seeds 0-4, each after a reference epoch "
            "(about 2.5 minutes)")
        walls, accuracies, refs = [], [], []
        for seed in range(5):
            refs.append(_process(ref_cmd)[0])
            walls.append(_process([py, "-m", "cnnlab", "train", "lenet5", "mnist", "--data-dir",
                                   data_dir, "--quiet", "--seed", str(seed),
                                   "--out", f"{tmp}/fast{seed}"])[0])
            summary = json.loads(Path(f"{tmp}/fast{seed}/summary.json").read_text())
            accuracies.append(summary["final_test_acc"])
        wall = statistics.median(walls)
        emit({"name": "LeNet-5/MNIST fast preset: whole process, median of seeds 0-4, lowest "
                      f"accuracy {min(accuracies):.2f}% (s; reference recorded, not run)",
              "reference": RECORDED_REFERENCE_SECONDS, "cnnlab": wall,
              "ratio": RECORDED_REFERENCE_SECONDS / wall, "unit": "s",
              "target": "<= 10 s and >= 99.0% each", "accuracy": accuracies,
              "seconds": walls, "reference_epoch_process_seconds": refs,
              "note": "reference: a recorded figure, not measured in this run - the report's "
                      "recipe reached its best, 98.79%, after 20 epochs (SEED.md); the "
                      "reference's one-epoch process ran before each seed (seconds kept)"})
        say("next: `cnnlab --help`, 5 times")
        helps = [_process([py, "-m", "cnnlab", "--help"])[0] for _ in range(5)]
        emit({"name": "`cnnlab --help` (s, median of 5)", "reference": None,
              "cnnlab": statistics.median(helps), "ratio": None, "unit": "s",
              "target": "<= 0.3 s"})
    if folder is None:
        say("no CIFAR-10 image folder: the ResNet-18 rows are left out (give --cifar-folder)")
    else:
        say("next: decoding the CIFAR-10 image folder into a new cache, then reading it back "
            "(about 30 s)")
        first, cached = decode_seconds(folder)
        emit({"name": "CIFAR-10 image folder (60,000 JPEGs): first decode (s)",
              "reference": None, "cnnlab": first, "ratio": None, "unit": "s",
              "target": "<= 15 s"})
        emit({"name": "  same, read back from the cache (s)", "reference": None,
              "cnnlab": cached, "ratio": None, "unit": "s", "target": "< 1 s"})
        # 3. ResNet-18 training throughput
        say("next: ResNet-18 training throughput, reference then cnnlab (about 60 s; the first run "
            "also decodes the image folder)")
        reference = ref.resnet18_throughput(str(Path(folder) / "train"), steps=3)
        ours = cnnlab_epoch("resnet18", f"folder:{folder}", data_dir, max_steps=6, warmup=2,
                            batch_size=128, precision="auto", channels_last=True,
                            device="cpu", augment="crop,flip")
        emit({"name": "ResNet-18/CIFAR-10 training, batch 128 (images/s)",
              "reference": reference["images_per_second"],
              "cnnlab": ours["images_per_second"],
              "ratio": ours["images_per_second"] / reference["images_per_second"],
              "unit": "img/s", "target": ">= 2.5 and >= 100 img/s",
              "cnnlab_config": ours["config"]})
    say("next: each speed option on and off (about 60 s, more with ResNet-18)")
    for row in ablation(data_dir, folder):
        emit(row)


def decode_seconds(folder: str) -> tuple[float, float]:
    """Seconds `load_dataset` takes on the image folder in a new process: first decoding it
    (into an empty cache: the folder is seen through a new folder of links to its train/ and
    test/, whatever cache it keeps itself), then again (reading that cache). The process's
    start is not counted."""
    code = ("import sys, time; t = time.perf_counter(); from cnnlab.data import load_dataset; "
            "load_dataset('folder:' + sys.argv[1], '.'); print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as tmp:
        view = _folder_view(folder, Path(tmp) / "images")
        env = {**os.environ, "CNNLAB_CACHE": str(Path(tmp) / "user-cache")}
        times = []
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", code, str(view)], capture_output=True,
                                 text=True, env=env)
            if res.returncode != 0:
                raise CnnlabError(f"decoding {folder} failed: "
                                  f"{res.stderr.strip().splitlines()[-1:]}")
            times.append(float(res.stdout.split()[-1]))
    return times[0], times[1]


# The report's recipe, run as written on this project's CPU machine, took 241 s to its best
# accuracy (SEED.md): too long to run in every bench, so row 2 quotes it as recorded.
RECORDED_REFERENCE_SECONDS = 241.0


# (model, dataset, the best CPU settings, timed steps, warm-up steps, each change alone)
_ABLATION = [
    ("lenet5", "mnist", dict(batch_size=64), 400, 20,
     [("channels_last", False), ("fused", False), ("precision", "bf16")]),
    # precision auto: bf16 where the CPU computes it natively (emulated it is many times
    # slower), else fp32; the other one is the change
    ("resnet18", "folder", dict(batch_size=128, augment="crop,flip", precision="auto"), 6, 2,
     [("precision", "other"), ("channels_last", False), ("fused", False)]),
]


def ablation(data_dir: str, folder: str | None) -> list[dict]:
    """Each engineering option of the training path on and off: images/s of cnnlab's loop
    with the best CPU settings against the same with one option changed (ratio > 1: the
    option pays), and evaluation time at the default batch of 1000 against batch 64."""
    import torch

    from .engine import evaluate
    from .trainer import build

    rows = []
    for model, dataset, best, steps, warmup, changes in _ABLATION:
        if dataset == "folder" and folder is None:
            continue
        dataset = f"folder:{folder}" if dataset == "folder" else dataset
        timed = dict(max_steps=steps, warmup=warmup, device="cpu")
        on = cnnlab_epoch(model, dataset, data_dir, **timed, **best)["images_per_second"]
        for key, value in changes:
            if (key, value) == ("precision", "other"):
                from .trainer import cpu_has_bf16

                value = "fp32" if cpu_has_bf16() else "bf16"
            off = cnnlab_epoch(model, dataset, data_dir, **timed,
                               **{**best, key: value})["images_per_second"]
            flag = f"--{key.replace('_', '-')} {value}" if not isinstance(value, bool) \
                else f"--{'' if value else 'no-'}{key.replace('_', '-')}"
            rows.append({"name": f"  {model} img/s: best CPU settings vs {flag}",
                         "reference": off, "cnnlab": on, "ratio": on / off, "unit": "img/s",
                         "target": "(on/off)", "option": {key: value}})
    seconds = {}
    for batch in (1000, 64):
        cfg = resolve("lenet5", "mnist", overrides={"data_dir": data_dir, "device": "cpu",
                                                     "eval_batch_size": batch})
        t = build(cfg, torch.device("cpu"))
        evaluate(t.net, t.test_batches)  # warm-up
        start = time.perf_counter()
        evaluate(t.net, t.test_batches)
        seconds[batch] = time.perf_counter() - start
    rows.append({"name": f"  LeNet-5 evaluation of {len(t.data.test_y):,} images (s): batch "
                         "1000 vs 64",
                 "reference": seconds[64], "cnnlab": seconds[1000],
                 "ratio": seconds[64] / seconds[1000], "unit": "s", "target": "(on/off)"})
    return rows


# What the GPU rows aim at on one H200 with the CIFAR-10 JPEG copy (issue 14), where the public
# airbench94 script took 2.00-2.12 s to 90.53 +- 0.09% on the same data.
_FOLDER_AUGMENT = {"fastnet": "translate,altflip", "resnet18": "crop,flip"}


def _util(run_dir: Path) -> float | None:
    """Mean NVML GPU utilisation (%) of a run's telemetry samples; None without any."""
    util = [r["gpu_util"] for r in read_metrics(run_dir)
            if r.get("type") == "telemetry" and r.get("gpu_util") is not None]
    return sum(util) / len(util) if util else None


def _last_eval_seconds(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if r.get("type") == "eval"][-1]["eval_seconds"]


def _folder_view(folder: str, into: Path) -> Path:
    """`folder` seen through a new folder of links to its splits: the same images with no
    cache yet, so that a run on it decodes them as a first run does."""
    into.mkdir()
    for split in ("train", "test", "val"):
        if (Path(folder) / split).is_dir():
            (into / split).symlink_to(Path(folder, split).resolve())
    return into


def gpu_suite(data_dir: str, folder: str | None, emit: Callable[[dict], None] | None = None,
              say: Callable[[str], None] = lambda text: None) -> list[dict]:
    """The GPU rows: fastnet's time to 90.5% over 5 seeds (training steps plus the final
    evaluation, as airbench counts), ResNet-18's time to 91%, LeNet-5's training and whole
    process, GPU utilisation, a first run's time outside training, and the step time eager
    against --compile and --cuda-graph; fastnet and LeNet-5 also with --cuda-graph."""
    import torch

    if not torch.cuda.is_available():
        raise CnnlabError("the gpu suite needs a CUDA GPU")
    import statistics as stats

    import cnnlab

    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if emit is not None:
            emit(row)

    official = not (folder and (Path(folder) / "train").is_dir())  # else CIFAR-10's own files
    dataset = "cifar10" if official else f"folder:{folder}"

    def augment(model: str) -> dict:  # a folder's fast preset does not augment: as CIFAR-10's
        return {} if official or model not in _FOLDER_AUGMENT else {
            "augment": _FOLDER_AUGMENT[model]}

    with tempfile.TemporaryDirectory() as tmp:
        for graph in (False, True):
            flag = " --cuda-graph" if graph else ""
            say(f"next: the fastnet fast preset{flag} on seeds 0-4 (a few seconds each)")
            seconds, accuracies, utils = [], [], []
            for seed in range(5):
                out = Path(tmp) / f"fastnet{seed}{flag.strip()}"
                s = cnnlab.train("fastnet", dataset, data_dir=data_dir, out=out, seed=seed,
                                 progress=False, eval_every=10_000, telemetry=0.5,
                                 cuda_graph=graph, **augment("fastnet"))
                seconds.append(s["train_seconds"] + _last_eval_seconds(out))
                accuracies.append(s["final_test_acc"])
                utils.append(_util(out))
            mean = stats.fmean(accuracies)
            add({"name": f"fastnet fast preset{flag}, seeds 0-4: training + final evaluation "
                         f"(s, median; mean accuracy {mean:.2f}%)",
                 "reference": None, "cnnlab": stats.median(seconds), "ratio": None,
                 "unit": "s", "target": "<= 2.0 s, mean >= 90.5%", "seconds": seconds,
                 "accuracy": accuracies,
                 "note": "airbench94 on the same data and GPU: 2.00-2.12 s, 90.53%"})
            known = [u for u in utils if u is not None]
            add({"name": "  fastnet: mean GPU utilisation during training (%)",
                 "reference": None, "cnnlab": stats.fmean(known) if known else None,
                 "ratio": None, "unit": "%", "target": ">= 90%"})

        say("next: a first ResNet-18 run, as a whole process (its data decoded anew)")
        out = Path(tmp) / "resnet18"
        source = dataset if official else f"folder:{_folder_view(folder, Path(tmp) / 'view')}"
        wall, _ = _process([sys.executable, "-m", "cnnlab", "train", "resnet18", source,
                            "--data-dir", data_dir, "--telemetry", "0.5", "--quiet", "--out",
                            str(out), *(f"--{k}={v}" for k, v in augment("resnet18").items())])
        s = json.loads((out / "summary.json").read_text())
        add({"name": "resnet18 fast preset: training time to 91% (s; best "
                     f"{s['best_test_acc']:.2f}%)",
             "reference": None, "cnnlab": time_to_accuracy(out, 91.0), "ratio": None,
             "unit": "s", "target": "<= 10 s"})
        add({"name": "  resnet18: mean GPU utilisation during training (%)", "reference": None,
             "cnnlab": _util(out), "ratio": None, "unit": "%", "target": ">= 90%"})
        add({"name": "  resnet18 first run: whole process minus training (s)",
             "reference": None, "cnnlab": wall - s["train_seconds"], "ratio": None,
             "unit": "s", "target": "<= 15 s"})

        for flag in ("", " --cuda-graph"):
            say(f"next: LeNet-5's fast preset{flag}, as a whole process")
            out = Path(tmp) / f"lenet5{flag.strip()}"
            wall, _ = _process([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                                "--data-dir", data_dir, "--quiet", "--out", str(out),
                                *flag.split()])
            s = json.loads((out / "summary.json").read_text())
            add({"name": f"lenet5 fast preset{flag}: training (s; "
                         f"{s['final_test_acc']:.2f}%)",
                 "reference": None, "cnnlab": s["train_seconds"], "ratio": None, "unit": "s",
                 "target": "<= 1.0 s, >= 99.0%"})
            add({"name": "  lenet5: whole process (s)", "reference": None, "cnnlab": wall,
                 "ratio": None, "unit": "s", "target": "<= 6 s"})

    say("next: the training step: eager, --compile (a minute: compiling), --cuda-graph")
    for model, source, batch in (("lenet5", "mnist", 64), ("fastnet", dataset, 1024)):
        times = {}
        for mode in ("eager", "compile", "cuda_graph"):
            r = cnnlab_epoch(model, source, data_dir, max_steps=40, warmup=5,
                             batch_size=batch, compile=mode == "compile",
                             cuda_graph=mode == "cuda_graph", **augment(model))
            times[mode] = 1000 * r["seconds"] / 40
        for mode in ("compile", "cuda_graph"):
            flag = f"--{mode.replace('_', '-')}"
            add({"name": f"  {model} step, eager vs {flag} (ms)", "reference": times["eager"],
                 "cnnlab": times[mode], "ratio": times["eager"] / times[mode], "unit": "ms",
                 "target": f"({flag} pays: > 1)"})
    return rows


def check_inputs(suite: str, data_dir: str, folder: str) -> str | None:
    """Before anything is timed: refuse (CnnlabError) what the suite cannot do without, and
    return the CIFAR-10 image folder, or None where it is absent (the cpu suite leaves its
    rows out)."""
    from .data import readers
    from .specs import SPECS

    raw = Path(data_dir) / "MNIST" / "raw"
    has_folder = (Path(folder) / "train").is_dir() and (Path(folder) / "test").is_dir()
    missing = []
    if suite in ("cpu", "all"):
        if not (REPO / "benchmarks" / "reference.py").is_file():
            missing.append("the benchmarks/ folder of a source checkout (reference.py)")
        if not all(readers.find_idx(raw, f) for fs in SPECS["mnist"].files.values() for f in fs):
            missing.append(f"MNIST's four official IDX files in {raw} (point --data-dir at the "
                           "folder that holds MNIST/; bench does not download)")
    if suite in ("gpu", "all"):
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU")
        if not has_folder and not (Path(data_dir) / "cifar-10-batches-py").is_dir():
            missing.append(f"CIFAR-10: {Path(data_dir) / 'cifar-10-batches-py'} or an image "
                           f"folder with train/ and test/ (--cifar-folder, now {folder})")
    if missing:
        raise CnnlabError(f"cnnlab bench --suite {suite} needs {'; '.join(missing)}")
    return folder if has_folder else None


def run_bench(suite: str, data_dir: str, folder: str, out: str | None) -> dict:
    """Check the inputs, then measure the suite's rows, printing each as it comes and
    writing all so far to `out` (JSON) after each."""
    cifar_folder = check_inputs(suite, data_dir, folder)
    from .envinfo import collect_env

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "env": collect_env(), "rows": []}
    print(_header(results), flush=True)

    def emit(row: dict) -> None:
        results["rows"].append(row)
        print(format_row(row), flush=True)
        if out:
            write_json(out, results)

    def say(text: str) -> None:  # what runs next and about how long, or what is left out
        print(f"cnnlab bench: {text}", file=sys.stderr, flush=True)

    if suite in ("cpu", "all"):
        cpu_suite(data_dir, cifar_folder, emit, say)
    if suite in ("gpu", "all"):
        gpu_suite(data_dir, cifar_folder or folder, emit, say)
    return results


def _header(results: dict) -> str:
    env = results["env"]
    gpus = ", ".join(g["name"] for g in env["gpus"]) or "no GPU"
    return "\n".join([f"cnnlab bench, {results['date']}: {env['cpu_model']}, "
                      f"{env['cpu_cores_logical']} cores, {gpus}; torch {env['torch']}", "",
                      f"{'benchmark':<62} {'reference':>10} {'cnnlab':>10} {'ratio':>7}  target"])


def format_row(r: dict) -> str:
    def number(v) -> str:
        return f"{v:10.2f}" if isinstance(v, float) else f"{'-':>10}"

    ratio = f"{r['ratio']:7.2f}" if r.get("ratio") is not None else f"{'-':>7}"
    return (f"{r['name']:<62} {number(r.get('reference'))} {number(r.get('cnnlab'))} {ratio}  "
            f"{r['target']}")


def format_table(results: dict) -> str:
    return "\n".join([_header(results), *(format_row(r) for r in results["rows"])])
