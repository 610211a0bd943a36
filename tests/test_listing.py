"""`cnnlab runs`: run directories written by hand as training writes them (every status), a
sweep and a search, --json, bad folders, one real run; and that listing imports no torch."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnlab import listing
from cnnlab.cli import main
from cnnlab.runs import DIVERGED, RunDir

T0 = time.mktime((2026, 3, 1, 9, 30, 0, 0, 0, -1))  # local time: the table's 2026-03-01 09:30


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _train(step: int, epochs_done: float) -> dict:
    return {"type": "train", "step": step, "epoch": int(epochs_done) + 1,
            "epochs_done": epochs_done, "loss": 0.5, "lr": 0.05, "images_per_second": 900.0}


def _eval(epoch: int, steps: int, acc: float) -> dict:
    return {"type": "eval", "epoch": epoch, "steps": steps, "epochs_done": float(epoch),
            "test_loss": 0.3, "test_acc": acc, "train_seconds": 10.0 * epoch,
            "eval_seconds": 0.5}


def make_run(path: Path, *, started: float, epochs: float = 2, records: int = 2,
             finished: bool = True, model: str = "lenet5", dataset: str = "mnist") -> Path:
    """A run directory as `cnnlab train` leaves it: config.json, env.json, metrics.jsonl
    (a telemetry record first, train records every 10 steps, an eval per epoch of 20 steps)
    and, `finished`, summary.json. `records`: the epochs evaluated."""
    path.mkdir(parents=True)
    _write(path / "config.json", {"model": model, "dataset": dataset, "preset": "seed",
                                  "epochs": epochs, "seed": 0, "lr": 0.05, "device": "auto",
                                  "resolved": {"device": "cpu", "precision": "fp32",
                                               "world_size": 1}})
    _write(path / "env.json", {"python": "3.12", "device": "cpu"})
    lines = [{"type": "telemetry", "time": started + 1, "elapsed": 1.0, "cpu_percent": 99.0,
              "rss_mb": 500.0, "gpu_util": None, "gpu_mem_mb": None, "images_per_second": 0}]
    for epoch in range(1, records + 1):
        lines += [_train(20 * epoch - 10, epoch - 0.5), _train(20 * epoch, float(epoch)),
                  _eval(epoch, 20 * epoch, 90.0 + epoch)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if finished:
        _write(path / "summary.json", {
            "model": model, "dataset": dataset, "preset": "seed", "epochs": epochs,
            "epochs_done": epochs, "best_epochs_done": float(records),
            "final_test_acc": 90.0 + records, "best_test_acc": 90.0 + records,
            "best_epoch": records, "selected_on": "test", "final_test_loss": 0.3,
            "train_seconds": 10.0 * records, "wall_seconds": 12.5, "images_per_second": 900.0,
            "steps": 20 * records, "parameters": 61706, "device": "cpu", "precision": "fp32",
            "run_dir": str(path)})
    for name in ("config.json", "env.json"):
        os.utime(path / name, (started, started))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    """One run of each status, written in another order than they started."""
    root = tmp_path / "runs"
    make_run(root / "finished", started=T0)
    interrupted = make_run(root / "interrupted", started=T0 + 60, epochs=3, finished=False)
    with (interrupted / "metrics.jsonl").open("a") as f:  # stopped mid-epoch, a torn line
        f.write(json.dumps(_train(50, 2.5)) + "\n" + '{"type": "tr')
    diverged = make_run(root / "diverged", started=T0 + 120, finished=False, records=1)
    _write(diverged / DIVERGED, {"error": "the loss became NaN at step 27", "step": 27,
                                 "epoch": 2})
    make_run(root / "nested" / "running", started=T0 + 180, finished=False, records=1)
    make_run(root / "not-started", started=T0 + 240, finished=False, records=0)
    damaged = root / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"model": "lenet5", "data')
    os.utime(damaged / "config.json", (T0 + 300, T0 + 300))
    (root / "notes").mkdir()  # a folder that holds no run
    return root


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_the_table_gives_every_status_oldest_first(runs, capsys):
    with RunDir(runs / "nested" / "running"):  # a live process writes it
        assert main(["runs", str(runs)]) == 0
    header, *rows = _lines(capsys)
    assert header.split()[:5] == ["name", "kind", "model", "dataset", "status"]
    names = [row.split()[0] for row in rows]
    assert names == ["finished", "interrupted", "diverged", "nested/running", "not-started",
                     "damaged"]
    finished, interrupted, diverged, running, not_started, damaged = rows
    assert "finished" in finished.split()[4:] and "92.00%" in finished
    assert "2/2" in finished and "20.0 s" in finished and "2026-03-01 09:30" in finished
    assert "interrupted at step 50" in interrupted and "2.5/3" in interrupted
    assert "diverged at step 27 (epoch 2)" in diverged
    assert "running at step 20" in running and "lenet5" in running
    assert "not started" in not_started and "-/2" in not_started
    assert "damaged (config.json is unreadable)" in damaged
    assert main(["runs", str(runs)]) == 0  # the lock goes with its holder
    assert "interrupted at step 20" in _lines(capsys)[4]


def test_json_has_the_same_fields_as_numbers(runs, capsys, monkeypatch):
    monkeypatch.setattr(listing, "TAIL_BYTES", 200)  # a long metrics.jsonl: its end only
    assert main(["runs", str(runs), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    finished = rows["finished"]
    assert finished["status"] == "finished" and finished["step"] == 40
    assert finished["best_test_acc"] == 92.0 and finished["final_test_acc"] == 92.0
    assert finished["epochs_done"] == 2 and finished["epochs"] == 2
    assert finished["train_seconds"] == 20.0 and finished["model"] == "lenet5"
    assert finished["started"] == "2026-03-01 09:30" and finished["started_at"] == T0
    assert (rows["interrupted"]["status"], rows["interrupted"]["step"]) == ("interrupted", 50)
    assert rows["interrupted"]["epochs_done"] == 2.5
    assert (rows["diverged"]["status"], rows["diverged"]["step"]) == ("diverged", 27)
    assert rows["not-started"]["status"] == "not started"
    assert rows["damaged"]["status"] == "damaged"
    assert rows["damaged"]["error"] == "config.json is unreadable"


def test_odd_files_show_as_damaged_or_dashes(tmp_path, capsys):
    odd = make_run(tmp_path / "odd", started=T0, finished=False)
    _write(odd / "config.json", {"model": 5, "dataset": None, "epochs": "many"})
    with (odd / "metrics.jsonl").open("a") as f:
        f.write('[1, 2]\n{"type": "eval", "epoch": 3}\n{"type": "train", "step": "x"}\n')
    cut = make_run(tmp_path / "cut-summary", started=T0 + 1)
    (cut / "summary.json").write_text("[]")
    assert main(["runs", str(tmp_path)]) == 0
    header, odd_row, cut_row = _lines(capsys)
    assert odd_row.split()[:4] == ["odd", "run", "5", "-"] and "interrupted at step" in odd_row
    assert "lenet5" in cut_row and "damaged (summary.json is no object)" in cut_row


def test_a_sweep_and_a_search_are_one_row_each(tmp_path, capsys):
    sweep = tmp_path / "sweeps" / "pool"
    names = ["pool=max-seed=0", "pool=avg-seed=0", "pool=max-seed=1", "pool=avg-seed=1"]
    sweep.mkdir(parents=True)
    _write(sweep / "sweep.json", {"keys": ["pool"], "seeds": 2, "runs": [
        {"name": n, "point": n.split("-")[0], "values": {}, "seed": 0} for n in names]})
    for i, name in enumerate(names[:3]):
        make_run(sweep / name, started=T0 + i, finished=i < 2)
    tune = tmp_path / "sweeps" / "search"
    tune.mkdir()
    make_run(tune / "trial-0000", started=T0 + 10, model="resnet18", dataset="cifar10")
    make_run(tune / "trial-0001", started=T0 + 11, model="resnet18", dataset="cifar10",
             finished=False, records=1)
    _write(tune / "tune.json", {"model": "resnet18", "dataset": "cifar10", "trials": 2,
                                "rows": [{"run": "trial-0001", "state": "pruned"}]})
    assert main(["runs", str(tmp_path / "sweeps")]) == 0
    header, pool, search = _lines(capsys)
    assert pool.split()[:4] == ["pool", "sweep", "lenet5", "mnist"]
    assert "2 of 4 finished, 1 interrupted" in pool and "92.00%" in pool
    assert search.split()[:4] == ["search", "tune", "resnet18", "cifar10"]
    assert "1 of 2 finished, 1 pruned" in search
    assert main(["runs", str(sweep), "--expand"]) == 0  # the sweep directory itself
    header, pool, *members = _lines(capsys)
    assert [m.split()[0] for m in members] == [f"pool/{n}" for n in names[:3]]
    assert all(m.startswith("  pool/") for m in members)
    assert main(["runs", str(tmp_path / "sweeps"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["status"], r["finished"], r["total"]) for r in rows] == [
        ("sweep", "incomplete", 2, 4), ("tune", "finished", 1, 2)]
    assert rows[1]["runs"][1]["status"] == "pruned" and rows[1]["runs"][1]["step"] == 20


def test_a_missing_folder_is_one_line_and_an_empty_one_says_so(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere does not exist" in err
    (tmp_path / "empty" / "plain").mkdir(parents=True)
    assert main(["runs", str(tmp_path / "empty")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == f"no runs under {tmp_path / 'empty'}\n"


def test_listing_imports_no_torch(runs):
    code = ("import sys; from cnnlab.cli import main; "
            f"assert main(['runs', {str(runs)!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "interrupted at step 50" in done.stdout


def test_a_real_run_is_listed_finished(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "runs" / "real"
    assert main(["train", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--epochs", "0.5",
                 "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["runs", str(out.parent), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert (row["name"], row["kind"], row["status"], row["model"], row["dataset"]) == (
        "real", "run", "finished", "lenet5", "mnist")
    assert row["step"] == summary["steps"] > 0 and row["epochs"] == 0.5
    assert row["final_test_acc"] == summary["final_test_acc"]
    assert abs(row["started_at"] - time.time()) < 120
