"""The sweep engine's figures (issue: sweeps and searches on a real engine), on real MNIST:

1. one worker against two (one thread each) on the same 16-run sweep: wall time ratio, beside
   what the host allows (two independent one-thread trainings at once against one after
   the other);
2. the engine's own time per point (taking a point, ending it, its heartbeats) against the
   training it schedules;
3. (--tune, instead) `cnnlab tune` with the median pruner against none, on the same 24 trials
   (random sampler, one seed: the same suggestions) of LeNet-5 for 2 epochs each: the
   epochs trained in all and the best validation accuracy.

    python benchmarks/sweep_engine.py --data-dir ../shared/data [--tune] [--out engine.json]

Every figure is measured in this run, one after another, so compare them only as ratios."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["lenet5", "mnist", "--grid", "lr=0.02,0.04,0.06,0.08,0.1,0.12,0.14,0.16",
         "--seeds", "2", "--epochs", "0.5", "--telemetry", "0", "--quiet"]


def sweep_seconds(data_dir: str, out: Path, jobs: int) -> float:
    """A whole `cnnlab sweep` process of the 16 runs with `jobs` workers of one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnlab", "sweep", *SWEEP, "--data-dir", data_dir,
                    "--out", str(out), "--jobs", str(jobs)], env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def parallel_baseline(data_dir: str, folder: Path) -> float:
    """What this host allows: two independent one-thread training processes at once, against
    the same two one after another (wall time ratio; 0.5 where two cores run truly apart)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(name: str) -> list[str]:
        return [sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist", "--data-dir",
                data_dir, "--epochs", "1", "--telemetry", "0", "--quiet", "--out",
                str(folder / name)]

    start = time.perf_counter()
    for name in ("a", "b"):
        subprocess.run(cmd(name), env=env, check=True, capture_output=True)
    apart = time.perf_counter() - start
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd(n), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for n in ("c", "d")]
    assert all(p.wait() == 0 for p in procs)
    return (time.perf_counter() - start) / apart


def engine_seconds_per_point(folder: Path, points: int = 16, studies: int = 10) -> float:
    """Creating a study of the sweep's `points` points, then taking and ending each in
    SQLite, with a heartbeat recorded for each, `studies` times: seconds per point."""
    from cnnlab.study import Study

    start = time.perf_counter()
    for n in range(studies):
        study = Study(f"sqlite:///{folder / 'bench.db'}", f"bench{n}", {"bench": n},
                      points=[{"run": f"r{i}"} for i in range(points)])
        while (trial := study.take()) is not None:
            with study.heartbeat(trial._trial_id):
                pass
            study.finish(trial, 1.0)
    return (time.perf_counter() - start) / (points * studies)


TUNE = ["lenet5", "mnist", "--space", "lr=0.002:2:log", "--space", "batch-size=32,64,128",
        "--trials", "24", "--epochs", "2", "--val-split", "0.1", "--sampler", "random",
        "--seed", "0", "--telemetry", "0", "--quiet"]


def tune_figures(data_dir: str, out: Path, pruner: str) -> dict:
    """Epochs trained in all, and the best validation accuracy, of the 24-trial search."""
    from cnnlab.runs import read_metrics

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnlab", "tune", *TUNE, "--data-dir", data_dir,
                    "--pruner", pruner, "--out", str(out)], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    epochs, best = 0.0, 0.0
    for trial in out.glob("trial-*"):
        evals = [r for r in read_metrics(trial) if r.get("type") == "eval"]
        epochs += max((r["epochs_done"] for r in evals), default=0.0)
        best = max([best, *(r["val_acc"] for r in evals)])
    return {"seconds": round(seconds, 1), "epochs": round(epochs, 2), "best_val_acc": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out")
    parser.add_argument("--tune", action="store_true", help="the pruner's figures instead")
    args = parser.parse_args()
    if args.tune:
        with tempfile.TemporaryDirectory() as tmp:
            figures = {p: tune_figures(args.data_dir, Path(tmp) / p, p) for p in ("median", "none")}
        print(json.dumps(figures, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist", "--data-dir",
                        args.data_dir, "--epochs", "0.01", "--out", str(Path(tmp) / "warm"),
                        "--quiet"], check=True, capture_output=True)  # caches warm
        one = sweep_seconds(args.data_dir, Path(tmp) / "one", 1)
        two = sweep_seconds(args.data_dir, Path(tmp) / "two", 2)
        runs = [json.loads(p.read_text()) for p in (Path(tmp) / "one").glob("*/summary.json")]
        per_point = engine_seconds_per_point(Path(tmp))
        baseline = parallel_baseline(args.data_dir, Path(tmp))
    training = sum(r["wall_seconds"] for r in runs) / len(runs)
    figures = {"one_worker_s": round(one, 2), "two_workers_s": round(two, 2),
               "ratio": round(two / one, 3), "host_parallel_ratio": round(baseline, 3),
               "engine_s_per_point": round(per_point, 4),
               "run_wall_s_mean": round(training, 2),
               "engine_share": round(per_point / training, 5)}
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
