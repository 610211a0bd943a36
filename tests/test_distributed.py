"""torchrun with 2 CPU processes (gloo): one run directory, equal accuracy on every rank,
the same weights as one process, and a failing rank bringing the job down."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import write_mnist

import cnnlab
from cnnlab import checkpoint
from cnnlab.runs import read_metrics

# --device cpu: with "auto" a machine with one GPU gives rank 1 cuda:1, which it lacks (and
# the single-process comparison is a CPU one)
ARGS = ["--epochs", "2", "--batch-size", "32", "--log-every", "8", "--augment", "none",
        "--schedule", "constant", "--lr", "0.05", "--seed", "5", "--telemetry", "0",
        "--device", "cpu"]


def _torchrun(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "cnnlab", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("ddp") / "data", 1024, 256)


def assert_one_process_run(out, data, single) -> None:
    """`out`, trained by two ranks with ARGS, is the run one process trains into `single`:
    its records written once (not once per rank), its weights the same within 1e-5."""
    evals = [r for r in read_metrics(out) if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["best.pt",
                                                                          "checkpoint.pt"]
    options = dict(zip([a.lstrip("-").replace("-", "_") for a in ARGS[::2]], ARGS[1::2]))
    cnnlab.train("lenet5", "mnist", data_dir=str(data), out=single, progress=False,
                 **{k: (float(v) if k == "lr" else int(v) if v.isdigit() else v)
                    for k, v in options.items()})
    a = checkpoint.load(out / "checkpoint.pt")["model"]
    b = checkpoint.load(single / "checkpoint.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_two_ranks_match_one_process(data, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun("lenet5", "mnist", "--data-dir", str(data), "--out", str(out), *ARGS)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.strip().splitlines() == [str(out)]  # rank 0 alone prints the run directory
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "rank 1" not in stderr  # rank 0 alone reports
    assert_one_process_run(out, data, tmp_path / "single")

    # a checkpoint written by 2 ranks resumes in one process
    resumed = cnnlab.train(resume=out, epochs=3, progress=False)
    assert resumed["epochs"] == 3 and resumed["world_size"] == 1


def test_a_failing_rank_brings_the_job_down(data, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun("lenet5", "mnist", "--data-dir", str(data), "--out", str(out),
                     "--epochs", "50", "--batch-size", "8", "--telemetry", "0")
    deadline = time.time() + 120
    while time.time() < deadline and not any(r["type"] == "train" for r in read_metrics(out)):
        time.sleep(0.1)
    victim = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                  if p.environ().get("RANK") == "1")
    killed = time.time()
    victim.kill()
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - killed < 60
    assert "rank" in stderr.lower() and ("SIGKILL" in stderr or "Signal 9" in stderr
                                         or "exitcode" in stderr)


def _launch(*args):
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--nproc", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_nproc_checks_options_once_and_passes_the_ranks_status_through(data, tmp_path):
    """Bad input: one line before any process starts. SIGTERM to the launcher reaches the
    ranks, which checkpoint and stop with 143 (not torchrun's 1, no torchrun traceback)."""
    out = tmp_path / "run"
    proc = _launch("lenet5", "mnist", "--data-dir", str(data), "--out", str(out), "--lr", "-1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.count("\n") == 1  # -1 or -1.0: config's to say
    assert err.startswith("cnnlab: error: --lr must be positive, got -1")
    proc = _launch("lenet5", "mnist", "--data-dir", str(data), "--out", str(out),
                   "--epochs", "30", "--batch-size", "32", "--log-every", "2", "--telemetry",
                   "0", "--schedule", "constant")
    deadline = time.time() + 120
    while time.time() < deadline and not any(r["type"] == "train" for r in read_metrics(out)):
        time.sleep(0.1)
    proc.terminate()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
    assert f"checkpoint written - resume with: cnnlab train --resume {out}" in err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert checkpoint.load(out / "checkpoint.pt")["step"] > 0


@pytest.mark.parametrize("gpus,args,error", [
    (1, [], "--nproc 2: this machine has 1 GPU(s) and each process needs its own; use "
            "--nproc 1, or --device cpu to run 2 processes on the CPU"),
    (0, ["--device", "cuda"], "--nproc 2: this machine has 0 GPU(s)"),
    (1, ["--device", "cpu"], None),  # gloo on the CPU
    (0, [], None),                   # auto without GPUs: the CPU
    (2, [], None),
])
def test_nproc_needs_a_gpu_a_process_or_the_cpu(monkeypatch, capsys, tmp_path, gpus, args,
                                                error):
    from cnnlab import cli
    from cnnlab.cli import main

    monkeypatch.chdir(tmp_path)  # the launcher claims runs/<time>-... here
    monkeypatch.delenv("CNNLAB_DEVICE")  # the default device: auto
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    launched = []
    monkeypatch.setattr(cli, "launch", lambda n, rest, run, nodes: launched.append(n) or 0)
    code = main(["train", "lenet5", "mnist", "--nproc", "2", *args])
    err = capsys.readouterr().err
    if error:
        assert code == 2 and error in err and not launched
    else:
        assert code == 0 and launched == [2]
        note = "cnnlab: note: no GPU here: the 2 processes train on the CPU"
        assert (note in err) == (gpus == 0 and args == []), err
