"""Interruption, resume, crashes, malicious files, numerical and data faults: each driven
through the real command in a subprocess where signals or exit codes are involved."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_folder, write_mnist

import cnnlab
from cnnlab import checkpoint, files
from cnnlab.errors import CnnlabError, TrainingDiverged
from cnnlab.runs import read_metrics

# 4096 images in batches of 16: 256 steps an epoch, slow enough to interrupt mid-epoch
ARGS = ["--epochs", "2", "--batch-size", "16", "--log-every", "25", "--schedule", "constant",
        "--lr", "0.02", "--telemetry", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("rel") / "data", 4096, 256)


def _start(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                             "--data-dir", str(data), "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(out, proc, timeout=120):
    """Block until the run has logged its first train record."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(r["type"] == "train" for r in read_metrics(out)):
            return
        time.sleep(0.02)


def _comparable(run_dir):
    return [{k: v for k, v in r.items()
             if k not in ("images_per_second", "train_seconds", "eval_seconds")}
            for r in read_metrics(run_dir) if r["type"] != "telemetry"]


def _same_weights(a, b):
    """The evaluated weights and, with --ema, the trained ones too."""
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    keys = [k for k in ("model", "train_model") if k in ca]
    return keys == [k for k in ("model", "train_model") if k in cb] and all(
        torch.equal(ca[key][k], cb[key][k]) for key in keys for k in ca[key])


def test_second_ctrl_c_exits_at_once_without_damage(data, tmp_path):
    out = tmp_path / "run"
    proc = _start(data, out, "--checkpoint-every", "1")
    _wait_for_training(out, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    if (out / "checkpoint.pt").exists():
        checkpoint.load(out / "checkpoint.pt")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_starts_stops_the_command_once_it_is_imported(tiny_mnist, tmp_path,
                                                                          sig):
    """torch's C++ start-up code imports numpy: a stop raised inside that import would be
    swallowed (the run trains on), leave numpy half imported (a traceback: "cannot load
    module more than once per process") or abort the process; it comes after the import."""
    code = f"""
import os, runpy, sys
sent = []
def send(event, args):  # the moment torch's C++ start-up code imports numpy
    if event == "import" and args[0] == "numpy" and "torch" in sys.modules and not sent:
        sent.append(True)
        print("sent", file=sys.stderr, flush=True)
        os.kill(os.getpid(), {int(sig)})
sys.addaudithook(send)
sys.argv = ["cnnlab", "train", "lenet5", "mnist", "--data-dir", {str(tiny_mnist)!r},
            "--out", {str(tmp_path / "run")!r}, "--epochs", "1", "--quiet", "--telemetry", "0"]
runpy.run_module("cnnlab", run_name="__main__")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.stderr.startswith("sent\n"), res.stderr
    assert res.returncode == 128 + sig and "Traceback" not in res.stderr, res.stderr


def test_signals_once_the_command_is_done_change_nothing(tiny_mnist, tmp_path):
    """Done, the command ends at once (cli.main): not in Python's shutdown, which with torch
    loaded lasts about another second, where SIGTERM printed tracebacks ("Exception ignored
    in atexit callback") and ended the process by the signal."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                             "--data-dir", str(tiny_mnist), "--out", str(out), "--epochs", "1",
                             "--quiet", "--telemetry", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == str(out)  # its last line
    time.sleep(0.2)
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    err = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in err and "Exception" not in err, err


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, tiny_mnist):
    out = tmp_path / "run"
    cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=1,
                 batch_size=64, progress=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, out / "checkpoint.pt", pickle_module=pickle)
    res = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--resume", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and not marker.exists()
    assert "(it asks for posix.system), so it is refused unread" in res.stderr
    assert "Traceback" not in res.stderr and "weights_only" not in res.stderr
    with pytest.raises(CnnlabError, match="holds more than tensors and plain data"):
        checkpoint.load(out / "checkpoint.pt")
    assert not marker.exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def poisoned(self, logits, target):
        calls["n"] += 1
        loss = real(self, logits, target)
        return loss * float("nan") if calls["n"] > 20 else loss  # 16 steps an epoch

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="NaN or infinite by step 2[1-9].*--lr"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=3,
                     batch_size=32, log_every=4, progress=False)
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert ckpt["step"] == 16  # the end of epoch 1, the last good state
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # the run says where it diverged, and so does its report
    from cnnlab.report import write_report

    assert files.read_json(out / "diverged.json")["step"] == 24  # the log step that saw it
    md = write_report([out], evaluate=False)["md"].read_text()
    assert "| status | diverged at step 24 (epoch 2) |" in md and "did not finish" not in md


@pytest.mark.parametrize("extra,message", [([], "NaN or infinite by step"),
                                           (["--detect-anomaly"], "anomaly detected at step")])
def test_divergence_exit_code_from_the_command(tiny_mnist, tmp_path, extra, message):
    res = subprocess.run([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                          "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "r"),
                          "--lr", "1e12", "--schedule", "constant", "--log-every", "1",
                          "--epochs", "1", *extra], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert message in res.stderr and "learning rate" in res.stderr
    # (anomaly mode itself prints the forward call's stack: that is what it is for)
    assert "Traceback (most recent call last)" not in res.stderr


def test_resume_refuses_unsafe_changes_and_adds_epochs(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=1, batch_size=64,
                 schedule="constant", progress=False)
    with pytest.raises(CnnlabError, match="--lr 0.5 differs from the run's"):
        cnnlab.train(resume=out, lr=0.5, progress=False)
    with pytest.raises(CnnlabError, match="already finished"):
        cnnlab.train(resume=out, progress=False)
    summary = cnnlab.train(resume=out, epochs=2, progress=False)
    assert summary["epochs"] == 2 and checkpoint.load(out / "checkpoint.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(out) if r["type"] == "eval"] == [1, 2]
    with pytest.raises(CnnlabError, match="nothing to resume"):
        cnnlab.train(resume=tmp_path, progress=False)


def test_full_disk_keeps_the_previous_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def failing_save(obj, f, *a, **kw):
        saves["n"] += 1
        if saves["n"] > 1:  # epoch 1 (best.pt and checkpoint.pt, serialised once); then full
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CnnlabError, match="No space left on device; free some space, then "
                                          "continue with: cnnlab train --resume"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=2,
                     batch_size=64, progress=False)
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_deterministic_runs_match(tiny_mnist, tmp_path):
    for name in ("a", "b"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / name,
                     epochs=1, batch_size=32, deterministic=True, progress=False)
    assert _comparable(tmp_path / "a") == _comparable(tmp_path / "b")
    assert _same_weights(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")


def test_bad_image_files_stop_or_are_skipped(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    (root / "test" / "dog" / "1.png").write_bytes(b"")
    args = [sys.executable, "-m", "cnnlab", "train", "lenet5", f"folder:{root}", "--epochs",
            "1", "--batch-size", "4"]
    res = subprocess.run(args + ["--out", str(tmp_path / "a")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "0.png" in res.stderr and "--skip-bad-files" in res.stderr
    res = subprocess.run(args + ["--out", str(tmp_path / "b"), "--skip-bad-files"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipping: cannot read image" in res.stderr and "1.png" in res.stderr
    summary = __import__("json").loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["epochs"] == 1
