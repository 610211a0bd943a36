"""`cnnlab bench`: time-to-accuracy and throughput against the reference pipeline in
cnnlab.reference (the lab report's way), measured in the same process where it can be.

Each suite is a sequence of row groups, one function each (`CPU_ROWS`, `GPU_ROWS`: the keys
`--rows` selects), sharing a `Bench`."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import resolve
from .devices import cpu_has_bf16, resolve_device
from .errors import CnnlabError
from .files import write_json
from .limits import usable_cpus
from .runs import SUMMARY, read_metrics
from .specs import SPECS

# torch and the trainer are imported where a benchmark runs: a missing input is reported
# before that, in well under a second.


def cnnlab_epoch(model: str, dataset: str, data_dir: str, max_steps: int | None = None,
                 warmup: int = 0, **options) -> dict:
    """Time cnnlab's own training over one epoch or `max_steps` steps after `warmup` untimed
    ones: the training loop's own epoch runner and step (held parameters, weight averages
    and all), without its evaluation, records, checkpoints or the process's start."""
    from .engine import Stopwatch
    from .trainer import build, torch_settings, train_epoch

    cfg = resolve(model, dataset, overrides={"data_dir": data_dir, "epochs": 1,
                                              "telemetry": 0, **options})
    device = resolve_device(cfg.device)
    with torch_settings(cfg, device):
        t = build(cfg, device)
        loop, clock = t.state.loop, Stopwatch(device)
        train_epoch(t, until=warmup)
        if loop.step < warmup:
            raise CnnlabError(f"{dataset} has fewer than {warmup} warm-up steps of training")
        first = loop.images
        clock.start()
        train_epoch(t, until=None if max_steps is None else warmup + max_steps)
        seconds = clock.lap()
    images = loop.images - first
    return {"seconds": seconds, "images": images, "images_per_second": images / seconds,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in options}}


