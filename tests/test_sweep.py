"""`cnnlab sweep`: grid parsing, planning, resuming and the results files."""

import csv
import json
import signal
import statistics
import subprocess
import sys
import time

import pytest
from conftest import REPO

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.sweep import load_sweep_file, parse_grid_arg, plan_sweep
from cnnlab.worker import job_device

TINY = ["--epochs", "1", "--batch-size", "64", "--log-every", "2", "--lr", "0.05", "--quiet"]


@pytest.mark.parametrize("text,key,values", [
    ("pool=max,avg", "pool", ["max", "avg"]),
    ("lr=0.1,1e-3, 2", "lr", [0.1, 0.001, 2.0]),
    ("batch-size=32,64", "batch_size", [32, 64]),
    ("batch_size=128", "batch_size", [128]),
    ("nesterov=true,no", "nesterov", [True, False]),
    ("augment=none;crop,flip", "augment", ["none", "crop,flip"]),
    ("optimizer=sgd,adamax", "optimizer", ["sgd", "adamax"]),
])
def test_grid_values_take_the_config_field_types(text, key, values):
    assert parse_grid_arg(text) == (key, values)
    assert all(type(a) is type(b) for a, b in zip(parse_grid_arg(text)[1], values))


@pytest.mark.parametrize("text,message", [
    ("colour=red", "unknown grid key 'colour'"),
    ("lr=fast", "grid lr: 'fast' is not a float"),
    ("batch-size=1.5", "grid batch-size: '1.5' is not an int"),
    ("nesterov=maybe", "grid nesterov: 'maybe' is not a bool"),
    ("lr=0.1,", "grid lr: empty value"),
    ("lr", "write KEY=VALUE1,VALUE2"),
    ("seed=1,2", "use --seeds N"),
])
def test_bad_grid_arguments(text, message):
    with pytest.raises(CnnlabError, match=message):
        parse_grid_arg(text)


def test_plan_is_the_cross_product_times_the_seeds():
    plan = plan_sweep("lenet5", "mnist", grid={"pool": ["max", "avg"], "lr": [0.1, 0.01]},
                      seeds=3, options={"seed": 10, "epochs": 2}, train={"batch_size": 32})
    assert len(plan.runs) == 12 and plan.keys == ["pool", "lr"]
    first = [r.name for r in plan.runs[:4]]  # every point's first seed comes first
    assert first == ["pool=max-lr=0.1-seed=10", "pool=max-lr=0.01-seed=10",
                     "pool=avg-lr=0.1-seed=10", "pool=avg-lr=0.01-seed=10"]
    assert sorted({r.config.seed for r in plan.runs}) == [10, 11, 12]
    assert {r.point for r in plan.runs} == {"pool=max-lr=0.1", "pool=max-lr=0.01",
                                            "pool=avg-lr=0.1", "pool=avg-lr=0.01"}
    cfg = plan.runs[-1].config
    assert (cfg.pool, cfg.lr, cfg.epochs, cfg.batch_size, cfg.seed) == ("avg", 0.01, 2, 32, 12)


def test_plan_with_points_model_as_a_grid_key_and_errors():
    plan = plan_sweep(None, "mnist", points=[{"optimizer": "sgd", "lr": 0.01},
                                             {"optimizer": "adamax", "lr": 0.002}],
                      grid={"model": ["lenet5"]})
    assert [r.name for r in plan.runs] == ["optimizer=sgd-lr=0.01-model=lenet5-seed=0",
                                           "optimizer=adamax-lr=0.002-model=lenet5-seed=0"]
    assert plan.runs[1].config.lr == 0.002 and plan.runs[1].config.optimizer == "adamax"
    with pytest.raises(CnnlabError, match="--lr is a grid key"):
        plan_sweep("lenet5", "mnist", grid={"lr": [0.1, 0.2]}, options={"lr": 0.3})
    with pytest.raises(CnnlabError, match="unknown optimizer 'rmsprop'"):
        plan_sweep("lenet5", "mnist", grid={"optimizer": ["sgd", "rmsprop"]})
    with pytest.raises(CnnlabError, match="both a grid key and a key of the listed points"):
        plan_sweep("lenet5", "mnist", grid={"lr": [0.1]}, points=[{"lr": 0.2}])
    with pytest.raises(CnnlabError, match="a value is given twice"):
        plan_sweep("lenet5", "mnist", grid={"lr": [0.1, 0.10]})
    with pytest.raises(CnnlabError, match="needs MODEL and DATASET"):
        plan_sweep(None, None, grid={"lr": [0.1]})
    with pytest.raises(CnnlabError, match="seeds must be a positive integer"):
        plan_sweep("lenet5", "mnist", grid={"lr": [0.1]}, seeds=0)


