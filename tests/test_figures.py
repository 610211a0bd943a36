"""What figures, reports and sweep results say about runs: every point at the epochs trained
(hand-written 0.3- and 1.5-epoch runs, and runs written before records had epochs_done),
label smoothing named on the loss legends, comparison.png's points, means and confidence
intervals, the report's conventions, and progress while a checkpoint is evaluated."""

import json
import re
import statistics

import pytest

from cnnlab import plots, progress
from cnnlab.cli import main
from cnnlab.config import resolve
from cnnlab.files import write_json
from cnnlab.report import write_report
from cnnlab.sweep import plan_sweep, write_results

STEPS = 100  # optimiser steps per epoch of the hand-written runs


def write_run(path, *, epochs, evals, train_steps=(), smoothing=0.0, pool=None, val=False,
              finished=True, old=False, env=None, records=()):
    """A run directory by hand: config.json, metrics.jsonl and summary.json as the trainer
    writes them. evals: (epochs done, test accuracy) per evaluation; val: best.pt chosen on a
    validation split (1 point below each test accuracy); old: without the epochs_done keys."""
    path.mkdir(parents=True)
    write_json(path / "config.json", resolve("lenet5", "mnist", overrides={
        "epochs": epochs, "label_smoothing": smoothing, "pool": pool,
        "val_split": 0.1 if val else None}).to_dict())
    if env is not None:
        write_json(path / "env.json", env)
    lines = [{"type": "train", "step": s, "epoch": (s - 1) // STEPS + 1,
              "epochs_done": s / STEPS, "loss": 0.5, "lr": 0.1, "images_per_second": 900.0}
             for s in train_steps]
    lines += [{"type": "eval", "epoch": i + 1, "steps": round(done * STEPS), "epochs_done": done,
               "test_loss": 0.1, "test_acc": acc, "train_seconds": 1.0 + i,
               **({"val_loss": 0.2, "val_acc": acc - 1} if val else {})}
              for i, (done, acc) in enumerate(evals)]
    if old:
        lines = [{k: v for k, v in r.items() if k != "epochs_done"} for r in lines]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                for r in [*lines, *records]))
    if finished:
        best = max(range(len(evals)), key=lambda i: evals[i][1])
        summary = {"epochs": epochs, "epochs_done": evals[-1][0],
                   "best_epochs_done": evals[best][0], "best_epoch": best + 1,
                   "final_test_acc": evals[-1][1], "best_test_acc": evals[best][1],
                   "final_test_loss": 0.1, "train_seconds": 2.0, "images_per_second": 900.0,
                   "steps": round(evals[-1][0] * STEPS), "selected_on": "test"}
        if val:
            summary.update(selected_on="validation", best_val_acc=evals[best][1] - 1,
                           test_acc_at_best=evals[best][1])
        if old:
            del summary["epochs_done"], summary["best_epochs_done"]
        write_json(path / "summary.json", summary)
    return path


