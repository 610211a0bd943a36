"""Honest model selection: a validation split held out of the training images (seeded,
stratified) or a folder's own val/, on which best.pt is chosen; summaries and reports show
validation and test side by side, and without one, the best checkpoint is labelled as the
best on test."""

import numpy as np
import pytest
from conftest import write_folder

import cnnlab
from cnnlab import checkpoint
from cnnlab.data import Dataset, hold_out
from cnnlab.errors import CnnlabError
from cnnlab.report import write_report
from cnnlab.runs import read_metrics


def _dataset(counts=(30, 20, 10)):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    x = np.arange(len(y), dtype=np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 1, 2, 2), np.uint8)
    return Dataset("toy", ["a", "b", "c"], (0.5,), (0.2,), x, y, x[:3], y[:3], "d" * 16)


def test_hold_out_is_stratified_seeded_and_disjoint():
    data = _dataset()
    split = hold_out(data, 0.2, seed=0)
    assert np.bincount(split.val_y).tolist() == [6, 4, 2]  # 20% of every class
    assert np.bincount(split.train_y).tolist() == [24, 16, 8]
    ids = lambda x: set(x[:, 0, 0, 0].tolist())  # noqa: E731 - each image's pixel is its index
    assert ids(split.val_x).isdisjoint(ids(split.train_x))
    assert ids(split.val_x) | ids(split.train_x) == ids(data.train_x)
    assert np.array_equal(hold_out(data, 0.2, seed=0).val_x, split.val_x)
    assert not np.array_equal(hold_out(data, 0.2, seed=1).val_x, split.val_x)
    assert split.digest == data.digest and split.val_source == "held out"
    assert hold_out(data, 0.0, seed=0) is data


@pytest.mark.parametrize("counts,fraction,message", [
    ((30, 20, 1), 0.6, "leaves class 'c' \\(1 training image\\) with no training images"),
    ((30, 20, 3), 0.1, "leaves class 'c' \\(3 training images\\) with no validation images"),
])
def test_hold_out_refuses_a_class_left_empty(counts, fraction, message):
    with pytest.raises(CnnlabError, match=message):
        hold_out(_dataset(counts), fraction, seed=0)


def test_val_split_must_be_a_fraction(tiny_mnist, tmp_path):
    with pytest.raises(CnnlabError, match="--val-split must be a fraction in \\[0, 1\\)"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), val_split=1.0,
                     out=tmp_path / "r", progress=False)


def test_best_checkpoint_is_chosen_on_validation(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=3,
                           batch_size=32, lr=0.05, val_split=0.25, progress=False, telemetry=0)
    evals = [r for r in read_metrics(out) if r["type"] == "eval"]
    assert all({"val_acc", "val_loss", "test_acc"} <= set(r) for r in evals)
    chosen = max(evals, key=lambda r: r["val_acc"])  # the first of equals
    assert summary["selected_on"] == "validation" and summary["val_images"] == 128
    assert summary["best_epoch"] == chosen["epoch"]
    assert summary["best_val_acc"] == chosen["val_acc"]
    assert summary["test_acc_at_best"] == chosen["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in evals)
    assert summary["final_val_acc"] == evals[-1]["val_acc"]
    best = checkpoint.load(out / "best.pt")
    assert (best["epoch"], best["val_acc"], best["test_acc"]) == \
        (chosen["epoch"], chosen["val_acc"], chosen["test_acc"])
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 3 * 12  # 384 training images

    md = write_report([out], evaluate=False)["md"].read_text()
    assert (f"| best.pt: chosen on validation | epoch {chosen['epoch']}: validation "
            f"{chosen['val_acc']:.2f}%, test {chosen['test_acc']:.2f}% |") in md
    assert "| best on test (optimistic) |" in md


def test_a_folder_val_split_is_used_and_not_combined_with_val_split(tmp_path):
    root = write_folder(tmp_path / "pets", n_train=6, n_test=3)
    write_folder(tmp_path / "valsrc", n_train=2, n_test=2)
    (tmp_path / "valsrc" / "test").rename(root / "val")
    summary = cnnlab.train("lenet5", f"folder:{root}", out=tmp_path / "r", epochs=1,
                           batch_size=6, progress=False, telemetry=0)
    assert summary["selected_on"] == "validation" and summary["val_source"] == "val/"
    assert summary["val_images"] == 6
    with pytest.raises(CnnlabError, match="has a val/ folder of its own"):
        cnnlab.train("lenet5", f"folder:{root}", out=tmp_path / "r2", epochs=1, val_split=0.5,
                     progress=False, telemetry=0)