def test_the_shipped_sweep_files_are_the_reports_experiments():
    spec = load_sweep_file(REPO / "configs" / "sweeps" / "pooling.toml")
    plan = plan_sweep(spec["model"], spec["dataset"], grid=spec.get("grid"),
                      points=spec.get("points"), seeds=spec["seeds"], train=spec["train"])
    assert {r.point for r in plan.runs} == {"pool=max", "pool=avg"} and plan.seeds == 3
    cfg = plan.runs[0].config
    assert (cfg.model, cfg.dataset, cfg.preset, cfg.epochs) == ("lenet5", "mnist", "fast", 1.5)
    plan = plan_sweep(spec["model"], spec["dataset"], grid=spec["grid"], train=spec["train"],
                      options={"preset": "seed"})  # --preset seed: the report's exact recipe
    cfg = plan.runs[0].config
    assert (cfg.preset, cfg.lr, cfg.batch_size, cfg.epochs, cfg.normalize) == (
        "seed", 0.001, 64, 64, False)

    spec = load_sweep_file(REPO / "configs" / "sweeps" / "cifar_optimizers.toml")
    plan = plan_sweep(spec["model"], spec["dataset"], grid=spec.get("grid"),
                      points=spec.get("points"), seeds=spec["seeds"], train=spec["train"])
    points = {r.point: r.config for r in plan.runs}
    assert list(points) == ["optimizer=sgd-lr=0.01", "optimizer=sgd-lr=0.02",
                            "optimizer=sgd-lr=0.001", "optimizer=adamax-lr=0.002"]
    for cfg in points.values():
        assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size, cfg.momentum) == (
            "resnet18", "cifar10", 30, 64, 0.9)
        assert (cfg.schedule, cfg.augment, cfg.normalize) == ("constant", "none", False)


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "lenet5"\nepochs = 3\n')
    with pytest.raises(CnnlabError, match="unknown key 'epochs'.*go in \\[train\\]"):
        load_sweep_file(bad)
    bad.write_text('points = ["sgd"]\n')
    with pytest.raises(CnnlabError, match="'points' must be a list of tables"):
        load_sweep_file(bad)
    bad.write_text("[grid\n")
    with pytest.raises(CnnlabError, match="not valid TOML"):
        load_sweep_file(bad)


