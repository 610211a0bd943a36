"""torchvision's named datasets, each from tiny files written here in its official format
(IDX with QMNIST's int32 rows and EMNIST's transposed images, CIFAR-100's pickles, SVHN's
MATLAB files, STL-10's column-major binaries, USPS's bzip2 text): the pixels the right way
up, the labels from 0, one line for each missing or damaged file."""

from __future__ import annotations

import bz2
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import write_idx

import cnnlab
from cnnlab.data import load_dataset
from cnnlab.data.disk import DiskArray
from cnnlab.errors import CnnlabError
from cnnlab.specs import SPECS

N = {"train": 12, "test": 6}


def _images(split: str, c: int, side: int) -> np.ndarray:
    """Images with a mark that shows their orientation: row 1 is bright from column 3 on,
    and each image's first pixel is its index."""
    x = np.zeros((N[split], c, side, side), dtype=np.uint8)
    x[:, :, 1, 3:] = 200
    x[:, :, 0, 0] = np.arange(N[split])[:, None]
    return x


def _labels(split: str, classes: int) -> np.ndarray:
    return np.arange(N[split]) % classes


def _idx_files(folder: Path, prefix: str, test: str, split: str, x: np.ndarray,
               labels: np.ndarray, label_kind: str = "labels-idx1-ubyte") -> None:
    name = "train" if split == "train" else test
    write_idx(folder / f"{prefix}{name}-images-idx3-ubyte", x[:, 0], gz=split == "test")
    path = folder / f"{prefix}{name}-{label_kind}"
    if label_kind.endswith("int"):  # QMNIST: a row of 8 int32 facts, the class first
        rows = np.zeros((len(labels), 8), dtype=">i4")
        rows[:, 0], rows[:, 5] = labels, 1999
        path.write_bytes(bytes([0, 0, 0x0C, 2]) + len(labels).to_bytes(4, "big")
                         + (8).to_bytes(4, "big") + rows.tobytes())
    else:
        write_idx(path, labels.astype(np.uint8))


