import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import write_folder

import cnnlab
from cnnlab import checkpoint
from cnnlab.runs import read_metrics

FAST = dict(epochs=2, batch_size=32, log_every=4, progress=False)


def test_train_writes_the_run_directory(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, lr=0.05, **FAST)
    for name in ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "best.pt",
                 "summary.json", "loss.png", "accuracy.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in ("model", "dataset", "epochs", "final_test_acc", "best_test_acc", "train_seconds",
                "wall_seconds", "images_per_second", "parameters", "device"):
        assert key in summary
    assert summary["parameters"] == 61_706 and summary["device"] == "cpu"
    assert summary["best_test_acc"] > 50  # the synthetic classes are easy

    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.05 and config["preset"] == "fast" and config["seed"] == 0
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["cpu_cores_logical"] >= 1

    records = read_metrics(out)
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24, 28, 32]  # 16 steps per epoch
    assert all(set(r) >= {"step", "epoch", "loss", "lr", "images_per_second"} for r in train)
    assert [r["epoch"] for r in evals] == [1, 2]
    assert evals[-1]["test_acc"] == summary["final_test_acc"]

    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "epoch", "step", "config", "rng"}
    assert ckpt["epoch"] == 2 and ckpt["step"] == 32
    meta = ckpt["model_meta"]
    assert meta["classes"] == [str(i) for i in range(10)] and meta["image_size"] == [28, 28]
    best = checkpoint.load(out / "best.pt")
    assert best["test_acc"] == summary["best_test_acc"]


def test_a_fraction_of_an_epoch_ends_the_last_epoch_part_way(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, lr=0.05,
                           **{**FAST, "epochs": "1.5"})
    assert summary["epochs"] == 1.5 and summary["steps"] == 24  # 16 steps an epoch
    evals = [r for r in read_metrics(out) if r["type"] == "eval"]
    assert [(r["epoch"], r["steps"]) for r in evals] == [(1, 16), (2, 24)]
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 24)
    assert ckpt["scheduler"]["last_epoch"] == 24  # the schedule was laid out for 24 steps
    with pytest.raises(cnnlab.errors.CnnlabError, match="after whole epochs"):
        cnnlab.train(resume=out, epochs=3, progress=False)


