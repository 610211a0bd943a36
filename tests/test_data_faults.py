"""Hostile data: a tampered cache, names that are not text, links that lead nowhere, images
Pillow refuses, one-class and empty datasets, damaged official files. Each must give one
line naming what is wrong (or, with --skip-bad-files, a report of what was left out), never
a traceback; driven through load_dataset, predict and the real command."""

import gzip
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar, write_folder, write_idx, write_mnist

import cnnlab
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.predict import collect_images, predict

CLASSES = ("cat", "dog")


def _folder(tmp_path: Path, name: str = "pets", classes=CLASSES) -> Path:
    return write_folder(tmp_path / name, classes=classes, n_train=3, n_test=2)


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels: Pillow refuses it on opening."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _one_line_error(match: str, *args, **kwargs) -> None:
    """load_dataset(*args) must raise CnnlabError matching `match`, on one printable line."""
    with pytest.raises(CnnlabError, match=match) as info:
        load_dataset(*args, **kwargs)
    assert str(info.value).isprintable(), str(info.value)


def _entry(root: Path, split: str = "train") -> dict[str, Path]:
    """The cache entry of `split`: its .x.npy, .y.npy and .json files."""
    manifests = list((root / ".cnnlab-cache").glob(f"*-{split}-*.json"))
    assert len(manifests) == 1, manifests
    stem = str(manifests[0])[:-len(".json")]
    return {"x": Path(f"{stem}.x.npy"), "y": Path(f"{stem}.y.npy"), "json": manifests[0]}


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("cnnlab: note:")]


# ---------------------------------------------------------------- the decoded cache

def _random_bytes(p: dict) -> None:  # same size, the .npy header kept: np.load succeeds
    data = p["x"].read_bytes()
    p["x"].write_bytes(data[:128] + np.random.default_rng(0).bytes(len(data) - 128))


def _random_file(p: dict) -> None:
    p["x"].write_bytes(np.random.default_rng(0).bytes(p["x"].stat().st_size))


def _labels_cut_short(p: dict) -> None:
    np.save(p["y"], np.load(p["y"])[:-1])


def _labels_changed(p: dict) -> None:
    y = np.load(p["y"])
    np.save(p["y"], (y + 1) % 10)


def _labels_as_int32(p: dict) -> None:
    np.save(p["y"], np.load(p["y"]).astype(np.int32))


def _images_as_float(p: dict) -> None:
    np.save(p["x"], np.load(p["x"]).astype(np.float32))


def _images_reshaped(p: dict) -> None:
    x = np.load(p["x"])
    np.save(p["x"], x.reshape(len(x), 1, 14, 56))


def _labels_out_of_range_with_a_forged_digest(p: dict) -> None:
    from cnnlab.data.cache import content_digest

    x, y = np.load(p["x"]), np.load(p["y"]) + 10
    np.save(p["y"], y)
    p["json"].write_text(json.dumps({"digest": content_digest(x, y)}))


def _manifest_damaged(p: dict) -> None:
    p["json"].write_text("{not json")


def _manifest_missing(p: dict) -> None:
    p["json"].unlink()


def _stats_missing(p: dict) -> None:  # the right digest, no channel statistics
    manifest = json.loads(p["json"].read_text())
    p["json"].write_text(json.dumps({"digest": manifest["digest"], "mean": [0.5]}))


def _array_missing(p: dict) -> None:
    p["y"].unlink()


def _huge_shape_claimed(p: dict) -> None:  # a header that would allocate 1 TB if believed
    import numpy.lib.format as npy

    with p["x"].open("wb") as f:
        npy.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                       "shape": (10 ** 9, 1, 28, 28)})
        f.write(b"\0" * 100)