def write(name: str, root: Path) -> None:
    """Dataset `name`'s official files under `root`, as torchvision lays them out."""
    spec = SPECS[name]
    folder = root / spec.folder
    c, side, _ = spec.shape
    n = len(spec.classes)
    for split in N:
        x, y = _images(split, c, side), _labels(split, n)
        if spec.kind in ("idx", "qmnist", "emnist"):
            folder.joinpath("raw").mkdir(parents=True, exist_ok=True)
            prefix = {"idx": "", "qmnist": "qmnist-", "emnist": f"emnist-{spec.option}-"}
            stored = x.transpose(0, 1, 3, 2) if spec.kind == "emnist" else x
            _idx_files(folder / "raw", prefix[spec.kind], "t10k" if spec.kind == "idx"
                       else "test", split, stored, y + (spec.option == "letters"),
                       "labels-idx2-int" if spec.kind == "qmnist" else "labels-idx1-ubyte")
        elif spec.kind == "cifar100":
            folder.mkdir(parents=True, exist_ok=True)
            fine = _labels(split, 100)
            batch = {b"data": x.reshape(len(x), -1), b"fine_labels": fine.tolist(),
                     b"coarse_labels": (fine % 20).tolist()}
            (folder / split).write_bytes(pickle.dumps(batch))
            (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
        elif spec.kind == "svhn":
            from scipy.io import savemat

            root.mkdir(parents=True, exist_ok=True)
            stored = y.copy()
            stored[stored == 0] = 10  # SVHN's label of the digit 0
            for file in spec.files[split]:
                savemat(root / file, {"X": x.transpose(2, 3, 1, 0), "y": stored[:, None]})
        elif spec.kind == "stl10":
            folder.mkdir(parents=True, exist_ok=True)
            images, labels = spec.files[split]
            (folder / images).write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # column-major
            (folder / labels).write_bytes((y + 1).astype(np.uint8).tobytes())
        elif spec.kind == "usps":
            root.mkdir(parents=True, exist_ok=True)
            lines = [f"{label + 1} " + " ".join(f"{i + 1}:{v / 255 * 2 - 1:.6f}"
                                               for i, v in enumerate(image.reshape(-1)))
                     for image, label in zip(x, y)]
            (root / spec.files[split][0]).write_bytes(bz2.compress("\n".join(lines).encode()))


NEW = [n for n in SPECS if n not in ("mnist", "fashion-mnist", "cifar10")]


@pytest.mark.parametrize("name", NEW)
def test_each_named_dataset_reads_its_official_files(name, tmp_path):
    spec = SPECS[name]
    write(name, tmp_path)
    data = load_dataset(name, tmp_path, download=False)
    c, side, _ = spec.shape
    for x, y, split in ((data.train_x, data.train_y, "train"), (data.test_x, data.test_y, "test")):
        extra = 2 if name == "svhn-extra" and split == "train" else 1  # train + extra
        assert x.shape == (extra * N[split], c, side, side) and x.dtype == np.uint8
        assert (x[:, :, 1, 3:] == 200).all() and (x[:, :, 1, :3] == 0).all()  # upright
        assert x[: N[split], 0, 0, 0].tolist() == list(range(N[split]))
        expected = _labels(split, 100) % 20 if name == "cifar100-coarse" else \
            _labels(split, len(spec.classes))
        assert y.tolist() == np.tile(expected, extra).tolist(), name
    assert len(data.classes) == len(spec.classes) and len(data.mean) == c


def test_the_class_lists_are_torchvisions():
    assert [len(SPECS[f"emnist-{s}"].classes) for s in
            ("balanced", "byclass", "bymerge", "letters", "digits", "mnist")] == \
        [47, 62, 47, 26, 10, 10]
    assert len(SPECS["cifar100"].classes) == 100 == len(set(SPECS["cifar100"].classes))
    assert len(SPECS["cifar100-coarse"].classes) == 20
    assert SPECS["cifar100"].classes[:3] == ("apple", "aquarium_fish", "baby")


def test_a_model_trains_on_a_named_dataset(tmp_path):
    write("usps", tmp_path)
    summary = cnnlab.train("lenet5", "usps", data_dir=str(tmp_path), epochs=1, batch_size=4,
                           telemetry=0, progress=False, out=tmp_path / "run")
    assert summary["steps"] == 3


@pytest.mark.parametrize("name,damage,message", [
    ("stl10", lambda root: (root / "stl10_binary" / "train_X.bin").write_bytes(b"\0" * 100),
     "holds 100 bytes and .* 12 labels; expected 27,648 bytes an image"),
    ("svhn", lambda root: (root / "test_32x32.mat").write_bytes(b"MATLAB? no"),
     "test_32x32.mat is not a valid SVHN file"),
    ("usps", lambda root: (root / "usps.bz2").write_bytes(b"not bzip2"),
     "usps.bz2 is not a valid USPS file"),
    ("cifar100", lambda root: (root / "cifar-100-python" / "test").write_bytes(
        b"cos\nsystem\n(S'echo pwned'\ntR."), "refusing to load os.system"),
    ("qmnist", lambda root: (root / "QMNIST" / "raw" / "qmnist-train-labels-idx2-int")
     .write_bytes(bytes([0, 0, 0x0C, 1]) + (12).to_bytes(4, "big") + b"\0" * 48),
     "expected QMNIST's \\(N, 8\\) label rows"),
    ("kmnist", lambda root: (root / "KMNIST" / "raw" / "train-images-idx3-ubyte").unlink(),
     r"kmnist not found: expected train-images-idx3-ubyte \(or .gz\), .* in "),
])
def test_a_damaged_or_missing_file_is_one_line(name, damage, message, tmp_path):
    write(name, tmp_path)
    damage(tmp_path)
    with pytest.raises(CnnlabError, match=message):
        load_dataset(name, tmp_path, download=False)


def test_a_failed_download_names_the_files_and_the_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    with pytest.raises(CnnlabError, match=r"could not download stl10 \(Name or service not "
                                          r"known\); without a network, put train_X.bin, "
                                          r"train_y.bin, test_X.bin, test_y.bin into .*"
                                          r"stl10_binary"):
        load_dataset("stl10", tmp_path)
    assert not (tmp_path / "stl10_binary").exists()


# ---- data from Python ----------------------------------------------------------------------

def _arrays(seed: int = 0):
    from conftest import synthetic_images

    train, test = synthetic_images(64, 28, 1, seed), synthetic_images(32, 28, 1, seed + 1)
    return train[0], train[1], test[0], test[1]


def test_arrays_and_tensors_from_python_train_and_resume_with_the_same_data(tmp_path, capsys):
    import json

    import torch

    from cnnlab.cli import main

    x, y, tx, ty = _arrays()
    run = tmp_path / "run"
    first = cnnlab.train("lenet5", (x, y, tx, ty), epochs=1, batch_size=16, progress=False,
                         schedule="constant", telemetry=0, out=run)
    assert first["dataset"].startswith("python:") and first["steps"] == 4
    info = json.loads((run / "data.json").read_text())
    assert info["train"] == [64, 1, 28, 28] and info["test"] == [32, 1, 28, 28]
    assert info["classes"] == [str(i) for i in range(10)]
    # the same data as float tensors in [0, 1] (ToTensor's scale), (N, H, W, C)
    as_floats = (torch.from_numpy(x).float().div(255).permute(0, 2, 3, 1), torch.from_numpy(y),
                 torch.from_numpy(tx).float().div(255).permute(0, 2, 3, 1), torch.from_numpy(ty))
    again = cnnlab.train(resume=run, dataset=as_floats, epochs=2, progress=False)
    assert again["steps"] == 8 and again["resumed_from_step"] == 4
    with pytest.raises(CnnlabError, match="DATASET python:.* differs from the run's"):
        cnnlab.train(resume=run, dataset=_arrays(5), epochs=3, progress=False)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    assert "was handed over from Python and is not on disk" in capsys.readouterr().err


def test_torch_datasets_from_python_keep_their_class_names(tmp_path):
    import torch

    x, y, tx, ty = _arrays()

    class Pairs(torch.utils.data.Dataset):
        classes = [f"class {i}" for i in range(10)]

        def __init__(self, images, labels):
            self.images, self.labels = images, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):  # as ToTensor gives them: float (C, H, W) in [0, 1]
            return torch.from_numpy(self.images[i]).float() / 255, int(self.labels[i])

    summary = cnnlab.train("lenet5", (Pairs(x, y), Pairs(tx, ty)), epochs=0.25, batch_size=16,
                           progress=False, telemetry=0, out=tmp_path / "run")
    from cnnlab.checkpoint import load

    assert load(tmp_path / "run" / "best.pt")["model_meta"]["classes"][:2] == [
        "class 0", "class 1"]
    assert summary["steps"] == 1