def _results(path):
    with (path / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_sweep_runs_every_point_resumes_and_summarises(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid", "pool=max,avg",
            "--seeds", "2", "--out", str(out), *TINY]
    assert main(args) == 0
    names = ["pool=max-seed=0", "pool=avg-seed=0", "pool=max-seed=1", "pool=avg-seed=1"]
    for name in names:
        assert (out / name / "summary.json").is_file(), name
        assert json.loads((out / name / "config.json").read_text())["pool"] == name[5:8]
    for name in ("results.csv", "results.md", "accuracy.png", "loss.png", "comparison.png",
                 "sweep.json"):
        assert (out / name).is_file(), name
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)

    summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in names}
    rows = _results(out)
    assert [r["point"] for r in rows] == ["pool=max", "pool=avg"]
    for row in rows:
        runs = [s for n, s in summaries.items() if n.startswith(row["point"] + "-")]
        assert row["seeds"] == "2"
        for key in ("final_test_acc", "best_test_acc", "train_seconds", "images_per_second"):
            values = [s[key] for s in runs]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-3)
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-3)
    md = (out / "results.md").read_text()
    assert "| pool | seeds | final test acc (%) | best on test (%) | epochs to best" in md
    best = [summaries[n]["best_test_acc"] for n in names if n.startswith("pool=max")]
    assert "| max | 2 | " in md
    assert f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}" in md
    assert (" pooling won: " in md or "No significant difference between " in md) and \
        "Welch's t-test p = " in md and "2 seeds each" in md

    # Interrupted: one point never wrote its summary. Running again finishes only that one,
    # from its checkpoint.
    (out / "pool=avg-seed=0" / "summary.json").unlink()
    before = {n: (out / n / "summary.json").read_bytes() for n in names if n != names[1]}
    # a run written before --cuda-graph existed ran with its default: still this sweep's
    saved = json.loads((out / names[0] / "config.json").read_text())
    del saved["cuda_graph"]
    (out / names[0] / "config.json").write_text(json.dumps(saved))
    assert main([a for a in args if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[0] == ("cnnlab sweep: [2/4] pool=avg-seed=0: continuing "
                                           "from its checkpoint")
    assert "[1/4]" not in err and "[3/4]" not in err and "[4/4]" not in err
    assert all((out / n / "summary.json").read_bytes() == b for n, b in before.items())
    assert (out / "pool=avg-seed=0" / "summary.json").is_file()
    assert len(_results(out)) == 2

    # More seeds extend the sweep; other settings are another sweep and are refused.
    assert main([*args[:-len(TINY)], *TINY[:-1], "--seeds", "3", "--grid", "pool=max"]) == 0
    assert capsys.readouterr().err.count("finished before, skipped") == 2
    assert (out / "pool=max-seed=2" / "summary.json").is_file()
    assert [r["seeds"] for r in _results(out)] == ["3", "2"]  # every point of the sweep
    assert main([*args, "--epochs", "2"]) == 2
    assert "holds another sweep (--epochs 1 there, 2 here); give the same options to extend " \
        "it, or choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--grid", "colour=red"], "unknown grid key 'colour'"),
    (["--grid", "lr=0.1,fast"], "grid lr: 'fast' is not a float"),
    (["--grid", "pool=max,mean"], "unknown pool 'mean'"),
    (["--grid", "pool=max,avg", "--pool", "avg"], "--pool is a grid key"),
    (["--grid", "lr=0.1", "--seeds", "0"], "seeds must be a positive integer"),
    (["--grid", "lr=0.1", "--jobs", "0"], "--jobs must be a positive integer, at most 256, "
                                          "got 0"),
])
def test_cli_sweep_errors_are_one_line_exit_2(tiny_mnist, tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    code = main(["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--out", str(out),
                 *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cnnlab: error:")
    assert message in lines[0]
    assert not out.exists()  # nothing is trained before every point is known to be valid


def test_real_mnist_pooling_sweep(real_data, tmp_path):
    """The pooling sweep file end to end on the real MNIST, half an epoch, two seeds."""
    out = tmp_path / "pooling"
    res = subprocess.run(
        [sys.executable, "-m", "cnnlab", "sweep", "--config",
         str(REPO / "configs" / "sweeps" / "pooling.toml"), "--data-dir", str(real_data),
         "--epochs", "0.5", "--seeds", "2", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = _results(out)
    assert [r["point"] for r in rows] == ["pool=max", "pool=avg"]
    assert all(r["seeds"] == "2" and float(r["best_test_acc_mean"]) > 96 for r in rows)
    md = (out / "results.md").read_text()
    best = {pool: [json.loads((out / f"pool={pool}-seed={i}" / "summary.json").read_text())
                   ["best_test_acc"] for i in (0, 1)] for pool in ("max", "avg")}
    (win, a), (lose, b) = sorted(best.items(), key=lambda kv: -statistics.fmean(kv[1]))
    from scipy import stats

    p = stats.ttest_ind(a, b, equal_var=False).pvalue if statistics.stdev(a) + \
        statistics.stdev(b) else float(statistics.fmean(a) == statistics.fmean(b))
    said = (f"{win} pooling won: " if p < 0.05 else
            f"No significant difference between {win} pooling and {lose} pooling: ")
    assert (f"{said}{statistics.fmean(a):.2f} ± {statistics.stdev(a):.2f}% vs "
            f"{statistics.fmean(b):.2f} ± {statistics.stdev(b):.2f}% best test accuracy "
            f"(difference {statistics.fmean(a) - statistics.fmean(b):.2f} points, 95% "
            "confidence interval [") in md
    assert f"Welch's t-test p = {p:.2g}, 2 seeds each)." in md


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tiny_mnist, tmp_path, capfd, jobs):
    from cnnlab.report import write_report

    out = tmp_path / "sweep"
    args = ["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid", "lr=0.05,1e12",
            "--schedule", "constant", "--log-every", "1", "--epochs", "1", "--batch-size", "64",
            "--seeds", "2", "--out", str(out), "--jobs", jobs]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "[2/4] lr=1e+12-seed=0: diverged (the training loss became NaN or infinite" in err
    assert "going on with the other runs" in err
    for seed in (0, 1):
        assert (out / f"lr=0.05-seed={seed}" / "summary.json").is_file()
        bad = out / f"lr=1e+12-seed={seed}"
        assert not (bad / "summary.json").exists()
        assert "NaN or infinite" in json.loads((bad / "diverged.json").read_text())["error"]
    rows = _results(out)
    assert [(r["point"], r["seeds"], r["diverged"]) for r in rows] == [
        ("lr=0.05", "2", "0"), ("lr=1e+12", "0", "2")]
    assert rows[0]["best_test_acc_mean"] and rows[1]["best_test_acc_mean"] == ""
    md = (out / "results.md").read_text()
    assert "2 of 4 runs finished (2 more diverged" in md
    assert "| lr | seeds | diverged | final test acc (%)" in md
    assert "| 1e+12 | 0 | 2 | - |" in md
    assert "| [lr=1e+12-seed=0](lr=1e+12-seed=0/) | 0 | diverged at step 2 (epoch 1) |" in md
    assert json.loads((bad / "diverged.json").read_text())["step"] == 2

    # Running it again keeps the diverged runs as they are, like finished ones.
    before = (out / "lr=1e+12-seed=1" / "diverged.json").read_bytes()
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "before, skipped" not in err and "training" not in err  # the study is done
    assert (out / "lr=1e+12-seed=1" / "diverged.json").read_bytes() == before

    md = write_report([out], evaluate=False)["md"].read_text()
    assert ("Diverged runs (the loss became NaN; left out of the comparison's mean and std): "
            "lr=1e+12-seed=0, lr=1e+12-seed=1.") in md
    assert "| configuration | lr | runs | diverged |" in md and "| lr=1e+12 | 1e+12 | 0 | 2 |" in md
    assert "| status | diverged at step 2 (epoch 1) |" in md


def _metrics(run_dir):
    """A run's metrics records without their timings."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if not any(t in k for t in ("time", "second"))}
            for r in records if r["type"] != "telemetry"]


def test_concurrent_runs_give_the_one_by_one_results(tiny_mnist, tmp_path, capfd, monkeypatch):
    """--jobs 2: each run in a process of its own with half the cores, the same runs and
    results as one after another with as many threads (bitwise: the same losses)."""
    import torch

    monkeypatch.setattr("os.cpu_count", lambda: 2)  # so each of 2 jobs has 1 thread
    args = ["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid", "pool=max,avg",
            "--seeds", "2", "--log-every", "2", *TINY[:-3]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()
    assert main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    err = capfd.readouterr().err
    for i, run in enumerate(("pool=max-seed=0", "pool=avg-seed=0", "pool=max-seed=1",
                             "pool=avg-seed=1"), 1):  # each taken by one of the 2 workers
        assert sum(f"[{i}/4] {run}: training (job {job})" in err for job in (1, 2)) == 1, err
    assert err.count(": final ") == 4
    for run in ("pool=max-seed=0", "pool=avg-seed=0", "pool=max-seed=1", "pool=avg-seed=1"):
        a, b = tmp_path / "one" / run, tmp_path / "two" / run
        assert _metrics(a) == _metrics(b), run
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        assert sa["final_test_acc"] == sb["final_test_acc"] and sa["best_epoch"] == sb["best_epoch"]
    rows = {k: _results(tmp_path / k) for k in ("one", "two")}
    same = [k for k in rows["one"][0] if "seconds" not in k and "per_second" not in k]
    assert [[r[k] for k in same] for r in rows["one"]] == [[r[k] for k in same]
                                                           for r in rows["two"]]


def test_a_concurrent_run_that_fails_lets_the_others_finish(tiny_mnist, tmp_path, capfd):
    """A run that fails in its process (here: a device this machine lacks) is one line naming
    the run, exit 2; the run under way beside it finishes and is in the results."""
    out = tmp_path / "sweep"
    code = main(["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid",
                 "device=cpu,cuda:7", "--out", str(out), "--jobs", "2", *TINY])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "cnnlab: error: device=cuda-7-seed=0: --device cuda:7: ")  # no GPU, or not 8 of them
    assert (out / "device=cpu-seed=0" / "summary.json").is_file()
    assert [r["point"] for r in _results(out)] == ["device=cpu"]


def test_ctrl_c_stops_every_concurrent_run_and_the_same_command_continues(tiny_mnist,
                                                                        tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cnnlab", "sweep", "lenet5", "mnist", "--data-dir",
           str(tiny_mnist), "--grid", "pool=max,avg", "--batch-size", "16", "--log-every", "1",
           "--out", str(out), "--jobs", "2", "--quiet"]
    proc = subprocess.Popen([*cmd, "--epochs", "30"], stderr=subprocess.PIPE, text=True)
    runs = [out / "pool=max-seed=0", out / "pool=avg-seed=0"]
    deadline = time.monotonic() + 120
    while not all((r / "metrics.jsonl").is_file() for r in runs):  # both are training
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: stopping the 2 workers after their current step" in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "cnnlab: sweep stopped; run the same command again to continue (finished runs are "
        "kept, the stopped ones continue from their checkpoints)")
    for run in runs:
        assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()
    # A sweep with other options is refused though nothing finished; the same command
    # continues both runs from their checkpoints (no writer left: the workers ended).
    res = subprocess.run([*cmd, "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "holds another sweep (--epochs 30 there, 1 here)" \
        in res.stderr
    res = subprocess.run([*cmd, "--epochs", "30"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert [(r["point"], r["seeds"]) for r in _results(out)] == [("pool=max", "1"),
                                                                  ("pool=avg", "1")]


def test_job_slots_take_one_gpu_each_round_robin():
    assert [job_device("auto", slot, 2) for slot in range(4)] == \
        ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert job_device("cuda", 2, 3) == "cuda:2"
    assert [job_device(d, 1, 1) for d in ("auto", "cuda", "cpu")] == ["auto", "cuda", "cpu"]
    assert job_device("cuda:1", 0, 4) == "cuda:1" and job_device("cpu", 0, 4) == "cpu"


def test_verdict_tests_the_difference_before_calling_a_winner():
    from cnnlab.results import verdict

    def row(pool, mean, std, n):
        return {"label": pool, "config": {"pool": pool}, "best_test_acc_mean": mean,
                "best_test_acc_std": std, "n": n}

    # the 3-epoch pooling sweep's figures: no winner, and how many seeds would tell
    text = verdict([row("max", 99.30, 0.05, 3), row("avg", 99.23, 0.10, 3)], ["pool"])
    assert text.startswith("No significant difference between max pooling and avg pooling: "
                           "99.30 ± 0.05% vs 99.23 ± 0.10% best test accuracy (difference "
                           "0.07 points, 95% confidence interval [-0.14, 0.28], Welch's t-test "
                           "p = 0.36, 3 seeds each).")
    assert text.endswith("about 21 seeds a point.")
    text = verdict([row("avg", 99.0, 0.03, 5), row("max", 99.5, 0.02, 5)], ["pool"])
    assert text.startswith("max pooling won: 99.50 ± 0.02% vs 99.00 ± 0.03%")
    assert "p = 1e-08" in text
