"""`cnnlab tune`: the space, its refusals, a search end to end, pruning, a dead worker's trial
continued from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_mnist

from cnnlab.cli import main
from cnnlab.config import load_toml, resolve
from cnnlab.errors import CnnlabError
from cnnlab.runs import read_metrics
from cnnlab.tune import Dim, parse_space

QUICK = ["--val-split", "0.1", "--log-every", "5", "--telemetry", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("tune") / "data")


def _study(out):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.parametrize("text,dim", [
    ("lr=0.01:0.5:log", Dim("lr", 0.01, 0.5, log=True)),
    ("label_smoothing=0:0.2", Dim("label_smoothing", 0.0, 0.2)),
    ("batch-size=32:256:log", Dim("batch_size", 32, 256, log=True)),
    ("batch-size=32,64, 128", Dim("batch_size", values=(32, 64, 128))),
    ("lr=0.1,1", Dim("lr", values=(0.1, 1.0))),
    ("nesterov=true,no", Dim("nesterov", values=(True, False))),
    ("augment=none;crop,flip", Dim("augment", values=("none", "crop,flip"))),
    ("epochs=1:3", Dim("epochs", 1, 3)),
])
def test_space_specs_take_the_option_types(text, dim):
    parsed = parse_space(text)
    assert parsed == dim
    assert [type(v) for v in parsed.values] == [type(v) for v in dim.values]
    assert type(parsed.low) is type(dim.low)


@pytest.mark.parametrize("args,message", [
    (["--space", "colour=1:2"], "--space 'colour=1:2': unknown option 'colour'"),
    (["--space", "learning-rate=0.1:1"], "unknown option 'learning-rate'; did you mean lr?"),
    (["--space", "seed=0:9"], "--space seed: a search over seeds finds the luckiest seed"),
    (["--space", "model=lenet5,resnet18"], "a search compares recipes of one MODEL"),
    (["--space", "device=cpu,cuda"], "--space device: it fits a run to the machine"),
    (["--space", "image-size=28,32"], "--space image-size: it is neither a number nor one of"),
    (["--space", "val-split=0.1:0.2"], "must share one validation split"),
    (["--space", "lr"], "--space 'lr': write KEY=LOW:HIGH, KEY=LOW:HIGH:log or KEY=A,B,C"),
    (["--space", "lr=0.1:0.5:lin"], "--space lr=0.1:0.5:lin: write LOW:HIGH or LOW:HIGH:log"),
    (["--space", "lr=0.1:0.2:0.3"], "write LOW:HIGH or LOW:HIGH:log"),
    (["--space", "lr=fast:1"], "--space lr=fast:1: 'fast' is not a float"),
    (["--space", "batch-size=16.5:64"], "--space batch-size=16.5:64: '16.5' is not an int"),
    (["--space", "lr=0.5:0.1"], "--space lr=0.5:0.1: LOW must be below HIGH"),
    (["--space", "lr=0.1:0.1"], "LOW must be below HIGH"),
    (["--space", "weight-decay=0:0.01:log"], "a log scale needs LOW above 0"),
    (["--space", "lr=0:0.1"], "--space lr=0:0.1: --lr must be positive, got 0"),
    (["--space", "batch-size=64:9999999"], "--batch-size must be at most 1,048,576"),
    (["--space", "momentum=0.5:2"], "--momentum must be at most 1"),
    (["--space", "lr=0.1:inf"], "--lr must be a finite number"),
    (["--space", "label-smoothing=0:1"],
     "--space label-smoothing: --label-smoothing must be in [0, 1), got 1"),
    (["--space", "optimizer=sgd,rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--space", "optimizer=0:1"], "optimizer takes one of its values, not a range"),
    (["--space", "lr=0.1"], "give two values or more, or fix it with --lr 0.1"),
    (["--space", "lr=0.1,"], "an empty value"),
    (["--space", "lr=0.1,0.10"], "a value is given twice"),
    (["--space", "lr=0.1:1", "--space", "lr=0.2,0.3"], "--space lr is given twice"),
    (["--space", "lr=0.1:1", "--lr", "0.3"], "--lr is searched (--space lr=...)"),
    (["--space", "lr=0.1:1", "--sampler", "grid"], "--sampler grid tries lists of values only"),
    (["--space", "lr=0.1:1", "--trials", "0"], "--trials must be a positive integer"),
    (["--space", "lr=0.1:1", "--jobs", "0"], "--jobs must be a positive integer"),
    (["--space", "lr=0.1:1", "--sampler", "cmaes"], "argument --sampler: invalid choice"),
    (["--space", "lr=0.1:1", "--target", "0"], "--target is a validation accuracy in percent"),
    (["--space", "lr=0.1:1", "--target", "100.5"], "above 0 and at most 100, got 100.5"),
    (["--space", "lr=0.1:1", "--target", "nan"], "above 0 and at most 100, got nan"),
    (["--space", "lr=0.1:1", "--target", "99", "--pruner", "median"],
     "--pruner median compares validation accuracies, and with --target a trial is scored"),
    (["--space", "lr=0.1:1", "--pruner", "time"], "--pruner time stops trials slower than"),
    ([], "the following arguments are required: --space"),
])
def test_bad_searches_are_one_line_exit_2_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "tune"
    try:
        code = main(["tune", "lenet5", "mnist", "--val-split", "0.1", "--out", str(out), *args])
    except SystemExit as e:  # what argparse refuses
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert captured.out == "" and not out.exists()


def test_a_search_without_a_validation_split_is_refused(tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "lenet5", "mnist", "--space", "lr=0.01:0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnlab: error: tune chooses trials on validation accuracy and this "
                          "search has no validation split: choosing on the test split would make "
                          "the best trial's test accuracy optimistic")
    assert err.endswith("pass --val-split 0.1") and "\n" not in err
    assert not out.exists()
    with pytest.raises(CnnlabError, match="pass --val-split"):
        from cnnlab.tune import plan_tune

        plan_tune("lenet5", "mnist", ["lr=0.01:0.1"], options={"val_split": 0.0})


def test_a_search_end_to_end(data, tmp_path, capfd):
    from cnnlab.options import COMPARED
    from cnnlab.report import write_report

    out = tmp_path / "tune"

    def tune(*more, lr="lr=0.01:0.3:log"):
        return main(["tune", "lenet5", "mnist", "--data-dir", str(data), "--space", lr,
                     "--space", "batch-size=32,64", "--epochs", "0.5", "--out", str(out),
                     *QUICK[:-1], *more])

    assert tune("--trials", "4") == 0
    captured = capfd.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert f"cnnlab tune: train it: cnnlab train lenet5 mnist --config {out}/best.toml" \
        in captured.err
    assert "cnnlab tune: 4 of 4 trials: 4 complete." in captured.err
    study = _study(out)
    assert len(study.trials) == 4
    best = study.best_trial
    assert best.user_attrs["run"] == f"trial-{best.number:04d}"
    summary = json.loads((out / best.user_attrs["run"] / "summary.json").read_text())
    assert best.value == summary["best_val_acc"] and summary["selected_on"] == "validation"

    # best.toml trains the best trial's run again: its options, as cnnlab train reads them
    cfg = resolve("lenet5", "mnist", file_values=load_toml(out / "best.toml"))
    assert (cfg.lr, cfg.batch_size) == (best.params["lr"], best.params["batch-size"])
    ran = json.loads((out / best.user_attrs["run"] / "config.json").read_text())
    assert all(ran[k] == v for k, v in cfg.to_dict().items() if k in COMPARED)
    assert "muon-lr" not in (out / "best.toml").read_text()  # it means nothing with sgd
    assert (out / "best.toml").read_text().startswith(
        f"# cnnlab tune: the best trial of {out}: {best.user_attrs['run']}, best validation "
        f"accuracy {best.value:.2f}%")
    for name in ("results.md", "history.png", "importance.png", "tune.json"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    assert "| trial | state | lr | batch-size | best val acc (%) | test acc of best.pt (%) |" in md
    assert f"## The best trial: {best.user_attrs['run']}" in md
    assert f"![Loss of {best.user_attrs['run']}]({best.user_attrs['run']}/loss.png)" in md
    for t in study.trials:
        assert (out / f"trial-{t.number:04d}" / "summary.json").is_file()

    # the same command again: the search is done; with more --trials it goes on
    assert tune("--trials", "4", "--quiet") == 0
    assert len(_study(out).trials) == 4
    assert tune("--trials", "5", "--quiet") == 0
    assert len(_study(out).trials) == 5 and (out / "trial-0004" / "summary.json").is_file()
    capfd.readouterr()
    assert tune("--trials", "5", lr="lr=0.01:0.2:log") == 2
    assert f"{out} holds another search" in capfd.readouterr().err

    md = write_report([out], evaluate=False)["md"].read_text()
    assert md.startswith(f"# cnnlab report: search {out.name} (5 runs)")
    assert "## Search" in md and "- [Search](#search)" in md and "](history.png)" in md
    assert "| batch-size | " in md and "(searched) |" in md and "## Comparison" in md


def test_a_search_for_the_fastest_recipe_to_a_target(data, tmp_path, capfd):
    """--target: trials are scored by their training seconds, the fastest whose final
    validation accuracy reached the target is the best; below it a trial does not count
    however fast, and one already slower than the best is stopped at an evaluation."""
    from cnnlab.report import write_report

    out = tmp_path / "tune"
    # the lr that learns nothing (1e-6) finishes as fast, but stays far below the target
    args = ["tune", "lenet5", "mnist", "--data-dir", str(data), "--space",
            "lr=0.000001,0.05", "--space", "epochs=2,4", "--sampler", "grid", "--target",
            "50", "--batch-size", "32", "--out", str(out), *QUICK]
    assert main(args) == 0
    err = capfd.readouterr().err
    info = json.loads((out / "tune.json").read_text())
    assert info["plan"]["tune"]["target"] == 50
    rows = {(r["params"]["lr"], r["params"]["epochs"]): r for r in info["rows"]}
    assert len(rows) == 4, err
    for (lr, _), r in rows.items():
        if r["state"] == "complete":
            assert r["train_seconds"] > 0 and r["final_val_acc"] is not None
            assert (r["final_val_acc"] >= 50) == (lr == 0.05), r
    best = info["best"]
    assert best["params"]["lr"] == 0.05 and best["final_val_acc"] >= 50
    reached = [r for r in info["rows"] if r["state"] == "complete"
               and r["final_val_acc"] >= 50]
    assert best["train_seconds"] == min(r["train_seconds"] for r in reached)
    study = _study(out)
    assert study.direction.name == "MINIMIZE"
    for t in study.trials:
        if t.state.name == "COMPLETE":
            run = json.loads((out / t.user_attrs["run"] / "summary.json").read_text())
            assert t.value == run["train_seconds"]
            assert t.constraints == {"shortfall": pytest.approx(50 - run["final_val_acc"])}
    for t in (t for t in study.trials if t.state.name == "PRUNED"):  # slower than the best
        evals = [r for r in read_metrics(out / t.user_attrs["run"]) if r["type"] == "eval"]
        assert len(evals) < t.params["epochs"]
        assert evals[-1]["train_seconds"] >= best["train_seconds"]
    toml = (out / "best.toml").read_text()
    assert toml.startswith(f"# cnnlab tune: the fastest trial of {out} to reach 50% on "
                           f"validation: {best['run']}, ")
    md = (out / "results.md").read_text()
    assert "| training (s) | final val acc (%) | final test acc (%) |" in md
    assert "complete trials reached the target, 50% on validation." in md
    assert f"Fastest to the target: {best['run']}, " in md
    assert (out / "history.png").is_file()
    assert "Fastest to the target" in write_report([out], evaluate=False)["md"].read_text()

    # a target no trial reaches: one line, exit 2, the results still written
    capfd.readouterr()
    missed = tmp_path / "missed"
    assert main(["tune", "lenet5", "mnist", "--data-dir", str(data), "--space",
                 "lr=0.000001,0.000002", "--target", "90", "--trials", "1", "--epochs", "1",
                 "--out", str(missed), *QUICK]) == 2
    assert "no trial of the search reached 90% on validation" in capfd.readouterr().err
    assert (missed / "results.md").is_file()


def test_the_pruner_stops_hopeless_trials(data, tmp_path, capfd, monkeypatch):
    """A learning rate too small to learn anything against one that learns: after the first
    complete trial, a hopeless one is stopped after its first epoch. Its run directory stays
    as the pruner left it: the epoch it trained, its checkpoint, no summary.json."""
    from cnnlab.report import write_report

    monkeypatch.setattr("cnnlab.tune.PRUNER_STARTUP", 1)
    out = tmp_path / "tune"
    assert main(["tune", "lenet5", "mnist", "--data-dir", str(data), "--space",
                 "lr=0.000001,0.05", "--sampler", "random", "--trials", "3", "--epochs", "3",
                 "--batch-size", "32", "--out", str(out), *QUICK[:-1]]) == 0
    err = capfd.readouterr().err
    pruned = [t for t in _study(out).trials if t.state.name == "PRUNED"]
    assert pruned, err
    for t in pruned:
        run = out / t.user_attrs["run"]
        assert t.params["lr"] == 0.000001
        assert f"{run.name}: pruned after epoch 1 (validation " in err
        assert [r["epoch"] for r in read_metrics(run) if r["type"] == "eval"] == [1]
        assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()
    info = json.loads((out / "tune.json").read_text())
    assert {r["run"] for r in info["rows"] if r["state"] == "pruned"} == \
        {t.user_attrs["run"] for t in pruned}
    assert info["epochs_trained"] == info["epochs_unpruned"] - 2 * len(pruned)
    md = (out / "results.md").read_text()
    assert "| pruned | 1e-06 | " in md and "had no trial been pruned" in md
    report = write_report([out], evaluate=False)["md"].read_text()
    assert "Pruned trials (their search stopped them early" in report
    assert "Unfinished runs" not in report


def test_diverged_trials_fail_and_the_search_goes_on(data, tmp_path, capfd):
    """Every trial diverges: each is a failed trial with its diverged.json, the search runs
    them all, and with none complete there is nothing to choose: exit 2, results kept."""
    out = tmp_path / "tune"
    code = main(["tune", "lenet5", "mnist", "--data-dir", str(data), "--space", "lr=1e12,1e13",
                 "--sampler", "grid", "--trials", "9", "--schedule", "constant", "--log-every",
                 "1", "--epochs", "1", "--out", str(out), *QUICK])
    err = capfd.readouterr().err
    assert code == 2
    assert err.count(": diverged (the training loss became NaN or infinite") == 0  # --quiet
    assert err.strip().splitlines()[-1] == (
        f"cnnlab: error: no trial of the search completed (2 diverged); nothing to choose "
        f"from: see {out / 'results.md'}")
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # the grid, once: 2, not 9
    for t in trials:
        assert (out / t.user_attrs["run"] / "diverged.json").is_file()
    assert "| diverged | 1e+12 |" in (out / "results.md").read_text()
    assert not (out / "best.toml").exists()


def test_a_dead_workers_trial_is_continued_from_its_checkpoint(data, tmp_path):
    """SIGKILL a worker once its trial has a checkpoint; another worker fails the silent
    trial, queues it again and continues its run: metrics.jsonl goes on from the checkpoint,
    and the search counts it as one trial."""
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "cnnlab", "tune", "lenet5", "mnist", "--data-dir", str(data),
           "--space", "lr=0.02,0.05", "--trials", "1", "--epochs", "5", "--batch-size", "16",
           "--schedule", "constant", "--out", str(out), *QUICK[:-1]]
    env = {**os.environ, "CNNLAB_HEARTBEAT": "1"}  # dead after 3 s of silence
    run = out / "trial-0000"
    worker = subprocess.Popen([*cmd, "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").is_file():
        assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read()
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=30)
    assert not (run / "summary.json").exists()
    before = [r for r in read_metrics(run) if r["type"] == "eval"]

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "trial-0000 (lr=" in res.stderr and ": continuing from its checkpoint" in res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == list(range(1, 6))
    assert evals[0] == before[0]  # the records up to the checkpoint, kept
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["run"] == "trial-0000" and trials[1].params == trials[0].params
    info = json.loads((out / "tune.json").read_text())
    assert [(r["run"], r["state"]) for r in info["rows"]] == [("trial-0000", "complete")]


def test_hyperband_budgets_the_most_epochs_a_trial_trains():
    """--pruner hyperband: its largest budget is the most epochs any trial trains."""
    import optuna

    from cnnlab.tune import _pruner, plan_tune

    search = plan_tune("lenet5", "mnist", ["epochs=1:3.5", "lr=0.01:0.1"], pruner="hyperband",
                       options={"val_split": 0.1})
    assert search.max_epochs == 4
    pruner = _pruner(search)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._max_resource == 4