def test_two_cpu_runs_with_one_seed_are_identical(tiny_mnist, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, seed=3, **FAST)
    strip = lambda rs: [{k: v for k, v in r.items()  # noqa: E731
                         if k not in ("images_per_second", "train_seconds", "eval_seconds")}
                        for r in rs if r["type"] != "telemetry"]
    assert strip(read_metrics(runs[0])) == strip(read_metrics(runs[1]))
    a, b = (checkpoint.load(r / "checkpoint.pt")["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "c", seed=4, **FAST)
    c = checkpoint.load(tmp_path / "c" / "checkpoint.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resnet_on_cifar_format_and_folder(tmp_path):
    from conftest import write_cifar

    root = write_cifar(tmp_path / "data", n_train=40, n_test=20)
    s = cnnlab.train("resnet18", "cifar10", data_dir=str(root), out=tmp_path / "r", epochs=1,
                     batch_size=20, progress=False)
    assert s["parameters"] == 11_173_962 and s["epochs"] == 1
    folder = write_folder(tmp_path / "pets", size=16)
    s = cnnlab.train("lenet5", f"folder:{folder}", out=tmp_path / "f", epochs=1, batch_size=6,
                     augment="crop,flip", progress=False)
    assert s["dataset"] == f"folder:{folder}"


def _cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_cli_trains_and_prints_the_run_directory_last(tiny_mnist, tmp_path):
    res = _cli("train", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--epochs", "1",
               "--batch-size", "64", "--log-every", "2", "--lr", "0.05", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / res.stdout.strip().splitlines()[-1]
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "summary.json").is_file()
    assert "-lenet5-mnist" in run_dir.name
    # plain lines when not on a terminal: the epochs done and the step of how many, the time
    # left, and a summary line an epoch
    steps = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert re.search(rf"epoch {2 / steps:g}/1 step 2/{steps}: loss [0-9.]+ lr [0-9.e-]+ "
                     r"[0-9,]+ img/s, ETA [0-9.]+ (s|min)\n", res.stderr), res.stderr
    assert re.search(r"epoch 1/1: [0-9.]+ s, train loss [0-9.]+, test loss [0-9.]+, "
                     r"test accuracy [0-9.]+%\n", res.stderr), res.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "inception", "mnist"], "unknown model 'inception'; choose one of lenet5, alexnet"),
    (["train", "lenet5", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "lenet5", "mnist", "--lr", "0"], "--lr must be positive"),
    (["train", "lenet5", "mnist", "--batch-size", "-5"], "--batch-size must be positive"),
    (["train", "lenet5", "mnist", "--device", "cuda:7"], "cuda:7"),
    (["train", "lenet5", "mnist", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "lenet5", "mnist", "--epochs", "three"], "invalid number value: 'three'"),
    (["train", "lenet5", "mnist", "--config", "missing.toml"], "config file not found"),
    (["train", "lenet5", "fashion-mnist", "--no-download"], "fashion-mnist not found"),
    (["train", "lenet5", "folder:nowhere"], "dataset folder nowhere does not exist"),
])
def test_cli_bad_input_one_line_exit_2(tiny_mnist, tmp_path, args, message):
    res = _cli(*args, "--data-dir", str(tiny_mnist), cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:"), res.stderr
    assert message in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


def test_cli_corrupt_data_and_empty_folder(tiny_mnist, tmp_path):
    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    res = _cli("train", "lenet5", "mnist", "--data-dir", str(tiny_mnist), cwd=tmp_path)
    assert res.returncode == 2 and "truncated" in res.stderr and "Traceback" not in res.stderr
    root = write_folder(tmp_path / "pets")
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    res = _cli("train", "lenet5", f"folder:{root}", cwd=tmp_path)
    assert res.returncode == 2 and "dog has no images" in res.stderr


def test_out_refuses_to_overwrite_a_run(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, **FAST)
    before = (out / "summary.json").read_bytes()
    res = _cli("train", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--out", str(out))
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_muon_trains_lenet5_and_resumes_bitwise(tiny_mnist, tmp_path, monkeypatch):
    from cnnlab import trainer
    from cnnlab.errors import Interrupted

    # a Muon lr above the preset's for LeNet-5 (0.01, chosen on the real MNIST's 1.5 epochs):
    # this tiny split gives it one epoch
    options = dict(data_dir=str(tiny_mnist), optimizer="muon", muon_lr=0.05, epochs=1,
                   batch_size=32, log_every=4, progress=False)
    ref = tmp_path / "ref"
    summary = cnnlab.train("lenet5", "mnist", out=ref, **options)
    assert summary["final_test_acc"] > 50  # chance: 10%
    losses = [r["loss"] for r in read_metrics(ref) if r["type"] == "train"]
    assert losses[-1] < losses[0] / 2
    ckpt = checkpoint.load(ref / "checkpoint.pt")
    assert (ckpt["config"]["optimizer"], ckpt["config"]["muon_lr"]) == ("muon", 0.05)
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == [6, 4]
    with pytest.raises(cnnlab.errors.CnnlabError, match="--optimizer sgd differs from the "
                                                        "run's muon"):
        cnnlab.train(resume=ref, optimizer="sgd", progress=False)

    real = trainer.StopSignals.requested
    steps = {"n": 0}

    def stop_at_step_7(self, dist, collective):  # as if SIGTERM came during step 7
        steps["n"] += 1
        if steps["n"] == 7:
            self.signum = signal.SIGTERM
        return real(self, dist, collective)

    out = tmp_path / "cut"
    monkeypatch.setattr(trainer.StopSignals, "requested", stop_at_step_7)
    with pytest.raises(Interrupted):
        cnnlab.train("lenet5", "mnist", out=out, **options)
    monkeypatch.setattr(trainer.StopSignals, "requested", real)
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 7
    cnnlab.train(resume=out, progress=False)
    a, b = checkpoint.load(ref / "checkpoint.pt"), checkpoint.load(out / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_run_short_for_its_data_says_so_and_what_to_pass(tmp_path, capsys):
    """A small folder under the fast preset (made for MNIST-sized data) trains a handful of
    steps: one note says so, with the epochs that would give a few hundred."""
    from conftest import write_folder

    import cnnlab

    root = write_folder(tmp_path / "pets", n_train=20, n_test=4)
    cnnlab.train("lenet5", f"folder:{root}", out=tmp_path / "run", image_size="28x28",
                 telemetry=0)
    err = capsys.readouterr().err
    assert ("cnnlab: note: this run is short for its data: 2 training steps (1.5 epochs of 60 "
            "images in batches of 64); for a model that learns, pass --epochs 400 or more") in err
