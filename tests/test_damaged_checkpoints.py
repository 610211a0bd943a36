"""A damaged run is refused in one line, exit status 2, before anything is written: a
checkpoint whose fields are missing, of the wrong type or do not fit the run; a metrics.jsonl
shorter than the checkpoint says; a file crafted to run code; a path that holds no run. One
tiny run is trained; each case damages a copy of it and checks that --resume leaves every
file of the copy as it was."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_mnist
from PIL import Image

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.runs import RunDir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 2 epochs of 4 steps, trained but not finished (no summary.json): --resume
    restores its checkpoint, then writes the plots and summary."""
    root = tmp_path_factory.mktemp("damaged")
    data = write_mnist(root / "data", 256, 64)
    out = root / "run"
    assert main(["train", "lenet5", "mnist", "--data-dir", str(data), "--out", str(out),
                 "--epochs", "2", "--batch-size", "64", "--checkpoint-every", "1",
                 "--telemetry", "0", "--quiet"]) == 0
    (out / "summary.json").unlink()
    return out


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def _refused(args: list[str], capsys) -> str:
    """The one stderr line of a command that must be refused with exit status 2."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cnnlab: error: "), (code, err)
    return err[0]


def _damaged_copy(trained: Path, tmp_path: Path, damage) -> Path:
    """A copy of the run whose checkpoint.pt is `damage`(its dict), saved again."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    damage(ckpt)
    torch.save(ckpt, run / "checkpoint.pt")
    return run


def _put(name: str, value):
    """Set dotted field `name` (e.g. loop.images) of a checkpoint to `value`."""
    def damage(ckpt):
        *parents, key = name.split(".")
        for parent in parents:
            ckpt = ckpt[parent]
        ckpt[key] = value
    return damage


def _drop(name: str):
    def damage(ckpt):
        *parents, key = name.split(".")
        for parent in parents:
            ckpt = ckpt[parent]
        del ckpt[key]
    return damage


W = "features.0.weight"  # LeNet-5's first convolution: 6 x 1 x 5 x 5

DAMAGE = {
    "no epoch": (_drop("epoch"), "epoch is missing"),
    "epoch str": (_put("epoch", "2"), "epoch is a str, not an int"),
    "epoch negative": (_put("epoch", -1), "epoch is -1, below 0"),
    "step float": (_put("step", 8.0), "step is a float, not an int"),
    "step negative": (_put("step", -5), "step is -5, below 0"),
    "step past the run": (_put("step", 1000), "step is 1000, past the run's 8 steps"),
    "batch bool": (_put("batch", True), "batch is a bool, not an int"),
    "batch past the epoch": (_put("batch", 99), "batch is 99, past the 4 batches of an epoch"),
    "no config": (_drop("config"), "config is missing"),
    "config list": (_put("config", [1]), "config is a list, not a dict"),
    "config lr str": (_put("config.lr", "fast"), "config.lr is a str, not a float"),
    "no config model": (_drop("config.model"), "config.model is missing"),
    "no loop": (_drop("loop"), "loop is missing"),
    "loop str": (_put("loop", "x"), "loop is a str, not a dict"),
    "loop images str": (_put("loop.images", "many"), "loop.images is a str, not an int"),
    "no loop history": (_drop("loop.history"), "loop.history is missing"),
    "loop history item": (_put("loop.history", [1.0, "x"]),
                          "loop.history[1] is a str, not a float"),
    "loop order list": (_put("loop.order", [0, 1]), "loop.order is a list, not a tensor or None"),
    "loop order shape": (_put("loop.order", torch.arange(3)),
                         "loop.order has shape [3], not [256]"),
    "loop order repeats": (_put("loop.order", torch.zeros(256, dtype=torch.int64)),
                           "loop.order is not an order of the 256 training images"),
    "loop window shape": (_put("loop.window", torch.zeros(3, dtype=torch.float64)),
                          "loop.window has shape [3], not [2]"),
    "loop unknown field": (_put("loop.count", 1), "loop.count is no part of the training loop"),
    "loop eval lacks accuracy": (_put("loop.last_eval", {"loss": 1.0}),
                                 "loop.last_eval.accuracy is missing"),
    "loop images negative": (_put("loop.images", -64), "loop.images is -64, below 0"),
    "no rng": (_drop("rng"), "rng is missing"),
    "rng torch list": (_put("rng.torch", [1, 2]), "rng.torch is a list, not a tensor"),
    "rng loader float": (_put("rng.loader", torch.zeros(5056)),
                         "rng.loader has dtype torch.float32, not torch.uint8"),
    "no optimizer": (_drop("optimizer"), "optimizer is missing"),
    "optimizer str": (_put("optimizer", "sgd"), "optimizer is a str, not a dict"),
    "no param groups": (_drop("optimizer.param_groups"), "optimizer.param_groups is missing"),
    "param groups empty": (_put("optimizer.param_groups", []),
                           "optimizer.param_groups holds 0 items, not 1"),
    "param group lr str": (lambda c: c["optimizer"]["param_groups"][0].update(lr="x"),
                           "optimizer.param_groups[0]['lr'] is a str, not an int or a float"),
    "optimizer state shape": (lambda c: c["optimizer"]["state"][0].update(
        momentum_buffer=torch.zeros(3)),
        "optimizer.state[0].momentum_buffer has shape [3], not [6, 1, 5, 5]"),
    "optimizer state of no parameter": (lambda c: c["optimizer"]["state"].update({99: {}}),
                                        "optimizer.state[99] is the state of no parameter"),
    "no scheduler": (_drop("scheduler"), "scheduler is missing"),
    "scheduler list": (_put("scheduler", []), "scheduler is a list, not a dict"),
    "scheduler step str": (_put("scheduler.last_epoch", "8"),
                           "scheduler['last_epoch'] is a str, not an int or a float"),
    "weights shape": (lambda c: c["model"].update({W: torch.zeros(6, 1, 3, 3)}),
                      f"model['{W}'] has shape [6, 1, 3, 3], not [6, 1, 5, 5]"),
    "weights missing": (lambda c: c["model"].pop(W), f"model['{W}'] is missing"),
    "weights extra": (lambda c: c["model"].update(extra=torch.zeros(1)),
                      "model['extra'] is not in this run"),
    "weights not tensors": (lambda c: c["model"].update({W: "w"}),
                            f"model['{W}'] is a str, not a tensor"),
    "metrics offset float": (_put("metrics_offset", 1e12),
                             "metrics_offset is a float, not an int"),
    "metrics offset negative": (_put("metrics_offset", -1), "metrics_offset is -1, below 0"),
    "no metrics offset": (_drop("metrics_offset"), "metrics_offset is missing"),
    "scaler str": (_put("scaler", "x"), "scaler is a str, not a dict or None"),
    "digest int": (_put("data_digest", 5), "data_digest is an int, not a str or None"),
}
if hasattr(torch.optim, "Muon"):  # an sgd run's state, which a muon run would be built for
    DAMAGE["config optimizer muon"] = (_put("config.optimizer", "muon"),
                                       "optimizer.param_groups holds 1 items, not 2")


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_field(trained, tmp_path, capsys, case):
    damage, what = DAMAGE[case]
    run = _damaged_copy(trained, tmp_path, damage)
    before = _files(run)
    err = _refused(["train", "--resume", str(run), "--quiet"], capsys)
    assert f"{run / 'checkpoint.pt'} is damaged (" in err and what in err, err
    assert err.endswith("; remove it to train the run again from the start"), err
    assert _files(run) == before


