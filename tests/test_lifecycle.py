"""A run survives a fault at any moment of its life - start-up, steps, checkpoint writes,
evaluation, plots, summary - and a full disk at any write: it is complete, or `--resume`
completes it bitwise identical to an uninterrupted run (CPU). Signals are answered within a
step or an evaluation batch with a message; bad uses of --resume and --out are refused."""

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_folder

import cnnlab
from cnnlab import checkpoint, files, runs
from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.runs import LOCK_FILE, RunDir, read_metrics

ARGS = ["--epochs", "3", "--batch-size", "8", "--log-every", "5", "--checkpoint-every", "5",
        "--ema", "0.9", "--telemetry", "0.3"]
TIMING = ("images_per_second", "train_seconds", "eval_seconds", "wall_seconds", "run_dir",
          "resumed_from_step", "compile_seconds")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("life") / "pets", n_train=40, n_test=10)


def _train_cmd(folder, out, *extra):
    return [sys.executable, "-m", "cnnlab", "train", "lenet5", f"folder:{folder}", "--out",
            str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted run, and how long its whole process took."""
    out = tmp_path_factory.mktemp("ref") / "run"
    start = time.perf_counter()
    res = subprocess.run(_train_cmd(folder, out), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out, time.perf_counter() - start


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(run_dir) if r["type"] != "telemetry"]


def _same_run(a: Path, b: Path) -> None:
    """b is the run a is: weights (trained and averaged), best model, metrics, summary."""
    for name in ("checkpoint.pt", "best.pt"):
        ca, cb = checkpoint.load(a / name), checkpoint.load(b / name)
        for key in ("model", "train_model"):
            assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), (name, key)
    assert _records(a) == _records(b)
    sa, sb = (files.read_json(p / "summary.json") for p in (a, b))
    assert {k: v for k, v in sa.items() if k not in TIMING} == \
        {k: v for k, v in sb.items() if k not in TIMING}
    shown = {"utilization.png"}  # only where the short run took a utilisation sample
    assert {p.name for p in a.iterdir()} - shown == {p.name for p in b.iterdir()} - shown


# The moments, as fractions of the uninterrupted run's whole process.
MOMENTS = [(signal.SIGKILL, f) for f in (0.2, 0.7, 0.97)] + \
          [(signal.SIGTERM, f) for f in (0.35, 0.95)] + [(signal.SIGINT, 0.6)]


def test_a_fault_at_any_moment_leaves_a_run_that_resume_completes(folder, reference,
                                                                    tmp_path):
    ref, seconds = reference
    outcomes = []
    for i, (sig, fraction) in enumerate(MOMENTS):
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen(_train_cmd(folder, out), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(seconds * fraction)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig != signal.SIGKILL and proc.returncode != 0:
            assert proc.returncode == 128 + sig, err
            assert f"cnnlab: {sig.name}" in err or "stopped at once" in err, err
            assert "Traceback" not in err
        if (out / "summary.json").is_file():
            outcomes.append("complete")
        elif (out / "config.json").is_file():
            res = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--resume",
                                  str(out)], capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, (sig, fraction, res.stderr)
            outcomes.append("resumed")
        else:  # stopped in start-up, before the run claimed its directory
            leftovers = {p.name for p in out.iterdir()} if out.exists() else set()
            assert {n for n in leftovers if not n.endswith(".tmp")} <= {LOCK_FILE}, leftovers
            res = subprocess.run(_train_cmd(folder, out), capture_output=True, text=True,
                                 timeout=300)
            assert res.returncode == 0, res.stderr
            outcomes.append("started again")
        assert not list(out.glob(".*.tmp"))
        _same_run(ref, out)
    assert "resumed" in outcomes, outcomes


def test_resume_finishes_a_trained_run_whose_outputs_are_missing(folder, reference,
                                                                 tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    subprocess.run(_train_cmd(folder, out), check=True, capture_output=True, timeout=300)
    for name in ("summary.json", "loss.png", "accuracy.png"):
        (out / name).unlink()
    (out / ".checkpoint.pt.dead.tmp").write_bytes(b"left by a killed process")
    summary = cnnlab.train(resume=out, progress=False)
    assert summary["resumed_from_step"] == summary["steps"] == 45
    _same_run(ref, out)
    with pytest.raises(CnnlabError, match="already finished its 3 epochs"):
        cnnlab.train(resume=out, progress=False)


def test_a_run_stopped_before_its_first_checkpoint_starts_again(folder, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    subprocess.run(_train_cmd(folder, out), check=True, capture_output=True, timeout=300)
    for p in out.iterdir():
        if p.name not in ("config.json", "metrics.jsonl", LOCK_FILE):
            p.unlink()
    # as an earlier version wrote it, before --cuda-graph existed: the default is assumed
    saved = files.read_json(out / "config.json")
    del saved["cuda_graph"]
    files.write_json(out / "config.json", saved)
    cnnlab.train(resume=out, progress=False)
    _same_run(ref, out)


@pytest.mark.parametrize("when", ["evaluation", "plots"])
def test_sigterm_during_evaluation_or_plots_stops_at_once_and_resume_completes(
        folder, reference, tmp_path, monkeypatch, when):
    """In-process: the signal arrives while the last epoch is evaluated (then the epoch's
    steps are checkpointed unevaluated) or while the plots are drawn."""
    import cnnlab.engine
    import cnnlab.trainer

    ref, _ = reference
    out = tmp_path / "run"
    if when == "evaluation":
        real, calls = cnnlab.engine.logits, []

        def logits(*args, **kw):
            calls.append(1)
            if len(calls) == 3:  # the last epoch's evaluation (one batch an epoch)
                signal.raise_signal(signal.SIGTERM)
            return real(*args, **kw)
        monkeypatch.setattr(cnnlab.engine, "logits", logits)
    else:
        real = cnnlab.trainer.plot_run

        def plot_run(path):
            signal.raise_signal(signal.SIGTERM)
            return real(path)
        monkeypatch.setattr(cnnlab.trainer, "plot_run", plot_run)
    code = main(["train", "lenet5", f"folder:{folder}", "--out", str(out), "--quiet", *ARGS])
    assert code == 143 and not (out / "summary.json").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    _same_run(ref, out)


@pytest.mark.parametrize("nth", [1, 4, 9, 14, -1])
def test_a_full_disk_at_any_write_is_one_line_and_resumable(folder, reference, tmp_path,
                                                            monkeypatch, capsys, nth):
    """The nth file write fails as a full disk would (-1: the last one, summary.json):
    exit 2, one line naming the file, nothing earlier damaged; once there is space again,
    --resume completes the run."""
    ref, _ = reference
    out = tmp_path / "run"
    real, writes = files.write_synced, []

    def full_disk(path, content):
        writes.append(Path(path).name)
        if len(writes) == nth or (nth == -1 and ".summary.json" in Path(path).name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, content)
    monkeypatch.setattr(files, "write_synced", full_disk)
    code = main(["train", "lenet5", f"folder:{folder}", "--out", str(out), "--quiet", *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"cnnlab: error: cannot write {out}/")
    assert "No space left on device; free some space, then " in err[0]
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    if nth == 1:  # config.json, the run's claim, was not written: the run never started
        assert err[0].endswith("run the same command again")
        assert main(["train", "lenet5", f"folder:{folder}", "--out", str(out), "--quiet",
                     *ARGS]) == 0
    else:
        assert err[0].endswith(f"continue with: cnnlab train --resume {out}")
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
    _same_run(ref, out)


def test_a_full_disk_never_tears_a_metrics_line(tmp_path):
    run = RunDir(tmp_path / "run", config={"model": "x"})
    run.log({"type": "train", "step": 1})

    class FullAfter:
        """Takes 10 bytes of a write, then the disk is full."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            if len(data) > 10:
                return self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = run._metrics
    run._metrics = FullAfter(real)
    with pytest.raises(OSError) as caught:
        run.log({"type": "train", "step": 2, "loss": 0.5})
    assert caught.value.filename == str(tmp_path / "run" / "metrics.jsonl")
    run._metrics = real
    run.log({"type": "train", "step": 3})
    run.close()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 3]