@pytest.mark.parametrize("tamper,note", [
    (_random_bytes, "does not match the content digest"),
    (_random_file, "cannot be read"),
    (_labels_cut_short, r"labels int64 \(39,\)"),
    (_labels_changed, "does not match the content digest"),
    (_labels_as_int32, "labels int32"),
    (_images_as_float, "images float32"),
    (_images_reshaped, "does not match the content digest"),
    (_labels_out_of_range_with_a_forged_digest, r"labels outside 0\.\.9"),
    (_manifest_damaged, "cannot be read"),
    (_manifest_missing, "is incomplete"),
    (_stats_missing, "has no channel statistics"),
    (_array_missing, "is incomplete"),
    (_huge_shape_claimed, "cannot be read"),
])
def test_a_changed_cache_is_noticed_and_rebuilt(tmp_path, capsys, tamper, note):
    root = write_mnist(tmp_path / "data", 40, 20)
    first = load_dataset("mnist", root, download=False)
    cache = root / "MNIST" / "raw"
    entry = _entry(cache)
    tamper(entry)
    capsys.readouterr()
    again = load_dataset("mnist", root, download=False)
    notes = _notes(capsys)
    assert len(notes) == 1 and "decoding the data again" in notes[0], notes
    assert "mnist-train-" in notes[0]
    assert re.search(note, notes[0]), notes[0]
    for name in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.digest == first.digest
    load_dataset("mnist", root, download=False)  # rebuilt: no note the third time
    assert _notes(capsys) == []


def test_cache_files_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        root = _folder(tmp_path)
        load_dataset(f"folder:{root}", "")
    finally:
        os.umask(old)
    files = list((root / ".cnnlab-cache").iterdir())
    assert len(files) == 8  # x, y, json and the reference to them, for train and test
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)


def test_dataset_digest_follows_the_content(tmp_path):
    root = _folder(tmp_path)
    first = load_dataset(f"folder:{root}", "")
    assert re.fullmatch("[0-9a-f]{16}", first.digest)
    assert load_dataset(f"folder:{root}", "").digest == first.digest  # from the cache
    shutil.rmtree(root / ".cnnlab-cache")
    assert load_dataset(f"folder:{root}", "").digest == first.digest  # decoded again
    copy = shutil.copytree(root, tmp_path / "elsewhere")  # the place does not count
    assert load_dataset(f"folder:{copy}", "").digest == first.digest

    digests = {first.digest}
    (root / "test" / "dog" / "1.png").unlink()  # an image removed (test split)
    digests.add(load_dataset(f"folder:{root}", "").digest)
    (root / "train" / "dog").rename(root / "train" / "wolf")  # a class renamed
    (root / "test" / "dog").rename(root / "test" / "wolf")
    digests.add(load_dataset(f"folder:{root}", "").digest)
    shutil.copytree(root / "train" / "cat", root / "train" / "emu")  # a class added
    digests.add(load_dataset(f"folder:{root}", "").digest)
    assert len(digests) == 4
    mnist = write_mnist(tmp_path / "mnist", 40, 20)
    assert load_dataset("mnist", mnist, download=False).digest not in digests


# ---------------------------------------------------------------- names and links

def test_file_names_that_are_not_utf8_text(tmp_path, capsys):
    root = _folder(tmp_path)
    cat = os.fsencode(root / "train" / "cat")
    os.rename(cat + b"/0.png", cat + b"/\xff\xfe.png")  # a good image: it just loads
    assert load_dataset(f"folder:{root}", "").train_x.shape[0] == 6
    Path(os.fsdecode(cat + b"/bad\xff\n\x1b[31m.png")).write_bytes(b"no image")
    _one_line_error(r"cannot read image '.*/bad\\xff\\n\\x1b\[31m\.png': not an image "
                    "format Pillow reads; fix or remove it, or pass --skip-bad-files",
                    f"folder:{root}", "")
    ds = load_dataset(f"folder:{root}", "", skip_bad_files=True)
    err = capsys.readouterr().err.splitlines()
    assert ds.train_x.shape[0] == 6 and len(err) == 1
    assert err[0].startswith("cnnlab: skipping: cannot read image '") and "\\xff" in err[0]


@pytest.mark.parametrize("raw,shown", [
    (b"data/cat/0.png", "data/cat/0.png"),
    ("data/k\u00f6nig/\u732b.png".encode(), "data/k\u00f6nig/\u732b.png"),  # UTF-8 text: as is
    (b"data/\xff\xfe.png", "'data/\\xff\\xfe.png'"),
    (b"two\nlines\t\x1b[2J.png", "'two\\nlines\\t\\x1b[2J.png'"),
])
def test_paths_are_shown_printable_on_one_line(raw, shown):
    from cnnlab.data.readers import show_path

    assert show_path(Path(os.fsdecode(raw))) == shown and shown.isprintable()


def test_class_names_that_are_not_printable_text(tmp_path):
    root = _folder(tmp_path)
    for split in ("train", "test"):
        os.rename(os.fsencode(root / split / "cat"), os.fsencode(root / split) + b"/c\xffat")
    _one_line_error(r"class folder '.*/train/c\\xffat': its name is not printable UTF-8 text"
                    ".*rename it", f"folder:{root}", "")