def test_an_undamaged_copy_resumes(trained, tmp_path):
    """The control: a checkpoint loaded and saved again as the cases do is accepted."""
    run = _damaged_copy(trained, tmp_path, lambda ckpt: None)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize("how", ["removed", "cut", "shorter than the checkpoint says"])
def test_metrics_shorter_than_the_checkpoint_says_is_refused(trained, tmp_path, capsys, how):
    """metrics.jsonl removed or cut, or a checkpoint saying it was longer (10**12 bytes: once
    padded to a sparse terabyte of NUL bytes): --resume never pads it, and writes nothing."""
    run = _damaged_copy(trained, tmp_path, lambda ckpt: ckpt.update(
        metrics_offset=10**12) if how == "shorter than the checkpoint says" else None)
    metrics = run / "metrics.jsonl"
    had = torch.load(run / "checkpoint.pt", weights_only=True)["metrics_offset"]
    if how == "removed":
        metrics.unlink()
    elif how == "cut":
        metrics.write_bytes(metrics.read_bytes()[:10])
    before = _files(run)
    err = _refused(["train", "--resume", str(run), "--quiet"], capsys)
    now = (f"is missing (it held {had:,} bytes" if how == "removed" else
           f"holds {metrics.stat().st_size:,} bytes, fewer than the {had:,} it had")
    assert f"{metrics} {now}" in err and "remove checkpoint.pt" in err, err
    assert _files(run) == before


def test_metrics_are_never_padded(tmp_path):
    run = RunDir(tmp_path / "run", config={"model": "x"})
    run.log({"type": "train", "step": 1})
    size = run.metrics_offset()
    with pytest.raises(CnnlabError, match=f"holds {size} bytes, fewer than the 1,000"):
        run.truncate_metrics(1000)
    run.truncate_metrics(0)
    run.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == b""


def test_a_checkpoint_crafted_to_run_code_is_refused_by_every_command(trained, tmp_path,
                                                                       capsys):
    """Train, eval, predict and export say what the file asks for, and that it is refused -
    not torch's advice to load it with weights_only off; report says so in the report. The
    code never runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for name in ("checkpoint.pt", "best.pt"):
        torch.save({"model": Evil()}, run / name, pickle_module=pickle)
    before = _files(run)
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    for args, name in [(["train", "--resume", str(run)], "checkpoint.pt"),
                       (["eval", str(run)], "best.pt"),
                       (["predict", str(run), str(image)], "best.pt"),
                       (["export", str(run), "--format", "onnx", "--out",
                         str(tmp_path / "m.onnx")], "best.pt")]:
        err = _refused(args, capsys)
        assert err == (f"cnnlab: error: {run / name} holds more than tensors and plain data "
                       f"(it asks for {os.system.__module__}.system), so it is refused "
                       "unread; cnnlab loads only checkpoints written by cnnlab train"), err
        assert "weights_only" not in err
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "so it is refused unread" in (tmp_path / "report" / "report.md").read_text()
    assert not marker.exists() and _files(run) == before


def test_resume_of_a_path_that_holds_no_run_says_what_it_is(trained, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert _refused(["train", "--resume", str(missing)], capsys) == \
        f"cnnlab: error: nothing to resume at {missing}: it does not exist"
    file = trained / "checkpoint.pt"
    assert _refused(["train", "--resume", str(file)], capsys) == (
        f"cnnlab: error: nothing to resume at {file}: it is a file, not a run directory (the "
        f"run directory is {trained})")
    assert "it holds no run" in _refused(["train", "--resume", str(tmp_path)], capsys)
