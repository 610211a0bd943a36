"""Bad numbers and names get one line, exit status 2 and nothing written: numbers out of
their option's range (huge integers, never-ending epochs, sampling thousands of times a
second), text where a number belongs, and mistyped names, which get the nearest name."""

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab.cli import main
from cnnlab.config import resolve
from cnnlab.errors import CnnlabError
from cnnlab.models import MODELS
from cnnlab.options import OPTIONS
from cnnlab.runs import new_dir

HUGE = "1" + "0" * 400


def _refused(capsys, argv: list[str]) -> str:
    """The one line `cnnlab ARGV` prints; it exits 2, writes nothing and prints no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # an option error: argparse's way out
        code = e.code
    assert code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("cnnlab: error: "), err
    return err.strip().removeprefix("cnnlab: error: ")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield
    assert list(tmp_path.iterdir()) == [], "a refused command wrote something"


@pytest.mark.parametrize("args, message", [
    (["--batch-size", HUGE], "--batch-size must be at most 1,048,576, got 100000...(401 digits)"),
    (["--epochs", HUGE], "--epochs must be at most 10,000, got 100000...(401 digits)"),
    (["--seed", HUGE], "--seed must be at most 4,294,967,295"),
    (["--seed", "18446744073709551616"], "--seed must be at most 4,294,967,295, got "
                                         "18446744073709551616"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--epochs", "1e308"], "--epochs must be at most 10,000, got 1e+308"),
    (["--telemetry", "1e-300"], "--telemetry must be at least 0.01 (or 0: off), got 1e-300"),
    (["--log-every", HUGE], "--log-every must be at most 1,000,000,000"),
    (["--eval-every", "0"], "--eval-every must be positive, got 0"),
    (["--momentum", "1.5"], "--momentum must be at most 1, got 1.5"),
    (["--checkpoint-every", HUGE], "--checkpoint-every must be N steps or N epochs, N from 1 "
                                   "to 10^9"),
])
def test_numbers_out_of_range_are_refused(capsys, args, message):
    assert _refused(capsys, ["train", "lenet5", "mnist", *args]).startswith(message)


def test_every_number_option_has_a_range():
    numbers = [o.name for o in OPTIONS.values() if o.type in ("int", "float")]
    unbounded = {"val_split", "label_smoothing", "ema"}  # fractions in [0, 1), checked apart
    assert [n for n in numbers if OPTIONS[n].limits is None] == sorted(unbounded, key=numbers.index)


@pytest.mark.parametrize("toml, message", [
    ('batch-size = 1' + "0" * 400, "--batch-size must be at most 1,048,576"),
    ("epochs = 1e308", "--epochs must be at most 10,000"),
    ('lr = "0.05"', "lr: '0.05' is text, not a float; write it without quotes"),
    ('epochs = "3"', "epochs: '3' is text, not a float"),
    ('nesterov = "yes"', "nesterov: 'yes' is text, not a bool"),
    ("learning-rate = 0.1", "unknown config file key 'learning-rate'; did you mean lr?"),
    ("batchsize = 8", "unknown config file key 'batchsize'; did you mean batch-size?"),
])
def test_config_file_values(capsys, tmp_path, toml, message):
    config = tmp_path.parent / f"{tmp_path.name}.toml"  # outside the folder that must stay empty
    config.write_text(toml + "\n")
    assert message in _refused(capsys, ["train", "lenet5", "mnist", "--config", str(config)])


def test_text_is_still_read_where_text_is_all_there_is():
    assert resolve("lenet5", "mnist", overrides={"lr": 0.05, "epochs": 3}).lr == 0.05
    assert resolve("lenet5", "mnist", overrides={"lr": "0.05"}).lr == 0.05  # as the command line
    with pytest.raises(CnnlabError, match="'0.05' is text"):  # not from a file
        resolve("lenet5", "mnist", file_values={"lr": "0.05"})


@pytest.mark.parametrize("argv, message", [
    (["train", "lenet", "mnist"], "unknown model 'lenet'; did you mean lenet5? (choose one of "
                                  f"{', '.join(MODELS)})"),
    (["train", "inception", "mnist"], "unknown model 'inception'; choose one of "
                                      f"{', '.join(MODELS)}"),
    (["train", "lenet5", "mnsit"], "unknown dataset 'mnsit'; did you mean mnist?"),
    (["train", "lenet5", "mnist", "--optimizer", "adm"], "unknown optimizer 'adm'; did you "
                                                         "mean adam?"),
    (["train", "lenet5", "mnist", "--epoch", "3"], "unrecognized arguments: --epoch 3; "
                                                   "--epoch: did you mean --epochs?"),
    (["sweep", "lenet5", "mnist", "--grid", "learning-rate=0.1,0.2"],
     "unknown grid key 'learning-rate'; did you mean lr? (grid keys are train options"),
    (["sweep", "lenet5", "mnist", "--grid", "optimiser=sgd"],
     "unknown grid key 'optimiser'; did you mean optimizer?"),
    (["sweep", "lenet5", "mnist", "--grid", "lr=0.1", "--seeds", HUGE],
     "seeds must be a positive integer, at most 1000, got 100000...(401 digits)"),
    (["sweep", "lenet5", "mnist", "--grid", "lr=0.1", "--seed", "4294967295", "--seeds", "2"],
     "--seed must be at most 4,294,967,295, got 4294967296"),
    (["eval", "nowhere", "--batch-size", HUGE], "--batch-size must be at most 1,048,576"),
])
def test_names_and_counts(capsys, argv, message):
    assert _refused(capsys, argv).startswith(message)


@pytest.mark.parametrize("command, args", [
    (["eval"], ["--batch-size", "0"]),
    (["predict", "digit.png"], ["--batch-size", "99999999999"]),
    (["eval"], ["--tta", "bogus"]),
    (["eval"], ["--precision", "fp8"]),
    (["eval"], ["--device", "tpu"]),
])
def test_the_commands_that_use_a_model_refuse_a_value_as_train_does(capsys, command, args):
    message = _refused(capsys, [command[0], "nowhere", *command[1:], *args])
    assert message == _refused(capsys, ["train", "lenet5", "mnist", *args])
    assert message.startswith((f"{args[0]} must be", f"unknown {args[0][2:]} '{args[1]}'"))


def _claim(path, queue):
    queue.put(str(new_dir(Path(path))))


def test_run_directories_claimed_at_the_same_moment_differ(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_claim, args=(tmp_path / "runs" / "same", queue))
             for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    claimed = sorted(queue.get() for _ in procs)
    assert len(set(claimed)) == 6
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        ["same", *(f"same-{n}" for n in range(2, 7))])
    for p in (tmp_path / "runs").iterdir():
        p.rmdir()
    (tmp_path / "runs").rmdir()


def test_two_runs_started_together_without_out_both_train(tmp_path, tiny_mnist):
    cmd = [sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist", "--data-dir",
           str(tiny_mnist), "--epochs", "0.1", "--telemetry", "0", "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [code for _, _, code in results] == [0, 0], [err for _, err, _ in results]
    dirs = {Path(tmp_path, out.strip().splitlines()[-1]).resolve() for out, _, _ in results}
    assert len(dirs) == 2 and all((d / "summary.json").is_file() for d in dirs)
    import shutil

    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tiny_mnist)


def test_input_without_bound_is_refused_at_once(capsys, tmp_path):
    """A configuration that never ends, one too large to be one, and a grid of a million
    runs: each one line, before anything is read whole or built."""
    assert _refused(capsys, ["train", "lenet5", "mnist", "--config", "/dev/zero"]) == (
        "config file /dev/zero is not a regular file; give a TOML file")
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"a" * (2 << 20))
    try:
        assert _refused(capsys, ["sweep", "--config", str(big)]).startswith(
            f"config file {big} is larger than a configuration can be (at most 1,048,576 "
            "bytes)")
    finally:
        big.unlink()
    lrs = ",".join(f"0.{i:04d}" for i in range(1, 1001))
    assert _refused(capsys, ["sweep", "lenet5", "mnist", "--grid", f"lr={lrs}", "--seeds",
                             "1000"]) == (
        "this sweep would train 1,000,000 runs (1,000 points x 1000 seeds), more than the "
        "10,000 a sweep may hold; give fewer grid values or seeds, or split it")


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "--nnodes 2 needs --node-rank from 0 to 1: 0 on --master-addr, then "
                        "1, 2, ... on the others"),
    (["--nnodes", "2", "--node-rank", "2"], "--nnodes 2 needs --node-rank from 0 to 1: 0 on "
                                            "--master-addr, then 1, 2, ... on the others, got 2"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes needs --master-addr HOST"),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "h"],
     "--nnodes needs --out RUN_DIR (or --resume RUN_DIR): every machine names the same run "
     "directory"),
    (["--node-rank", "1"], "--node-rank is for a run on many machines; give --nnodes N too"),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "h", "--out", "r",
      "--rdzv-timeout", "0"], "--rdzv-timeout must be from 1 to 86400 seconds, got 0"),
])
def test_many_machines_options_are_checked_before_any_launch(capsys, args, message):
    assert _refused(capsys, ["train", "lenet5", "mnist", "--device", "cpu", *args]).startswith(
        message)