@pytest.mark.parametrize("make,why", [
    (lambda p: p.symlink_to(p.name), "Too many levels of symbolic links"),
    (lambda p: p.symlink_to("nowhere.png"), "it is a link to nothing"),
    (lambda p: p.mkdir(), "it is a folder"),
    (lambda p: os.mkfifo(p), "it is not a regular file"),  # opening it would block for ever
    (lambda p: p.symlink_to("/dev/zero"), "it is not a regular file"),
])
def test_links_folders_and_fifos_are_bad_files(tmp_path, capsys, make, why):
    root = _folder(tmp_path)
    make(root / "train" / "dog" / "odd.png")
    _one_line_error(f"cannot read image .*odd.png: {why}; fix or remove it, or pass "
                    "--skip-bad-files", f"folder:{root}", "")
    ds = load_dataset(f"folder:{root}", "", skip_bad_files=True)
    assert ds.train_x.shape[0] == 6
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cnnlab: skipping: cannot read image ")


def test_a_class_folder_link_to_nothing_is_an_error(tmp_path):
    root = _folder(tmp_path)
    (root / "train" / "emu").symlink_to("nowhere")
    _one_line_error("class folder .*emu cannot be opened .*link to nothing.*fix or remove",
                    f"folder:{root}", "")
    (root / "train" / "emu").unlink()
    (root / "test" / "emu").symlink_to("emu")
    _one_line_error("class folder .*test/emu cannot be opened .*symbolic links",
                    f"folder:{root}", "")


# ---------------------------------------------------------------- images Pillow refuses

def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, capsys):
    root = _folder(tmp_path)
    (root / "train" / "cat" / "bomb.png").write_bytes(_bomb_png())
    _one_line_error("cannot read image .*bomb.png: Image size .* exceeds limit.*"
                    "--skip-bad-files", f"folder:{root}", "")
    assert load_dataset(f"folder:{root}", "", skip_bad_files=True).train_x.shape[0] == 6
    assert "bomb.png" in capsys.readouterr().err


