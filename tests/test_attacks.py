"""A shared study is input from other people: attacks on sweeps and searches, as a list.

Anyone with a study's storage URL can write its trials (run names, params, attributes) and
its study attributes through Optuna's public API; a second command can point at a sweep
directory another is using. Each attack below is made that way; the worker must refuse the
tampered trial in one escaped line (once), never queue it again, change nothing outside the
sweep or tune directory, finish every legitimate point, and say in its exit status (1) and
results.md that trials were refused.

    tune  - run name "../../x", an absolute path, a sibling trial's run, escape sequences,
            not text; params outside the space (epochs 10000, lr 1e300), of the wrong
            type (text, NaN, a table), unknown choices, unknown params; enqueued params
            that are no table
    sweep - a run name no plan point has, a plan point's run with other params, a run
            name that is a table, control characters; a stop reason with escape sequences
    two commands - other options into a running, a finished or an interrupted sweep;
            another grid into a finished sweep; more seeds extend it
    the disk  - a point's directory holding an unfinished run of other settings
"""

import hashlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import write_mnist

from cnnlab.cli import main

optuna.logging.set_verbosity(optuna.logging.ERROR)
ESC = "\x1b[31m"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("attacks") / "data", n_train=256, n_test=64)


def _hashes(root: Path, skip: Path) -> dict[str, str]:
    """Every file under `root` but those under `skip`, with its content's hash."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and skip not in p.parents}


def _study(out: Path) -> optuna.Study:
    (name,) = optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _refusals(err: str) -> list[str]:
    return [line for line in err.splitlines() if "refused trial" in line]


# ---- tune ------------------------------------------------------------------------------------

TUNE_ATTACKS = [  # (user_attrs, params, what the line says)
    ({"run": "../../x"}, {}, "its run name '../../x' is none this command makes"),
    ({"run": "/tmp/elsewhere"}, {}, "its run name '/tmp/elsewhere' is none"),
    ({"run": "trial-0000"}, {}, "its run name 'trial-0000' is none"),  # a sibling's run
    ({"run": f"trial-{ESC}9"}, {}, "its run name 'trial-\\x1b[31m9' is none"),
    ({"run": {"a": 1}}, {}, "its run name is not text ({'a': 1})"),
    ({}, {"epochs": 10000}, "its parameter epochs=10000 is outside the searched space"),
    ({}, {"lr": 1e300}, "its parameter lr=1e+300 is outside the searched space"),
    ({}, {"lr": "fast"}, "its parameter lr=fast is outside"),
    ({}, {"lr": math.nan}, "its parameter lr=nan is outside"),
    ({}, {"lr": {"x": 1}}, "its parameter lr={'x': 1} is outside"),
    ({}, {"batch-size": 48}, "its parameter batch-size=48 is outside the searched space "
                             "(batch-size one of 32, 64)"),
    ({}, {"momentum": 0.5}, "its parameter momentum is not searched"),
]


def test_tampered_search_trials_are_refused_and_the_search_goes_on(data, tmp_path, capfd):
    out = tmp_path / "lab" / "tune"
    (tmp_path / "lab" / "other-user-run").mkdir(parents=True)
    (tmp_path / "lab" / "other-user-run" / "checkpoint.pt").write_bytes(b"theirs")

    def tune(trials: int) -> int:
        return main(["tune", "lenet5", "mnist", "--data-dir", str(data), "--space",
                     "lr=0.01:0.3:log", "--space", "batch-size=32,64", "--space",
                     "epochs=0.2:0.5", "--trials", str(trials), "--val-split", "0.1",
                     "--telemetry", "0", "--out", str(out)])

    assert tune(1) == 0
    study = _study(out)
    for user_attrs, params, _ in TUNE_ATTACKS:
        study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)
    study.add_trial(optuna.trial.create_trial(  # enqueued params that are no table
        state=optuna.trial.TrialState.WAITING, system_attrs={"fixed_params": [1, 2]}))
    capfd.readouterr()
    before = _hashes(tmp_path, out)
    assert tune(2) == 1
    err = capfd.readouterr().err
    assert _hashes(tmp_path, out) == before  # nothing outside the tune directory changed
    lines = _refusals(err)
    assert len(lines) == len(TUNE_ATTACKS) + 1, err  # each said once
    for (_, _, says), line in zip(TUNE_ATTACKS, lines):
        assert says in line, (says, line)
    assert "its enqueued params are not a table ([1, 2])" in lines[-1]
    assert ESC not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"cnnlab: {len(lines)} trials of the study were refused, the others ran (the first: "
        "its run name '../../x' is none")
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0] == "trial-0000"  # one more trial, no other directory
    assert (out / runs[1] / "summary.json").is_file()  # the search went on
    md = (out / "results.md").read_text()
    assert f"## Refused trials\n\n{len(lines)} trials in the study's storage" in md
    # and no importance.png without a word
    assert "No parameter importances yet: they need 4 complete trials (2 so far)." in md
    states = [t.state for t in _study(out).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == len(lines)
    # never queued again: the next command refuses nothing and trains nothing
    capfd.readouterr()
    assert tune(2) == 1
    assert _refusals(capfd.readouterr().err) == []


# ---- sweep -----------------------------------------------------------------------------------

def _sweep_args(data, out, *extra) -> list[str]:
    return ["sweep", "lenet5", "mnist", "--data-dir", str(data), "--grid", "lr=0.05,0.1",
            "--epochs", "0.25", "--telemetry", "0", "--out", str(out), *extra]


def test_tampered_sweep_trials_are_refused_and_the_points_finish(data, tmp_path, capfd):
    out = tmp_path / "lab" / "sweep"
    assert main(_sweep_args(data, out)) == 0
    study = _study(out)
    import shutil

    shutil.rmtree(out / "lr=0.1-seed=0")  # a point to train again when the sweep reruns
    attacks = [({"run": "nope"}, {}, "its run name 'nope' is none this command makes"),
               ({"run": "../lr=0.05-seed=0"}, {}, "its run name '../lr=0.05-seed=0' is none"),
               ({"run": {"x": 1}}, {}, "its run name is not text"),
               ({"run": f"lr=0.05-seed=0{ESC}"}, {}, "'lr=0.05-seed=0\\x1b[31m' is none"),
               ({"run": "lr=0.05-seed=0"}, {"lr": 0.1},
                "its parameter lr=0.1 is not that of its point lr=0.05-seed=0"),
               ({"run": "lr=0.05-seed=0"}, {"seed": 7},
                "its parameter seed=7 is not that of its point")]
    for user_attrs, params, _ in attacks:
        study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)
    capfd.readouterr()
    before = _hashes(tmp_path, out)
    assert main(_sweep_args(data, out)) == 1
    err = capfd.readouterr().err
    assert _hashes(tmp_path, out) == before
    lines = _refusals(err)
    assert len(lines) == len(attacks), err
    for (_, _, says), line in zip(attacks, lines):
        assert says in line, (says, line)
    assert ESC not in err and "Traceback" not in err
    assert (out / "lr=0.1-seed=0" / "summary.json").is_file()  # the legitimate point
    assert "## Refused trials" in (out / "results.md").read_text()
    # the points carry their values as params, for Optuna's own tools
    done = [t for t in _study(out).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {(t.params["lr"], t.params["seed"]) for t in done} == {(0.05, 0), (0.1, 0)}


def test_a_stop_reason_from_the_storage_is_printed_escaped(data, tmp_path, capfd):
    out = tmp_path / "sweep"
    assert main(_sweep_args(data, out)) == 0
    (out / "lr=0.1-seed=0" / "summary.json").unlink()
    study = _study(out)
    capfd.readouterr()
    # a stop set while the command runs (after it lifted an older one): the workers stop
    original = optuna.storages.RDBStorage.get_study_user_attrs

    def stopped(self, study_id):
        attrs = original(self, study_id)
        return {**attrs, "cnnlab_stop": f"{ESC}stop\nnow"}

    optuna.storages.RDBStorage.get_study_user_attrs = stopped
    try:
        assert main(_sweep_args(data, out)) == 2
    finally:
        optuna.storages.RDBStorage.get_study_user_attrs = original
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1] == "cnnlab: error: \\x1b[31mstop\\nnow"
    del study


# ---- two commands, one sweep directory ---------------------------------------------------------

def _sweep_cmd(data, out, epochs: str, *extra) -> list[str]:
    return [sys.executable, "-m", "cnnlab", *_sweep_args(data, out)[:-6], "--epochs", epochs,
            "--telemetry", "0", "--out", str(out), *extra]


def test_a_sweep_with_other_options_is_refused_while_the_first_runs(data, tmp_path):
    """Sweep A (--epochs 20) runs; B (--epochs 30) into the same directory is refused in one
    line naming the difference, and touches nothing of A's; A finishes with its own runs."""
    out = tmp_path / "sweep"
    first = subprocess.Popen(_sweep_cmd(data, out, "20", "--log-every", "1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "lr=0.05-seed=0" / "checkpoint.pt").is_file():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    second = subprocess.run(_sweep_cmd(data, out, "30"), capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2
    assert second.stderr == (f"cnnlab: error: {out} holds another sweep (--epochs 20 there, "
                             "30 here); give the same options to extend it, or choose another "
                             "--out\n")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    for run in ("lr=0.05-seed=0", "lr=0.1-seed=0"):
        assert '"epochs": 20' in (out / run / "config.json").read_text()
    # another grid into the finished sweep is refused too, its results untouched
    results = (out / "results.md").read_bytes()
    other = subprocess.run([*_sweep_cmd(data, out, "20"), "--grid", "pool=max,avg"],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "holds another sweep (grid keys lr, this command's " \
        "lr, pool)" in other.stderr
    assert (out / "results.md").read_bytes() == results


def test_more_seeds_extend_a_running_sweep(data, tmp_path):
    """The same options with more seeds, started while the first command runs: both end,
    each run is trained once, and both results list every point."""
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_sweep_cmd(data, out, "1", *extra), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ((), ("--seeds", "2"))]
    ends = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], ends
    err = "".join(e for _, e in ends)
    for run in ("lr=0.05-seed=0", "lr=0.1-seed=0", "lr=0.05-seed=1", "lr=0.1-seed=1"):
        assert err.count(f"{run}: training") == 1, err
        assert (out / run / "summary.json").is_file()
    md = (out / "results.md").read_text()
    assert "4 of 4 runs finished" in md


def test_an_unfinished_run_of_other_settings_is_refused_never_removed(data, tmp_path, capfd):
    """A point's directory holds an unfinished run begun with other settings (put there by
    hand, or by an older cnnlab): the point is refused with the reason, the directory kept
    as it is, the other points go on."""
    out = tmp_path / "sweep"
    assert main(_sweep_args(data, out)) == 0
    run = out / "lr=0.1-seed=0"
    (run / "summary.json").unlink()
    config = (run / "config.json").read_text().replace('"epochs": 0.25', '"epochs": 0.5')
    (run / "config.json").write_text(config)
    (out / "lr=0.05-seed=0" / "summary.json").unlink()  # a point to train again
    before = _hashes(run, tmp_path / "none")
    capfd.readouterr()
    assert main(_sweep_args(data, out)) == 1
    err = capfd.readouterr().err
    (line,) = _refusals(err)
    assert f"{run} holds a run with other settings (it ran with epochs=0.5, this point asks " \
           "for 0.25); remove it or choose another --out" in line
    assert _hashes(run, tmp_path / "none") == before
    assert (out / "lr=0.05-seed=0" / "summary.json").is_file()