def test_one_out_directory_holds_one_run(folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = runs._lock(out / LOCK_FILE)  # another process is starting a run there
    cmd = ["train", "lenet5", f"folder:{folder}", "--out", str(out), "--epochs", "1",
           "--quiet"]
    assert main(cmd) == 2
    assert "another cnnlab process is writing to" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    holder.close()
    assert main(cmd) == 0
    assert main(cmd) == 2
    assert "already holds a run" in capsys.readouterr().err
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "summary.json").write_text("{}")
    assert main([*cmd[:3], "--out", str(stray), "--epochs", "1"]) == 2
    assert "is not empty (summary.json) and holds no run" in capsys.readouterr().err
    assert (stray / "summary.json").read_text() == "{}"


def test_resume_refuses_what_it_cannot_honour(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "lenet5", f"folder:{folder}", "--out", str(out), "--quiet",
                 "--epochs", "1", "--schedule", "constant", "--telemetry", "0"]) == 0
    capsys.readouterr()
    options = tmp_path / "o.toml"
    options.write_text("lr = 0.5\n")
    for args, message in [
            (["resnet18", f"folder:{folder}"], "MODEL resnet18 differs from the run's lenet5"),
            (["lenet5", "mnist"], "DATASET mnist differs"),
            (["--config", str(options)], "--lr 0.5 differs from the run's"),
            (["--out", str(tmp_path / "elsewhere")], "a resumed run stays in its directory"),
            (["--lr", "nan"], "--lr nan differs")]:
        code = main(["train", *args, "--resume", str(out), "--epochs", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    # the run's own values are no change; an allowed change is recorded in config.json
    assert main(["train", "lenet5", f"folder:{folder}", "--resume", str(out), "--out", str(out),
                 "--epochs", "2", "--quiet"]) == 0
    assert files.read_json(out / "config.json")["epochs"] == 2


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--config", "/"], "cannot read config file /: Is a directory"),
])
def test_impossible_values_and_unreadable_option_files(folder, tmp_path, capsys, args,
                                                       message):
    code = main(["train", "lenet5", f"folder:{folder}", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_dataset_that_changed(tmp_path, capsys):
    pets = write_folder(tmp_path / "pets", n_train=8, n_test=2)
    out = tmp_path / "run"
    assert main(["train", "lenet5", f"folder:{pets}", "--out", str(out), "--quiet",
                 "--epochs", "2", "--schedule", "constant", "--telemetry", "0"]) == 0
    (pets / "train" / "dog" / "3.png").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one this run was trained on" in err[-1], err


def test_an_out_a_live_run_writes_is_refused_as_such(folder, tmp_path, capsys):
    """A finished-looking --out that a live process still writes: not "continue it with
    --resume" (which would be refused too), but that a live process holds it."""
    out = tmp_path / "run"
    cmd = ["train", "lenet5", f"folder:{folder}", "--out", str(out), "--epochs", "1",
           "--quiet", "--telemetry", "0"]
    assert main(cmd) == 0
    holder = runs._lock(out / LOCK_FILE)  # as a process continuing it would
    try:
        capsys.readouterr()
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "another cnnlab process is writing to" in err and "--resume" not in err
    finally:
        holder.close()