def test_pillows_pixel_limit_counts_as_set(tmp_path, monkeypatch):
    from PIL import Image

    root = _folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 16x16 = 256 > 2 x 40: all refused
    _one_line_error("cannot read image .*png: Image size \\(256 pixels\\) exceeds limit",
                    f"folder:{root}", "")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A LeNet-5 trained for one epoch on a tiny folder dataset."""
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "run"
    cnnlab.train("lenet5", f"folder:{_folder(tmp)}", out=out, epochs=1, batch_size=6,
                 telemetry=0, progress=False)
    return out


def test_predict_reports_links_fifos_and_bombs_and_predicts_the_rest(run, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(_folder(tmp_path) / "test" / "cat", images)  # 0.png, 1.png
    os.rename(os.fsencode(images / "1.png"), os.fsencode(images) + b"/\xff.png")
    (images / "loop.png").symlink_to("loop.png")
    (images / "gone.png").symlink_to("gone-for-good.png")
    os.mkfifo(images / "fifo.png")
    (images / "deep").mkdir()
    (images / "deep" / "bomb.png").write_bytes(_bomb_png())
    (images / ".hidden.png").symlink_to(".hidden.png")  # hidden: not looked at
    results = predict(run, [images])
    by_name = {os.fsencode(r["path"]).rsplit(b"/", 1)[1]: r for r in results}
    assert sorted(by_name) == sorted([b"0.png", b"\xff.png", b"loop.png", b"gone.png",
                                      b"fifo.png", b"bomb.png"])
    assert "top" in by_name[b"0.png"] and "top" in by_name[b"\xff.png"]
    for name, why in [(b"loop.png", "Too many levels of symbolic links"),
                      (b"gone.png", "it is a link to nothing"),
                      (b"fifo.png", "it is not a regular file"),
                      (b"bomb.png", "Image size .* exceeds limit")]:
        error = by_name[name]["error"]
        assert error.startswith("cannot read image ") and error.isprintable(), error
        assert re.search(why, error), error
    # named on the command line, the same
    named = predict(run, [images / "loop.png", images / "fifo.png", images / "missing.png"])
    assert [r["error"].split(": ", 1)[1] for r in named] == [
        "Too many levels of symbolic links", "it is not a regular file",
        f"{images / 'missing.png'}"]


# ---------------------------------------------------------------- too few classes

def test_a_one_class_dataset_is_refused(tmp_path):
    root = _folder(tmp_path, classes=("cat",))
    _one_line_error(r"train has only one class folder \(cat\); a classification dataset "
                    "needs at least two classes", f"folder:{root}", "")


def test_a_class_left_without_images_by_skipping_is_refused(tmp_path):
    root = _folder(tmp_path)
    for image in (root / "train" / "dog").iterdir():
        image.write_bytes(b"broken")
    _one_line_error("class folder .*train/dog has no readable images left",
                    f"folder:{root}", "", skip_bad_files=True)


# ---------------------------------------------------------------- more of the same kinds

def test_folder_layout_faults(tmp_path):
    root = _folder(tmp_path)
    for image in (root / "test" / "cat").iterdir():
        image.write_bytes(b"broken")
    for image in (root / "test" / "dog").iterdir():
        image.write_bytes(b"broken")
    _one_line_error("no readable images among the 4 files in .*test",
                    f"folder:{root}", "", skip_bad_files=True)
    shutil.rmtree(root / "test")
    (root / "test").mkdir()
    _one_line_error("test has no images; put each class's images in", f"folder:{root}", "")
    (tmp_path / "file").write_text("x")
    _one_line_error("dataset folder .*file is not a folder", f"folder:{tmp_path / 'file'}", "")


def test_unreadable_files_and_folders(tmp_path):
    probe = tmp_path / "probe"
    probe.touch(mode=0)
    if os.access(probe, os.R_OK):
        pytest.skip("permissions are not enforced here (root reads any file)")
    root = _folder(tmp_path)
    (root / "train" / "cat" / "0.png").chmod(0)
    _one_line_error("cannot read image .*0.png: Permission denied", f"folder:{root}", "")
    (root / "train" / "cat" / "0.png").chmod(0o644)
    (root / "train" / "dog").chmod(0)
    try:
        _one_line_error("cannot list folder .*dog: Permission denied", f"folder:{root}", "")
        assert collect_images([root / "train"])[-1] == (
            str(root / "train" / "dog"), f"cannot list folder {root / 'train' / 'dog'}: "
                                         "Permission denied")
    finally:
        (root / "train" / "dog").chmod(0o755)


def _idx_header(dims) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: (raw / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_header([40, 28, 28]) + bytes(40 * 28 * 28 + 4096))),
     "longer than its header says"),  # inflating stops where the header says
    (lambda raw: (raw / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_header([2 ** 32 - 1] * 3))), "more than 16 GiB"),
    (lambda raw: (raw / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_header([40, 28, 28]) + bytes(100))[:-12]), "cannot read .*gz"),
    (lambda raw: write_idx(raw / "train-images-idx3-ubyte", np.zeros((40, 0, 0), np.uint8),
                           gz=True), r"images \(40, 0, 0\)"),
    (lambda raw: write_idx(raw / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8),
                           gz=True), r"images \(0, 28, 28\)"),
    (lambda raw: write_idx(raw / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8),
                           gz=True), r"labels outside 0\.\.9 \(found 10\.\.10\)"),
    (lambda raw: (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really"),
     "cannot read"),
])
def test_damaged_idx_files(tmp_path, damage, message):
    root = write_mnist(tmp_path, 40, 20, gz=True)
    damage(root / "MNIST" / "raw")
    _one_line_error(f"{message}.*download again", "mnist", root, download=False)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte.gz"])
@pytest.mark.parametrize("make,why", [(lambda p: p.symlink_to("nowhere"), "link to nothing"),
                                      (lambda p: p.symlink_to(p.name), "symbolic links"),
                                      (lambda p: p.mkdir(), "it is a folder")])
def test_official_files_that_are_links_to_nothing_or_folders(tmp_path, name, make, why):
    root = write_mnist(tmp_path, 40, 20, gz=name.endswith(".gz"))
    path = root / "MNIST" / "raw" / name
    path.unlink()
    make(path)
    _one_line_error(f"{name} cannot be read .*{why}.*remove it", "mnist", root)


@pytest.mark.parametrize("batch,message", [
    ({b"data": np.zeros((2, 3072)) + 0.5, b"labels": [0, 1]}, "data float64"),
    ({b"data": [[300] * 3072] * 2, b"labels": [0, 1]}, "data int64"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [2 ** 70, 1]}, "labels object"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.5]}, "labels float64"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1]]}, r"\(2, 1\)"),
    ({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, r"\(0, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"outside 0\.\.9"),
    ([1, 2], "not a valid CIFAR batch"),
])
def test_damaged_cifar_batches(tmp_path, batch, message):
    root = write_cifar(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch))
    _one_line_error(f"test_batch .*{message}.*download again", "cifar10", root, download=False)


# ---------------------------------------------------------------- the command

def _train(dataset: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", "train", "lenet5",
                           f"folder:{os.fsdecode(dataset)}", "--epochs", "1", "--telemetry",
                           "0", "--out", str(out), *extra],
                          capture_output=True, text=True, errors="backslashreplace",
                          timeout=120)


def _loop(root: Path) -> None:
    (root / "train" / "cat" / "loop.png").symlink_to("loop.png")


def _bomb(root: Path) -> None:
    (root / "test" / "dog" / "bomb.png").write_bytes(_bomb_png())


def _not_utf8_class(root: Path) -> None:
    os.rename(os.fsencode(root / "train" / "dog"), os.fsencode(root / "train") + b"/d\xffog")


def _one_class(root: Path) -> None:
    shutil.rmtree(root / "train" / "dog")
    shutil.rmtree(root / "test" / "dog")


@pytest.mark.parametrize("fault,message", [
    (_loop, "cannot read image .*loop.png: Too many levels of symbolic links"),
    (_bomb, "cannot read image .*bomb.png: Image size"),
    (_not_utf8_class, r"class folder '.*d\\xffog': its name is not printable"),
    (_one_class, "needs at least two classes"),
])
def test_the_command_says_one_line_and_exits_2(tmp_path, fault, message):
    root = _folder(tmp_path)
    fault(root)
    res = _train(root, tmp_path / "run")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: "), lines
    assert re.search(message, lines[0]), lines[0]


def test_the_command_skips_bad_files_and_rebuilds_a_tampered_cache(tmp_path):
    root = _folder(tmp_path)
    _loop(root)
    _bomb(root)
    (root / "train" / "cat" / "gone.png").symlink_to("gone-for-good.png")
    load_dataset(f"folder:{root}", "", skip_bad_files=True)
    for split in ("train", "test"):  # labels another class count could have
        y = _entry(root, split)["y"]
        np.save(y, np.load(y) + 7)
    res = _train(root, tmp_path / "run", "--skip-bad-files")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    notes = [line for line in lines if line.startswith("cnnlab: note:")
             and "short for its data" not in line]  # a 6-image folder: a short run
    assert len(notes) == 2 and all("labels outside 0..1" in line for line in notes), lines
    skipped = [line for line in lines if line.startswith("cnnlab: skipping: cannot read image")]
    assert len(skipped) == 3, lines  # reported again: the entries were decoded again


def test_a_folder_too_large_for_memory_is_refused_with_in_memory_yes(tmp_path, monkeypatch):
    import cnnlab.data as data

    root = write_folder(tmp_path / "pets", n_train=4, n_test=2, size=64)
    monkeypatch.setattr(data, "memory_available",
                        lambda: (1 << 20, "this process's cgroup memory limit"))
    with pytest.raises(CnnlabError) as refused:
        load_dataset(f"folder:{root}", tmp_path, image_size=(256, 256), in_memory="yes")
    assert str(refused.value) == (
        "pets decodes to 3.4 MiB (18 images of 256x256 pixels, 5.6 MiB while decoding), more "
        "than this process's cgroup memory limit leaves (1.0 MiB); pass a smaller "
        "--image-size, free memory, or --in-memory auto to train from the disk cache")
    load_dataset(f"folder:{root}", tmp_path, image_size=(16, 16))  # 22 kB: it fits


def test_memory_available_reads_the_address_space_limit():
    code = ("import resource, psutil; from cnnlab.limits import memory_available; "
            "vms = psutil.Process().memory_info().vms; "
            "resource.setrlimit(resource.RLIMIT_AS, (vms + (300 << 20), resource.RLIM_INFINITY)); "
            "size, why = memory_available(); print(size >> 20, why)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    mib, why = done.stdout.split(" ", 1)
    assert 250 <= int(mib) <= 300 and why == "its address-space limit (ulimit -v)\n", done