def _process(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
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


@dataclasses.dataclass
class Bench:
    """What a suite's row functions share. `folder`: CIFAR-10 as an image folder with train/
    and test/, None where there is none; `tmp`: a folder for the runs' directories; `emit`
    takes each row as soon as it is measured, `say` a note on what runs next."""

    data_dir: str
    folder: str | None
    tmp: Path
    emit: Callable[[dict], None]
    say: Callable[[str], None]

    def reference_cmd(self) -> list[str]:
        """The reference's LeNet-5 epoch as a whole process."""
        return [sys.executable, "-m", "cnnlab.reference", "lenet-epoch", self.data_dir]

    def train_cmd(self, model: str, dataset: str, *options: str) -> list[str]:
        """`cnnlab train` as a whole process, quiet, on the bench's data."""
        return [sys.executable, "-m", "cnnlab", "train", model, dataset, "--data-dir",
                self.data_dir, "--quiet", *options]

    @property
    def cifar(self) -> str:
        """The CIFAR-10 the GPU rows train on: the image folder, else CIFAR-10's own files."""
        return "cifar10" if self.folder is None else f"folder:{self.folder}"

    def augment(self, model: str) -> dict:
        """A folder's fast preset does not augment: on the folder, augment as on CIFAR-10's."""
        if self.folder is None or model not in _FOLDER_AUGMENT:
            return {}
        return {"augment": _FOLDER_AUGMENT[model]}


def _loop_row(b: Bench) -> None:
    """The seed recipe's training loop, one epoch: the reference's, then cnnlab's."""
    from . import reference

    b.say("next: the lab report's LeNet-5 recipe, one epoch of the loop, reference then cnnlab")
    ref = reference.lenet_mnist_epoch(b.data_dir)["seconds"]
    ours = cnnlab_epoch("lenet5", "mnist", b.data_dir, preset="seed", device="cpu")["seconds"]
    b.emit({"name": "LeNet-5/MNIST seed recipe, one epoch of the loop (s)",
            "reference": ref, "cnnlab": ours, "ratio": ref / ours, "unit": "s",
            "target": ">= 3.0"})


def _process_row(b: Bench) -> None:
    """The same epoch as whole processes: start, data and (cnnlab's) evaluation counted."""
    b.say("next: the same as whole processes")
    ref, _ = _process(b.reference_cmd())
    ours, _ = _process(b.train_cmd("lenet5", "mnist", "--preset", "seed", "--epochs", "1",
                                   "--out", str(b.tmp / "seed")))
    b.emit({"name": "  same, whole process incl. start, data and evaluation (s)",
            "reference": ref, "cnnlab": ours, "ratio": ref / ours, "unit": "s",
            "target": "(reported)"})


def _fast_row(b: Bench) -> None:
    """Time-to-accuracy of the fast preset, whole process: seeds 0-4 timed, each right after
    a whole-process epoch of the reference (which shows the machine's speed at that moment:
    the two are compared per seed), and seeds 5-9 for their accuracy alone."""
    b.say("next: `cnnlab train lenet5 mnist` on seeds 0-9, seeds 0-4 each after a reference "
          "epoch (15 whole processes)")
    walls, accuracies, refs = [], [], []
    for seed in range(10):
        if seed < 5:
            refs.append(_process(b.reference_cmd())[0])
        out = b.tmp / f"fast{seed}"
        wall = _process(b.train_cmd("lenet5", "mnist", "--seed", str(seed), "--out", str(out)))[0]
        walls += [wall] if seed < 5 else []
        accuracies.append(json.loads((out / SUMMARY).read_text())["final_test_acc"])
    wall, ref = statistics.median(walls), statistics.median(refs)
    b.emit({"name": "LeNet-5/MNIST fast preset: whole process, median of seeds 0-4, lowest "
                    f"accuracy {min(accuracies[:5]):.2f}% (s; reference recorded, not run)",
            "reference": RECORDED_REFERENCE_SECONDS, "cnnlab": wall,
            "ratio": RECORDED_REFERENCE_SECONDS / wall, "unit": "s",
            "target": "<= 10 s and >= 99.0% each", "accuracy": accuracies[:5],
            "seconds": walls, "reference_epoch_process_seconds": refs,
            "note": "reference: a recorded figure, not measured in this run - the report's "
                    "recipe reached its best, 98.79%, after 20 epochs (SEED.md); the "
                    "reference's one-epoch process ran before each seed (seconds kept)"})
    paired = sorted(r / w for r, w in zip(refs, walls))
    b.emit({"name": "  same, against one epoch of the reference as a whole process, run before "
                    "each seed (s, medians; ratio: median of the seeds' own ratios, "
                    f"{paired[0]:.2f}-{paired[-1]:.2f})",
            "reference": ref, "cnnlab": wall, "ratio": statistics.median(paired), "unit": "s",
            "target": ">= 2.0 (at most half a reference epoch)", "paired_ratios": paired})
    b.emit({"name": f"  fast preset on seeds 0-9: lowest test accuracy {min(accuracies):.2f}% "
                    f"(median {statistics.median(accuracies):.2f}%)",
            "reference": None, "cnnlab": min(accuracies), "ratio": None, "unit": "%",
            "target": ">= 99.0 each", "accuracy": accuracies})


def _help_row(b: Bench) -> None:
    b.say("next: `cnnlab --help`, 5 times")
    helps = [_process([sys.executable, "-m", "cnnlab", "--help"])[0] for _ in range(5)]
    b.emit({"name": "`cnnlab --help` (s, median of 5)", "reference": None,
            "cnnlab": statistics.median(helps), "ratio": None, "unit": "s",
            "target": "<= 0.3 s"})


def _decode_rows(b: Bench) -> None:
    """The CIFAR-10 image folder's first decode and a read back from its cache."""
    if b.folder is None:
        return
    b.say("next: decoding the CIFAR-10 image folder into a new cache, then reading it back")
    first, cached = decode_seconds(b.folder)
    b.emit({"name": "CIFAR-10 image folder (60,000 JPEGs): first decode (s)",
            "reference": None, "cnnlab": first, "ratio": None, "unit": "s",
            "target": "<= 15 s"})
    b.emit({"name": "  same, read back from the cache (s)", "reference": None,
            "cnnlab": cached, "ratio": None, "unit": "s", "target": "< 1 s"})


def _resnet18_row(b: Bench) -> None:
    """ResNet-18 training throughput on the image folder: the reference's, then cnnlab's."""
    if b.folder is None:
        return
    from . import reference

    b.say("next: ResNet-18 training throughput, reference then cnnlab (the first run also "
          "decodes the image folder)")
    ref = reference.resnet18_throughput(str(Path(b.folder) / "train"), steps=3)
    ours = cnnlab_epoch("resnet18", f"folder:{b.folder}", b.data_dir, max_steps=6, warmup=2,
                        batch_size=128, precision="auto", channels_last=True,
                        device="cpu", augment="crop,flip")
    b.emit({"name": "ResNet-18/CIFAR-10 training, batch 128 (images/s)",
            "reference": ref["images_per_second"], "cnnlab": ours["images_per_second"],
            "ratio": ours["images_per_second"] / ref["images_per_second"],
            "unit": "img/s", "target": ">= 2.5 and >= 100 img/s",
            "cnnlab_config": ours["config"]})


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


def _ablation_rows(b: Bench) -> None:
    b.say("next: each speed option on and off")
    for row in ablation(b.data_dir, b.folder):
        b.emit(row)


BUSY_REPEATS = 3  # runs of each kind, quiet and busy (their median is the row's)


def _busy_rows(b: Bench) -> None:
    """The fast preset as a whole process, 0.3 epochs, on a quiet machine and beside busy
    processes that the bench starts itself (one per usable CPU): with the threads cnnlab took
    before (every usable CPU), with its default now (fewer beside busy processes), and with
    --threads 1. Medians of BUSY_REPEATS runs, interleaved."""

    cpus = usable_cpus()
    kinds = {"before (every CPU)": ["--threads", str(cpus)], "default": [],
             "--threads 1": ["--threads", "1"]}
    b.say(f"next: the fast preset on a quiet machine and beside {cpus} busy processes "
          f"({2 * len(kinds) * BUSY_REPEATS} whole processes)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    seconds: dict[tuple[str, str], list[float]] = {}
    for load in ("quiet", "busy"):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(cpus if load == "busy" else 0)]
        try:
            time.sleep(1.0 if spinners else 0)  # the load is there before cnnlab starts
            for i in range(BUSY_REPEATS):
                for kind, options in kinds.items():
                    out = str(b.tmp / f"busy-{load}-{kind.split()[0]}-{i}")
                    took, _ = _process(b.train_cmd("lenet5", "mnist", "--epochs", "0.3",
                                                   "--telemetry", "0", "--out", out, *options),
                                       env)
                    seconds.setdefault((load, kind), []).append(took)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    for load in ("quiet", "busy"):
        old = seconds[(load, "before (every CPU)")]
        before = statistics.median(old)
        for kind in ("default", "--threads 1"):
            ours = statistics.median(seconds[(load, kind)])
            b.emit({"name": f"LeNet-5 fast preset, 0.3 epochs, whole process, {load}"
                            f"{f' beside {cpus} busy processes' if load == 'busy' else ''}: "
                            f"{kind} against the old default, {cpus} threads (s, medians of "
                            f"{BUSY_REPEATS}; slowest {max(seconds[(load, kind)]):.1f} against "
                            f"{max(old):.1f})",
                    "reference": before, "cnnlab": ours, "ratio": before / ours, "unit": "s",
                    "target": ">= 0.95 quiet (noise), > 1 busy",
                    "seconds": {k[1]: v for k, v in seconds.items() if k[0] == load}})


# The row groups, in each suite's order: the keys `cnnlab bench --rows` selects.
CPU_ROWS: dict[str, Callable[[Bench], None]] = {
    "loop": _loop_row, "process": _process_row, "fast": _fast_row, "busy": _busy_rows,
    "help": _help_row, "decode": _decode_rows, "resnet18": _resnet18_row,
    "ablation": _ablation_rows}


def cpu_suite(data_dir: str, folder: str | None, emit: Callable[[dict], None],
              say: Callable[[str], None], keys: Iterable[str] = tuple(CPU_ROWS)) -> None:
    """The CPU rows of the groups `keys` (all by default), each handed to `emit` as soon as
    it is measured. Without `folder` (CIFAR-10 as an image folder) the ResNet-18 rows are
    left out."""
    keys = list(keys)
    if folder is None and {"decode", "resnet18", "ablation"} & set(keys):
        say("no CIFAR-10 image folder: the ResNet-18 rows are left out (give --cifar-folder)")
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(data_dir, folder, Path(tmp), emit, say)
        for key in keys:
            CPU_ROWS[key](b)


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


def _fastnet_rows(b: Bench) -> None:
    """fastnet's fast preset on seeds 0-4, eager then with --cuda-graph: training plus the
    final evaluation (as airbench counts), and GPU utilisation."""
    import cnnlab

    for graph in (False, True):
        flag = " --cuda-graph" if graph else ""
        b.say(f"next: the fastnet fast preset{flag} on seeds 0-4 (a few seconds each)")
        seconds, accuracies, utils = [], [], []
        for seed in range(5):
            out = b.tmp / f"fastnet{seed}{flag.strip()}"
            s = cnnlab.train("fastnet", b.cifar, data_dir=b.data_dir, out=out, seed=seed,
                             progress=False, eval_every=10_000, telemetry=0.5,
                             cuda_graph=graph, **b.augment("fastnet"))
            seconds.append(s["train_seconds"] + _last_eval_seconds(out))
            accuracies.append(s["final_test_acc"])
            utils.append(_util(out))
        mean = statistics.fmean(accuracies)
        b.emit({"name": f"fastnet fast preset{flag}, seeds 0-4: training + final evaluation "
                        f"(s, median; mean accuracy {mean:.2f}%)",
                "reference": None, "cnnlab": statistics.median(seconds), "ratio": None,
                "unit": "s", "target": "<= 2.0 s, mean >= 90.5%", "seconds": seconds,
                "accuracy": accuracies,
                "note": "airbench94 on the same data and GPU: 2.00-2.12 s, 90.53%"})
        known = [u for u in utils if u is not None]
        b.emit({"name": "  fastnet: mean GPU utilisation during training (%)",
                "reference": None, "cnnlab": statistics.fmean(known) if known else None,
                "ratio": None, "unit": "%", "target": ">= 90%"})


def _resnet18_gpu_rows(b: Bench) -> None:
    """A first ResNet-18 run as a whole process, its data decoded anew: time to 91%, GPU
    utilisation, and the time outside training."""
    b.say("next: a first ResNet-18 run, as a whole process (its data decoded anew)")
    out = b.tmp / "resnet18"
    source = b.cifar if b.folder is None else f"folder:{_folder_view(b.folder, b.tmp / 'view')}"
    wall, _ = _process(b.train_cmd("resnet18", source, "--telemetry", "0.5", "--out", str(out),
                                   *(f"--{k}={v}" for k, v in b.augment("resnet18").items())))
    s = json.loads((out / SUMMARY).read_text())
    b.emit({"name": "resnet18 fast preset: training time to 91% (s; best "
                    f"{s['best_test_acc']:.2f}%)",
            "reference": None, "cnnlab": time_to_accuracy(out, 91.0), "ratio": None,
            "unit": "s", "target": "<= 10 s"})
    b.emit({"name": "  resnet18: mean GPU utilisation during training (%)", "reference": None,
            "cnnlab": _util(out), "ratio": None, "unit": "%", "target": ">= 90%"})
    b.emit({"name": "  resnet18 first run: whole process minus training (s)",
            "reference": None, "cnnlab": wall - s["train_seconds"], "ratio": None,
            "unit": "s", "target": "<= 15 s"})


def _lenet5_gpu_rows(b: Bench) -> None:
    """LeNet-5's fast preset as a whole process, eager then with --cuda-graph: its training
    time and the whole process's."""
    for flag in ("", " --cuda-graph"):
        b.say(f"next: LeNet-5's fast preset{flag}, as a whole process")
        out = b.tmp / f"lenet5{flag.strip()}"
        wall, _ = _process(b.train_cmd("lenet5", "mnist", "--out", str(out), *flag.split()))
        s = json.loads((out / SUMMARY).read_text())
        b.emit({"name": f"lenet5 fast preset{flag}: training (s; {s['final_test_acc']:.2f}%)",
                "reference": None, "cnnlab": s["train_seconds"], "ratio": None, "unit": "s",
                "target": "<= 1.0 s, >= 99.0%"})
        b.emit({"name": "  lenet5: whole process (s)", "reference": None, "cnnlab": wall,
                "ratio": None, "unit": "s", "target": "<= 6 s"})


def _step_rows(b: Bench) -> None:
    """LeNet-5's and fastnet's training step time, eager against --compile and --cuda-graph."""
    b.say("next: the training step: eager, --compile (a minute: compiling), --cuda-graph")
    for model, source, batch in (("lenet5", "mnist", 64), ("fastnet", b.cifar, 1024)):
        times = {}
        for mode in ("eager", "compile", "cuda_graph"):
            r = cnnlab_epoch(model, source, b.data_dir, max_steps=40, warmup=5,
                             batch_size=batch, compile=mode == "compile",
                             cuda_graph=mode == "cuda_graph", **b.augment(model))
            times[mode] = 1000 * r["seconds"] / 40
        for mode in ("compile", "cuda_graph"):
            flag = f"--{mode.replace('_', '-')}"
            b.emit({"name": f"  {model} step, eager vs {flag} (ms)",
                    "reference": times["eager"], "cnnlab": times[mode],
                    "ratio": times["eager"] / times[mode], "unit": "ms",
                    "target": f"({flag} pays: > 1)"})


GPU_ROWS: dict[str, Callable[[Bench], None]] = {
    "fastnet": _fastnet_rows, "resnet18-gpu": _resnet18_gpu_rows,
    "lenet5-gpu": _lenet5_gpu_rows, "steps": _step_rows}


def gpu_suite(data_dir: str, folder: str | None, emit: Callable[[dict], None] | None = None,
              say: Callable[[str], None] = lambda text: None,
              keys: Iterable[str] = tuple(GPU_ROWS)) -> list[dict]:
    """The GPU rows of the groups `keys` (all by default), returned and each handed to `emit`
    as it is measured: fastnet's time to 90.5% over 5 seeds, ResNet-18's time to 91%,
    LeNet-5's training and whole process, GPU utilisation, a first run's time outside
    training, and the step time eager against --compile and --cuda-graph; fastnet and
    LeNet-5 also with --cuda-graph. On CIFAR-10's own files where `folder` has no train/."""
    import torch

    if not torch.cuda.is_available():
        raise CnnlabError("the gpu suite needs a CUDA GPU")
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if emit is not None:
            emit(row)

    folder = folder if folder and (Path(folder) / "train").is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(data_dir, folder, Path(tmp), add, say)
        for key in keys:
            GPU_ROWS[key](b)
    return rows


def row_keys(suite: str, rows: str | None = None) -> list[str]:
    """The keys of the row groups to run, in the suite's order: all of `suite`'s, or those
    the comma-separated `rows` names; a key the suite lacks is refused with the valid ones."""
    valid = [*(CPU_ROWS if suite in ("cpu", "all") else ()),
             *(GPU_ROWS if suite in ("gpu", "all") else ())]
    if rows is None:
        return valid
    asked = {key.strip() for key in rows.split(",")}
    if unknown := sorted(asked - set(valid)):
        raise CnnlabError(f"--rows: no row group {', '.join(map(repr, unknown))} in --suite "
                          f"{suite}; its keys are {','.join(valid)}")
    return [key for key in valid if key in asked]


def check_inputs(suite: str, data_dir: str, folder: str,
                 keys: Iterable[str] | None = None) -> str | None:
    """Before anything is timed: refuse (CnnlabError) what the row groups `keys` (default:
    all of the suite's) cannot do without, and return the CIFAR-10 image folder, or None
    where it is absent (the cpu suite leaves its rows out)."""

    keys = set(row_keys(suite) if keys is None else keys)
    raw = Path(data_dir) / "MNIST" / "raw"
    has_folder = (Path(folder) / "train").is_dir() and (Path(folder) / "test").is_dir()
    missing = []
    if keys & set(CPU_ROWS):  # the reference reads them with torchvision: not gzipped
        if not all((raw / f).is_file() for fs in SPECS["mnist"].files.values() for f in fs):
            missing.append(f"MNIST's four official IDX files in {raw}, uncompressed as "
                           "torchvision reads them (point --data-dir at the folder that holds "
                           "MNIST/; bench does not download)")
    if keys & set(GPU_ROWS):
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU")
        if not has_folder and not (Path(data_dir) / "cifar-10-batches-py").is_dir():
            missing.append(f"CIFAR-10: {Path(data_dir) / 'cifar-10-batches-py'} or an image "
                           f"folder with train/ and test/ (--cifar-folder, now {folder})")
    if missing:
        raise CnnlabError(f"cnnlab bench --suite {suite} needs {'; '.join(missing)}")
    return folder if has_folder else None


def run_bench(suite: str, data_dir: str, folder: str, out: str | None,
              rows: str | None = None) -> dict:
    """Check the inputs, then measure the suite's rows (those of the comma-separated row
    group keys `rows`, else all), printing each as it comes and writing all so far to `out`
    (JSON) after each."""
    keys = row_keys(suite, rows)
    cifar_folder = check_inputs(suite, data_dir, folder, keys)
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

    if cpu := [key for key in keys if key in CPU_ROWS]:
        cpu_suite(data_dir, cifar_folder, emit, say, cpu)
    if gpu := [key for key in keys if key in GPU_ROWS]:
        gpu_suite(data_dir, cifar_folder or folder, emit, say, gpu)
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