@pytest.mark.parametrize("data,message", [
    (5, None),
    ((np.zeros((4, 28, 28)), np.zeros(4, dtype=int)), "items must be"),
    ((np.zeros((4, 28, 28), np.uint8), np.zeros(3, dtype=int), np.zeros((2, 28, 28), np.uint8),
      np.zeros(2, dtype=int)), "4 training images but labels of shape"),
    ((np.full((4, 28, 28), 2.0), np.zeros(4, dtype=int), np.zeros((2, 28, 28)),
      np.zeros(2, dtype=int)), "run from 2 to 2; give uint8"),
    ((np.zeros((4, 5, 28, 28), np.uint8), np.zeros(4, dtype=int),
      np.zeros((2, 5, 28, 28), np.uint8), np.zeros(2, dtype=int)), "with 1 or 3 channels"),
    ((np.zeros((4, 28, 28), np.uint8), np.full(4, -1), np.zeros((2, 28, 28), np.uint8),
      np.zeros(2, dtype=int)), "labels must be integers from 0"),
    ((np.zeros((4, 28, 28), np.uint8), np.zeros(4, dtype=int), np.zeros((2, 32, 32), np.uint8),
      np.zeros(2, dtype=int)), "training images are 1x28x28 and the test images 1x32x32"),
])
def test_data_from_python_that_does_not_fit_is_one_line(data, message):
    with pytest.raises(CnnlabError, match=message or "dataset: give"):
        cnnlab.train("lenet5", data, progress=False)


# ---- larger than memory ----------------------------------------------------------------------

def test_a_folder_streamed_into_the_cache_is_the_data_decoded_in_memory(tmp_path, monkeypatch,
                                                                      capsys):
    from conftest import write_folder

    import cnnlab.data as data

    root = write_folder(tmp_path / "pets", n_train=20, n_test=6, size=16)
    held = load_dataset(f"folder:{root}", tmp_path, in_memory="yes")
    for folder in (root / ".cnnlab-cache",):  # decoded again, the other way
        for f in folder.iterdir():
            f.unlink()
    monkeypatch.setattr(data, "memory_available", lambda: (1000, "this process's cgroup "
                                                                 "memory limit"))
    streamed = load_dataset(f"folder:{root}", tmp_path)
    assert "decoding it into the disk cache a block at a time" in capsys.readouterr().err
    assert streamed.streamed and not held.streamed
    assert isinstance(streamed.train_x, DiskArray)
    for name in ("train_x", "train_y", "test_x", "test_y", "mean", "std", "digest"):
        assert np.array_equal(getattr(held, name), getattr(streamed, name)), name
    with pytest.raises(CnnlabError, match="--in-memory auto to train from the disk cache"):
        load_dataset(f"folder:{root}", tmp_path, in_memory="yes", image_size=(20, 20))


