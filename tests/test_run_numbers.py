"""The numbers a run records are the ones a stopwatch and a count of images would give: the
fraction of the training split each record has seen, and the training time of a run
interrupted mid-epoch and resumed."""

import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import cnnlab
from cnnlab import trainer
from cnnlab.checkpoint import load_model
from cnnlab.checks import config_fields
from cnnlab.errors import Interrupted
from cnnlab.files import read_json
from cnnlab.options import OPTIONS, Config
from cnnlab.resume import resume_config
from cnnlab.runs import read_metrics


def _records(run_dir, kind):
    return [r for r in read_metrics(run_dir) if r["type"] == kind]


# 512 training images, batch 16: 32 steps an epoch; 0.3 epochs are 10 steps, 0.3125 of it
@pytest.mark.parametrize("epochs, evals", [(0.3, [0.3125]), (1.5, [1.0, 1.5])])
def test_records_place_each_point_at_the_fraction_of_the_split_seen(
        tiny_mnist, tmp_path, epochs, evals):
    summary = cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=tmp_path / "run",
                           epochs=epochs, batch_size=16, log_every=3, telemetry=0,
                           progress=False)
    assert [r["epochs_done"] for r in _records(tmp_path / "run", "eval")] == evals
    assert [r["epoch"] for r in _records(tmp_path / "run", "eval")] == list(
        range(1, len(evals) + 1))
    train = _records(tmp_path / "run", "train")
    assert [r["epochs_done"] for r in train] == [round(r["step"] / 32, 4) for r in train]
    assert train[-1]["epochs_done"] <= evals[-1]
    assert summary["epochs_done"] == evals[-1]
    # one count of epochs: best_epoch is the fraction too, and best.pt says the same
    assert summary["best_epoch"] == summary["best_epochs_done"] in evals
    assert load_model(tmp_path / "run").epochs_done == summary["best_epoch"]


def test_a_fractional_run_is_counted_in_the_same_epochs_everywhere(tiny_mnist, tmp_path):
    """A 1.5-epoch run is at epoch 1.5 in train's lines, eval's header and the listing -
    never "epoch 2"."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                           "--data-dir", str(tiny_mnist), "--out", str(run), "--epochs", "1.5",
                           "--batch-size", "16", "--log-every", "8", "--telemetry", "0",
                           "--eval-every", "1"], capture_output=True, text=True, check=True)
    lines = done.stderr.splitlines()
    assert [line.split(":")[0] for line in lines if re.match(r"epoch [\d.]+/1.5:", line)] == [
        "epoch 1/1.5", "epoch 1.5/1.5"], done.stderr
    assert any(re.match(r"epoch 0.25/1.5 step 8/48: loss", line) for line in lines), lines
    best = read_json(run / "summary.json")["best_epoch"]
    assert f"(epoch {best:g})" in lines[-1] and best in (1, 1.5)
    header = subprocess.run([sys.executable, "-m", "cnnlab", "eval", str(run), "--data-dir",
                             str(tiny_mnist)], capture_output=True, text=True, check=True)
    assert header.stdout.startswith(f"lenet5 (best.pt, epoch {best:g}) on mnist test")
    listed = subprocess.run([sys.executable, "-m", "cnnlab", "runs", str(run)],
                            capture_output=True, text=True, check=True).stdout
    assert " 1.5/1.5 " in listed and " 2/" not in listed


def test_config_json_holds_the_options_as_asked_and_what_ran(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("CNNLAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto: the CPU, anywhere
    run = tmp_path / "run"
    cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=run, epochs=0.3, batch_size=16,
                 telemetry=0, progress=False)
    saved = read_json(run / "config.json")
    assert (saved["device"], saved["precision"]) == ("auto", "auto")
    assert saved["resolved"] == {"device": "cpu", "precision": "fp32", "world_size": 1,
                                 "channels_last": True}
    assert set(saved) == {*OPTIONS, "resolved"}  # the old precision_used, world_size: gone
    assert Config(**config_fields(saved)).device == "auto"
    (run / "checkpoint.pt").unlink()  # resumed from config.json alone: the device as asked
    assert resume_config(run, {})[0].device == "auto"


MAKE_TRAIN_STEP = trainer.make_train_step


def _slow_steps(monkeypatch, seconds, interrupt_at=None):
    """Every training step takes at least `seconds`; SIGINT arrives at step `interrupt_at`."""
    make = MAKE_TRAIN_STEP  # not one patched before
    calls = []

    def slow_make(*args, **kwargs):
        step = make(*args, **kwargs)

        def slow(batch):
            calls.append(1)
            time.sleep(seconds)
            if len(calls) == interrupt_at:
                signal.raise_signal(signal.SIGINT)
            return step(batch)
        return slow

    monkeypatch.setattr(trainer, "make_train_step", slow_make)


def test_a_run_resumed_mid_epoch_counts_the_time_before_the_interruption(
        tiny_mnist, tmp_path, monkeypatch):
    options = dict(data_dir=tiny_mnist, epochs=1, batch_size=16, log_every=4, telemetry=0,
                   progress=False)
    _slow_steps(monkeypatch, 0.02)
    whole = cnnlab.train("lenet5", "mnist", out=tmp_path / "whole", **options)
    _slow_steps(monkeypatch, 0.02, interrupt_at=26)  # 26 of the epoch's 32 steps
    with pytest.raises(Interrupted):
        cnnlab.train("lenet5", "mnist", out=tmp_path / "cut", **options)
    _slow_steps(monkeypatch, 0.02)
    resumed = cnnlab.train(resume=tmp_path / "cut", progress=False)
    assert resumed["resumed_from_step"] == 26
    # before: the resumed part alone (6 of 32 steps), 5x too short and its images/s 5x high
    assert 0.5 < resumed["train_seconds"] / whole["train_seconds"] < 2
    assert 0.5 < resumed["images_per_second"] / whole["images_per_second"] < 2
    assert resumed["train_seconds"] >= 32 * 0.02


def test_training_accuracy_is_recorded_beside_the_loss(tiny_mnist, tmp_path):
    cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=tmp_path / "run", epochs=2,
                 batch_size=16, log_every=8, telemetry=0, progress=False)
    accuracies = [r["train_acc"] for r in _records(tmp_path / "run", "train")]
    assert len(accuracies) == 8 and all(0 <= a <= 100 for a in accuracies)
    assert accuracies[-1] > accuracies[0]  # it learns