@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn, by file name (and still written)."""
    figures = {}
    save = plots.save_figure

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def lines(fig) -> dict:
    """The curves of a one-axes figure by their legend names."""
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def xs(line) -> list[float]:
    return [round(float(x), 4) for x in line.get_xdata()]


def test_run_plots_place_every_point_at_the_epochs_trained(tmp_path, drawn):
    short = write_run(tmp_path / "short", epochs=0.3, evals=[(0.3, 97.0)], train_steps=(10, 20))
    plots.plot_run(short)
    loss = lines(drawn["loss.png"])
    assert xs(loss["training loss (mean over log window)"]) == [0.1, 0.2]
    assert xs(loss["test loss"]) == [0.3]  # was 1.0, with the training loss at 0.33-0.67
    assert xs(lines(drawn["accuracy.png"])["test accuracy"]) == [0.3]

    long = write_run(tmp_path / "long", epochs=1.5, evals=[(1.0, 98.0), (1.5, 98.5)],
                     train_steps=(50, 100, 150), val=True)
    plots.plot_run(long)
    loss = lines(drawn["loss.png"])
    assert xs(loss["training loss (mean over log window)"]) == [0.5, 1.0, 1.5]
    assert xs(loss["test loss"]) == xs(loss["validation loss"]) == [1.0, 1.5]  # was 1.0, 2.0
    accuracy = lines(drawn["accuracy.png"])
    assert xs(accuracy["test accuracy"]) == xs(accuracy["validation accuracy"]) == [1.0, 1.5]
    best = drawn["accuracy.png"].axes[0].texts[0]
    assert best.get_text().startswith("best.pt (validation 97.50%)") and best.xy[0] == 1.5
    assert drawn["loss.png"].axes[0].get_xlabel() == "epochs trained"

    # Runs written before records had epochs_done: as before, the train records at their
    # step over the steps per epoch the eval records give, the evaluations at their epoch.
    old = write_run(tmp_path / "old", epochs=1.5, evals=[(1.0, 98.0), (1.5, 98.5)],
                    train_steps=(50, 100, 150), old=True)
    plots.plot_run(old)
    loss = lines(drawn["loss.png"])
    assert xs(loss["training loss (mean over log window)"]) == [0.5, 1.0, 1.5]
    assert xs(loss["test loss"]) == [1, 2]


def test_overlays_place_every_point_at_the_epochs_trained(tmp_path, drawn):
    runs = [write_run(tmp_path / "a", epochs=0.3, evals=[(0.3, 97.0)], train_steps=(10, 20)),
            *(write_run(tmp_path / f"b{seed}", epochs=1.5, evals=[(1.0, 98.0), (1.5, 98.0 + seed)],
                        train_steps=(50, 100, 150)) for seed in (0, 1))]
    plots.plot_overlay(runs, ["a", "b", "b"], tmp_path)
    accuracy = lines(drawn["accuracy.png"])
    assert xs(accuracy["a"]) == [0.3]
    assert xs(accuracy["b (mean of 2)"]) == [1.0, 1.5]
    assert list(accuracy["b (mean of 2)"].get_ydata()) == [98.0, 98.5]
    loss = lines(drawn["loss.png"])
    assert xs(loss["a train"]) == [0.1, 0.2] and xs(loss["a test"]) == [0.3]
    assert xs(loss["b train"]) == [0.5, 1.0, 1.5] and xs(loss["b test"]) == [1.0, 1.5]


def test_loss_legends_say_when_label_smoothing_makes_the_losses_incomparable(tmp_path, drawn):
    smoothed = write_run(tmp_path / "smoothed", epochs=1.5, evals=[(1.0, 98.0), (1.5, 98.5)],
                         train_steps=(50, 100, 150), smoothing=0.1, val=True)
    plots.plot_run(smoothed)
    assert legend(drawn["loss.png"]) == [
        "training loss (label smoothing 0.1, mean over log window)",
        "test loss (plain cross-entropy)", "validation loss (plain cross-entropy)"]
    plain = write_run(tmp_path / "plain", epochs=1, evals=[(1, 98.0)], train_steps=(50, 100))
    plots.plot_overlay([smoothed, plain], ["smoothed", "plain"], tmp_path)
    assert legend(drawn["loss.png"]) == [
        "smoothed train (label smoothing 0.1)", "smoothed test (plain cross-entropy)",
        "plain train", "plain test"]


def test_reports_name_the_epochs_trained(tmp_path):
    def outcome(run):
        md = write_report([run], evaluate=False)["md"].read_text()
        return (re.search(r"^\| status \| (.*) \|$", md, re.M).group(1),
                re.search(r"^\| best on test \(optimistic: no validation split\) \| (.*) \|$",
                          md, re.M).group(1))

    assert outcome(write_run(tmp_path / "short", epochs=0.3, evals=[(0.3, 97.0)])) == (
        "finished (0.3 of 0.3 epochs)", "97.00% (epoch 0.3)")  # was: 1 of 0.3, epoch 1
    assert outcome(write_run(tmp_path / "long", epochs=1.5,
                             evals=[(1.0, 98.0), (1.5, 98.5)])) == (
        "finished (1.5 of 1.5 epochs)", "98.50% (epoch 1.5)")  # was: 2 of 1.5, epoch 2
    # written before summaries had epochs_done: a finished run trained its epochs
    assert outcome(write_run(tmp_path / "old", epochs=1.5, evals=[(1.0, 98.0), (1.5, 98.5)],
                             old=True)) == ("finished (1.5 of 1.5 epochs)", "98.50% (epoch 2)")
    assert outcome(write_run(tmp_path / "unfinished", epochs=1.5, evals=[(1.0, 98.0)],
                             finished=False)) == ("did not finish: 1 of 1.5 epochs evaluated",
                                                  "98.00% (epoch 1)")


def test_sweep_results_count_epochs_to_best_in_epochs_trained(tmp_path):
    plan = plan_sweep("lenet5", "mnist", grid={"epochs": [0.3, 1.5]}, seeds=2)
    out = tmp_path / "sweep"
    for run in plan.runs:
        evals = ([(0.3, 97.0 + run.config.seed)] if run.config.epochs == 0.3
                 else [(1.0, 98.0 + run.config.seed), (1.5, 98.5)])  # best at 1.0, then 1.5
        write_run(out / run.name, epochs=run.config.epochs, evals=evals)
        write_json(out / run.name / "config.json", run.config.to_dict())  # its own seed
    write_json(out / "sweep.json", plan.to_json())
    write_results(out)
    md = (out / "results.md").read_text()
    assert "| 0.3 | 2 | 97.50 ± 0.71 | 97.50 ± 0.71 | 0.30 ± 0.00 |" in md  # was 1.0 ± 0.0
    assert "| 1.5 | 2 | 98.50 ± 0.00 | 98.75 ± 0.35 | 1.25 ± 0.35 |" in md  # was 1.5 ± 0.7
    assert "| best on test (%) | epochs to best | train time (s) | images/s |" in md
    assert "| [epochs=0.3-seed=1](epochs=0.3-seed=1/) | 1 | 98.00 | 98.00 | 0.3 |" in md
    rows = (out / "results.csv").read_text().splitlines()
    assert "best_epochs_done_mean" in rows[0].split(",")
    assert "![Final and best test accuracy of each point's runs" in md
    assert "](comparison.png)" in md and (out / "comparison.png").is_file()


def test_comparison_shows_each_configurations_runs_mean_and_interval(tmp_path, drawn):
    from scipy import stats

    def summary(final, best, at_best=None):
        return {"final_test_acc": final, "best_test_acc": best,
                **({"test_acc_at_best": at_best} if at_best is not None else {})}

    summaries = [summary(98.1, 98.3), summary(98.4, 98.5), summary(98.0, 98.2),  # max
                 summary(97.0, 97.8, 97.2), summary(97.6, 97.9, 97.5),  # val: best.pt chosen
                 summary(96.0, 96.5)]  # one seed
    labels = ["max", "max", "max", "val", "val", "one"]
    columns = plots.comparison_data(summaries, labels)
    assert [c["label"] for c in columns] == ["max", "val", "one"]
    for column in columns:
        runs = [s for s, label in zip(summaries, labels) if label == column["label"]]
        expected = {"final_test_acc": [s["final_test_acc"] for s in runs],
                    **({"test_acc_at_best": [s["test_acc_at_best"] for s in runs]}
                       if "test_acc_at_best" in runs[0]
                       else {"best_test_acc": [s["best_test_acc"] for s in runs]})}
        assert {k: v["values"] for k, v in column["series"].items()} == expected
        for key, values in expected.items():
            series = column["series"][key]
            assert series["mean"] == pytest.approx(statistics.fmean(values))
            if len(values) == 1:
                assert series["interval"] is None
            else:
                assert series["interval"] == pytest.approx(stats.t.interval(
                    0.95, len(values) - 1, loc=statistics.fmean(values),
                    scale=stats.sem(values)))

    plots.plot_comparison(summaries, labels, tmp_path / "comparison.png")
    ax = drawn["comparison.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["max", "val", "one"]
    assert legend(drawn["comparison.png"]) == [
        "final test accuracy", "best on test\n(optimistic: chosen on test)",
        "test accuracy of best.pt\n(chosen on validation)",
        "mean, 95% confidence interval\n(Student t over the runs)"]
    points = sorted((round(float(line.get_xdata()[0])), sorted(map(float, line.get_ydata())))
                    for line in ax.get_lines() if line.get_marker() in ("o", "s", "^"))
    drawn_values = sorted((i, sorted(values)) for i, c in enumerate(columns)
                          for values in (s["values"] for s in c["series"].values()))
    assert points == drawn_values
    bars = {}  # (column, mean) -> the interval drawn
    for container in ax.containers:
        (mean_line, _, bar_lines) = container.lines
        x, mean = mean_line.get_xdata()[0], mean_line.get_ydata()[0]
        segments = bar_lines[0].get_segments() if bar_lines else []
        bars[(round(x), round(mean, 6))] = (tuple(segments[0][:, 1]) if len(segments)
                                            else None)
    for i, column in enumerate(columns):
        for series in column["series"].values():
            shown = bars[(i, round(series["mean"], 6))]
            assert shown == (None if series["interval"] is None
                             else pytest.approx(series["interval"]))


def _table(md: str, first: str) -> list[list[str]]:
    """The Markdown table whose header starts `| first |`, as rows of cells."""
    block = md[md.index(f"| {first} |"):].split("\n\n")[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in block.splitlines()
            if not line.startswith("| ---")]


def test_the_report_gives_the_cpu_as_a_share_of_all_cores_in_table_and_chart(tmp_path):
    telemetry = [{"type": "telemetry", "elapsed": float(i), "cpu_percent": 150.0 + i,
                  "rss_mb": 700.0} for i in range(6)]
    run = write_run(tmp_path / "run", epochs=1, evals=[(1, 98.0)],
                    env={"cpu_cores_logical": 4}, records=telemetry)
    md = write_report([run], evaluate=False)["md"].read_text()
    (_, unit, ((cpu, points),)), *_ = plots.utilization_panels(run)  # the chart's line
    assert cpu == "CPU (process, % of 4 cores)" and unit == "%"
    assert [v for _, v in points] == [(150 + i) / 4 for i in range(6)]
    assert f"| {cpu} | mean 38%, peak 39% |" in md  # was "100% = one core, mean 152%"


def test_the_comparison_names_the_model_default_and_which_best_it_shows(tmp_path):
    runs = [write_run(tmp_path / "default", epochs=1, evals=[(1, 98.5)]),
            write_run(tmp_path / "avg", epochs=1, evals=[(1, 98.0)], pool="avg")]
    md = write_report(runs, tmp_path / "report", evaluate=False)["md"].read_text()
    table = _table(md, "configuration")
    assert table[0][:2] == ["configuration", "pool"]
    assert [row[:2] for row in table[1:]] == [["default", "max (default)"], ["avg", "avg"]]
    assert "max (default) pooling scored higher" in md  # the verdict names it so too
    assert "best.pt was chosen" not in md  # no validation split: nothing to tell apart

    runs = [write_run(tmp_path / "validated", epochs=1.5, evals=[(1.0, 98.2), (1.5, 98.0)],
                      val=True),
            write_run(tmp_path / "on-test", epochs=1.5, evals=[(1.0, 98.4), (1.5, 98.1)])]
    md = write_report(runs, tmp_path / "report-2", evaluate=False)["md"].read_text()
    header = _table(md, "configuration")[0]
    assert "test acc of best.pt, chosen on validation (%)" in header
    assert "best on test, optimistic (%)" in header and "epochs to best.pt" in header
    assert ("best.pt was chosen on the validation split for validated, on the test split for "
            "on-test (no validation split).") in md
    assert md.index("best.pt was chosen") > md.index("| configuration |")  # under the table
    assert "comparison.png" in md


def test_evaluating_a_checkpoint_shows_progress(tiny_mnist, tmp_path, drawn, monkeypatch,
                                                capsys):
    """A real 1.5-epoch run: its loss curve at the epochs trained, and `cnnlab eval` and
    `cnnlab report` say per batch how far the evaluation is (stderr is no terminal here:
    lines, once QUIET_SECONDS have passed)."""
    import cnnlab

    run = tmp_path / "run"
    cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=run, epochs=1.5, batch_size=64,
                 log_every=2, telemetry=0, progress=False)  # 8 steps an epoch
    plots.plot_run(run, tmp_path)
    loss = lines(drawn["loss.png"])
    assert xs(loss["test loss (plain cross-entropy)"]) == [1.0, 1.5]
    assert xs(loss["training loss (label smoothing 0.1, mean over log window)"])[-1] == 1.5

    monkeypatch.setattr(progress, "QUIET_SECONDS", 0)
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--batch-size", "64"]) == 0
    err = capsys.readouterr().err
    what = re.escape(f"cnnlab: evaluating {run / 'best.pt'} on the mnist test split")
    seconds = r"\d+ s$"  # however busy the machine
    assert re.search(rf"^{what}: 64 of 128 images \(50%\), {seconds}", err, re.M), err
    assert re.search(rf"^{what}: 128 of 128 images \(100%\), {seconds}", err, re.M), err
    assert re.search(rf"^{what}: done, 128 images in {seconds}", err, re.M), err
    assert main(["report", str(run), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^cnnlab: report: evaluating run \(best\.pt\) on the test split: 128 of "
                     rf"128 images \(100%\), {seconds}", err, re.M), err
    assert "| status | finished (1.5 of 1.5 epochs) |" in (run / "report.md").read_text()


def test_training_shows_its_evaluation_and_the_eta_counts_it(tiny_mnist, tmp_path, monkeypatch,
                                                            capsys):
    """The evaluation inside `train` is a phase with progress lines (stderr is no terminal
    here), and the time left counts the evaluations still to come."""
    import cnnlab

    monkeypatch.setattr(progress, "QUIET_SECONDS", 0)
    cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=tmp_path / "run", epochs=1,
                 batch_size=64, eval_batch_size=64, log_every=4, telemetry=0, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"^cnnlab: epoch 1: evaluating: 64 of 128 images \(50%\), \d+ s$", err,
                     re.M), err
    assert re.search(r"^cnnlab: epoch 1: evaluating: done, 128 images in \d+ s$", err, re.M)

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    bar = progress.Progress(4, epochs=2, enabled=False, eval_steps=3.0)  # started at 0 s
    now[0], bar.step = 10.0, 1  # a step in 10 s: 3 steps and 2 evaluations of 3 steps to go
    assert bar.eta() == "90 s"
    now[0] = 24.0  # an evaluation of 4 s has ended
    bar.eval({"epoch": 1, "eval_seconds": 4.0, "test_loss": 1.0, "test_acc": 50.0})
    now[0], bar.step = 30.0, 2  # 26 s of training for 2 steps: 2 steps and 1 evaluation left
    assert bar.eta() == "30 s"


def test_accuracy_fits_its_range_to_the_evaluations(tmp_path, drawn):
    """98.85% to 99.20% is no flat line on the top edge: the frame spans the evaluations
    (the best label inside it), and a small panel keeps the whole range of the curves."""
    write_run(tmp_path / "run", epochs=2, evals=[(1.0, 98.85), (2.0, 99.20)],
              train_steps=range(1, 2 * STEPS + 1))
    plots.plot_run(tmp_path / "run")
    fig = drawn["accuracy.png"]
    low, high = fig.axes[0].get_ylim()
    assert 97.5 < low < 98.85 and 99.20 < high <= 100
    [label] = [t for t in fig.axes[0].texts if t.get_text().startswith("best on test")]
    assert low < label.xy[1] < high
    if len(fig.axes) > 1:  # the inset, where training accuracy starts below the frame
        assert fig.axes[1].get_ylim()[0] < low