def test_training_from_the_disk_cache_is_bitwise_the_same_and_resumes(tmp_path):
    import torch
    from conftest import write_folder

    from cnnlab.checkpoint import load

    root = write_folder(tmp_path / "pets", n_train=20, n_test=6, size=16)
    runs = {}
    for how, epochs in (("yes", 2), ("no", 1)):
        runs[how] = tmp_path / how
        cnnlab.train("lenet5", f"folder:{root}", epochs=epochs, batch_size=8,
                     schedule="constant", in_memory=how, telemetry=0, progress=False,
                     out=runs[how])
    cnnlab.train(resume=runs["no"], epochs=2, progress=False)  # read ahead, and resumed
    weights = [load(runs[how] / "checkpoint.pt")["model"] for how in ("yes", "no")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_streamed_split_leaves_out_bad_files_and_needs_disk(tmp_path, monkeypatch):
    from conftest import write_folder

    import cnnlab.data.cache as cache

    root = write_folder(tmp_path / "pets", n_train=5, n_test=2, size=16)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    found = load_dataset(f"folder:{root}", tmp_path, in_memory="no", skip_bad_files=True)
    assert found.train_x.shape == (15, 3, 16, 16) and len(found.train_y) == 15
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil_usage(10 << 20))
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "user-cache"))
    with pytest.raises(CnnlabError, match=r"the decoded images need .* of disk, and no cache "
                                          r"folder has room \(.* has 10.0 MiB free"):
        load_dataset(f"folder:{root}", tmp_path, in_memory="no", image_size=(24, 24))


def shutil_usage(free: int):
    from collections import namedtuple

    return namedtuple("usage", "total used free")(free * 2, free, free)


# A folder that decodes to three times the address space the limit leaves (ulimit -v): it
# goes to the disk cache a block at a time, then one epoch reads it back a few batches
# ahead - never mapped whole, which the limit would refuse.
_LIMITED = """
import resource, sys
import psutil, torch
import cnnlab.data.readers as readers
from cnnlab.data import load_dataset
from cnnlab.data.loader import DeviceLoader
readers._BLOCK_BYTES = 8 << 20  # the decoding's block, scaled down as the limit is
room = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + room,
                                        resource.RLIM_INFINITY))
data = load_dataset("folder:" + sys.argv[1], sys.argv[1], progress=False)
assert data.streamed and data.train_x.nbytes > 3 * room, data.train_x.nbytes
loader = DeviceLoader(data.train_x, torch.from_numpy(data.train_y), batch_size=8, mean=data.mean,
                      std=data.std, device=torch.device("cpu"), shuffle=True, on_disk=True,
                      generator=torch.Generator().manual_seed(0), augment=frozenset({"flip"}))
print(sum(len(y) for _, y in loader), data.train_x.shape[0])
"""


def test_a_folder_three_times_the_address_space_left_trains_from_disk(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    for k in range(2):  # 1,600 photos of 320x320, 469 MiB decoded: links to one per class
        folder = tmp_path / "big" / "train" / f"c{k}"
        folder.mkdir(parents=True)
        Image.new("RGB", (320, 320), (9, 80 * k, 7)).save(folder / "0.png")
        for i in range(1, 800):
            os.link(folder / "0.png", folder / f"{i}.png")
        (tmp_path / "big" / "test" / f"c{k}").mkdir(parents=True)
        Image.new("RGB", (320, 320)).save(tmp_path / "big" / "test" / f"c{k}" / "0.png")
    done = subprocess.run([sys.executable, "-c", _LIMITED, str(tmp_path / "big"), "150"],
                          capture_output=True, text=True, timeout=300,
                          # glibc gives each thread a heap that reserves 64 MiB of address
                          # space: how a process under `ulimit -v` keeps its threads' share
                          env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1600", "1600"]
    assert "more than its address-space limit (ulimit -v) leaves" in done.stderr


def test_a_disk_array_is_the_npy_file_numpy_reads(tmp_path):
    from cnnlab.data.disk import write_header

    x = np.arange(5 * 2 * 3 * 4, dtype=np.uint8).reshape(5, 2, 3, 4)
    path = tmp_path / "x.npy"
    with open(path, "wb") as f:  # written for 9 rows, 5 kept: the header rewritten in place
        start = write_header(f, (9, 2, 3, 4))
        f.seek(start)
        f.write(x.tobytes())
        assert write_header(f, (5, 2, 3, 4), start) == start
    on_disk = DiskArray(path)
    assert np.array_equal(np.load(path), x) and np.array_equal(np.asarray(on_disk), x)
    assert np.array_equal(on_disk[1:3], x[1:3]) and np.array_equal(on_disk[[4, 0, 4]], x[[4, 0, 4]])
    assert b"".join(c.tobytes() for c in on_disk.byte_chunks(7)) == x.tobytes()
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"is \d+ bytes, not the \d+ its header's shape"):
        DiskArray(path)
