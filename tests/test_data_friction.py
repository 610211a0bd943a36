"""Friction on the data path: a long decode that says nothing, a validation split that rounds
to no image of a class, an offline message that hides the .gz names, and a decoded cache
that a copied or moved dataset did not find."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_folder, write_mnist

import cnnlab
from cnnlab import progress
from cnnlab.data import cache, formats, hold_out, load_dataset, readers
from cnnlab.errors import CnnlabError

# ---------------------------------------------------------------- progress while decoding


def _lines(capsys, what: str) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith(f"cnnlab: {what}:")]


def _counts(lines: list[str]) -> list[int]:
    return [int(m[1]) for line in lines if (m := re.search(r": (\d+) of 18 images", line))]


@pytest.mark.parametrize("how", ["here", "workers", "probed first"])
def test_decoding_a_folder_shows_progress_a_chunk_at_a_time(tmp_path, monkeypatch, capsys,
                                                            how):
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0)
    monkeypatch.setattr(readers, "_CHUNK_FILES", 4)
    if how == "workers":
        monkeypatch.setattr(readers, "_SMALL", 0)
        monkeypatch.setattr(readers, "_cores", lambda: 2)
    if how == "probed first":  # large images: headers read first, decoded in a second pass
        monkeypatch.setattr(readers, "_FIRST_PASS_PIXELS", 1)
    root = write_folder(tmp_path / "pets")  # 18 train and 9 test images
    load_dataset(f"folder:{root}", "")
    lines = _lines(capsys, "decoding pets/train")
    counts = _counts(lines)
    assert counts == sorted(counts) and counts[-1] == 18 and len(counts) >= 4, lines
    assert all(re.fullmatch(r"cnnlab: decoding pets/train: \d+ of 18 images \(\d+%\), \d+ s",
                            line) for line in lines[:-1]), lines
    assert re.fullmatch(r"cnnlab: decoding pets/train: done, 18 images in \d+ s", lines[-1])


def test_a_short_decode_and_a_quiet_one_print_nothing(tmp_path, monkeypatch, capsys):
    load_dataset(f"folder:{write_folder(tmp_path / 'a')}", "")  # well under QUIET_SECONDS
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0)
    load_dataset(f"folder:{write_folder(tmp_path / 'b')}", "", progress=False)
    assert capsys.readouterr().err == ""


def test_the_decode_phase_names_the_folder_however_it_is_spelled(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0)
    write_folder(tmp_path / "pets")
    monkeypatch.chdir(tmp_path / "pets")
    load_dataset("folder:.", "")
    assert _lines(capsys, "decoding pets/test")[-1].startswith("cnnlab: decoding pets/test: "
                                                               "done, 9 images")


# ---------------------------------------------------------------- --val-split


def test_a_val_split_that_rounds_to_no_image_of_a_class_is_refused(tmp_path):
    root = write_folder(tmp_path / "pets", n_train=1, n_test=1)  # one image a class
    data = load_dataset(f"folder:{root}", "")
    with pytest.raises(CnnlabError, match=r"^--val-split 0.5 leaves class 'cat' \(1 training "
                                          r"image\) with no validation images; a class needs "
                                          r"2 training images or more for a validation split: "
                                          r"add images to it, or drop --val-split$"):
        hold_out(data, 0.5, seed=0)
    with pytest.raises(CnnlabError, match="leaves class 'cat' .* with no training images"):
        hold_out(data, 0.9, seed=0)
    with pytest.raises(CnnlabError, match="no validation images"):  # before training starts
        cnnlab.train("lenet5", f"folder:{root}", val_split=0.5, out=tmp_path / "run",
                     progress=False, telemetry=0)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_the_refusal_says_which_fractions_work(tmp_path):
    root = write_folder(tmp_path / "pets", n_train=3)  # 3 images a class
    data = load_dataset(f"folder:{root}", "")
    for fraction, missing in ((0.1, "validation"), (0.9, "training")):
        with pytest.raises(CnnlabError, match=rf"leaves class 'cat' \(3 training images\) "
                                              rf"with no {missing} images; choose a "
                                              r"--val-split from 0.34 to 0.66, or drop it$"):
            hold_out(data, fraction, seed=0)
    for fraction, val in ((0.34, 1), (0.5, 2), (0.66, 2)):  # the range it names
        split = hold_out(data, fraction, seed=0)
        assert np.bincount(split.val_y).tolist() == [val] * 3
        assert np.bincount(split.train_y).tolist() == [3 - val] * 3


def test_the_command_refuses_it_with_one_line_and_exit_2(tmp_path):
    root = write_folder(tmp_path / "pets", n_train=1, n_test=1)
    res = subprocess.run([sys.executable, "-m", "cnnlab", "train", "lenet5", f"folder:{root}",
                          "--val-split", "0.5", "--epochs", "1", "--telemetry", "0",
                          "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: --val-split 0.5 leaves "
                                                   "class 'cat' (1 training image)"), lines


# ---------------------------------------------------------------- MNIST offline

MNIST_FILES = (r"train-images-idx3-ubyte \(or \.gz\), train-labels-idx1-ubyte \(or \.gz\), "
               r"t10k-images-idx3-ubyte \(or \.gz\), t10k-labels-idx1-ubyte \(or \.gz\)")


def test_the_offline_message_names_the_gz_files_too(tmp_path):
    with pytest.raises(CnnlabError, match=f"^mnist not found: expected {MNIST_FILES} in "):
        load_dataset("mnist", tmp_path, download=False)
    write_mnist(tmp_path, 40, 20, gz=True)  # and they do work
    assert len(load_dataset("mnist", tmp_path, download=False).train_x) == 40


def test_the_download_failure_message_names_the_gz_files_too(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(CnnlabError, match=rf"could not download mnist \(.*no route to host\); "
                                          rf"without a network, put {MNIST_FILES} into "):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- a copied or moved cache


def _copy(src: Path, dst: Path) -> Path:
    """A copy as `cp -r` makes it: every file and folder with a new modification time."""
    shutil.copytree(src, dst, symlinks=True)
    for path in [dst, *dst.rglob("*")]:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return dst


def _count(monkeypatch, name: str, module=readers) -> list:
    """Calls of `module`.`name` (a decoder), counted."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _no_reading(monkeypatch) -> None:
    monkeypatch.setattr(cache, "_file_digest", lambda p: pytest.fail(f"read {p} again"))


def _same(a, b) -> None:
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.digest, a.classes, a.mean, a.std) == (b.digest, b.classes, b.mean, b.std)


def test_a_copied_or_moved_folder_dataset_reuses_its_cache(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "pets")
    decodes = _count(monkeypatch, "read_folder_split")
    first = load_dataset(f"folder:{root}", "")
    assert len(decodes) == 2  # train and test
    copy = _copy(root, tmp_path / "elsewhere" / "pets-copy")
    _same(load_dataset(f"folder:{copy}", ""), first)
    moved = tmp_path / "moved"
    root.rename(moved)
    _same(load_dataset(f"folder:{moved}", ""), first)
    assert len(decodes) == 2
    _no_reading(monkeypatch)  # found at once next time: a reference beside each
    _same(load_dataset(f"folder:{copy}", ""), first)
    _same(load_dataset(f"folder:{moved}", ""), first)
    assert len(list((copy / ".cnnlab-cache").glob("*.x.npy"))) == 2  # no new entries


def test_a_copied_mnist_reuses_its_cache(tmp_path, monkeypatch):
    root = write_mnist(tmp_path / "data", 40, 20, gz=True)
    decodes = _count(monkeypatch, "read_split", formats)
    first = load_dataset("mnist", root, download=False)
    _same(load_dataset("mnist", _copy(root, tmp_path / "copy"), download=False), first)
    assert len(decodes) == 2
    _no_reading(monkeypatch)
    _same(load_dataset("mnist", tmp_path / "copy", download=False), first)


def _read_only(root: Path) -> None:
    """A data folder the cache cannot go into (a file where its folder would be stops even
    root, who may write to read-only folders)."""
    (root / ".cnnlab-cache").write_text("not a folder")
    root.chmod(0o555)


def test_a_read_only_dataset_and_its_read_only_copy_share_the_user_cache(tmp_path,
                                                                        monkeypatch):
    user = tmp_path / "user-cache"
    monkeypatch.setenv("CNNLAB_CACHE", str(user))
    root = write_folder(tmp_path / "pets")
    _read_only(root)
    decodes = _count(monkeypatch, "read_folder_split")
    try:
        first = load_dataset(f"folder:{root}", "")
        copy = _copy(root, tmp_path / "copy")  # read-only as well: the blocking file came along
        _same(load_dataset(f"folder:{copy}", ""), first)
        assert len(decodes) == 2
        assert len(list(user.glob("*.x.npy"))) == 2 and len(list(user.glob("*.ref"))) == 4
        _no_reading(monkeypatch)
        _same(load_dataset(f"folder:{copy}", ""), first)
        # a writable copy of the read-only one finds the entries in the user cache as well,
        # and keeps its reference to them beside its data
        monkeypatch.undo()
        monkeypatch.setenv("CNNLAB_CACHE", str(user))
        writable = tmp_path / "writable"
        shutil.copytree(copy, writable)
        writable.chmod(0o755)
        (writable / ".cnnlab-cache").unlink()
        monkeypatch.setattr(readers, "read_folder_split", lambda *a, **k: pytest.fail("decoded"))
        _same(load_dataset(f"folder:{writable}", ""), first)
        assert [p.suffix for p in (writable / ".cnnlab-cache").iterdir()] == [".ref"] * 2
    finally:
        for path in (root, tmp_path / "copy"):
            path.chmod(0o755)


def test_a_changed_image_is_decoded_again_even_with_its_size_and_time_kept(tmp_path,
                                                                          monkeypatch):
    root = write_folder(tmp_path / "pets", fmt="ppm")  # a byte of a PPM file is a pixel
    first = load_dataset(f"folder:{root}", "")
    copy = _copy(root, tmp_path / "copy")
    decodes = _count(monkeypatch, "read_folder_split")
    load_dataset(f"folder:{copy}", "")  # the copy's references written
    image = copy / "train" / "dog" / "2.ppm"
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # the last pixel's blue
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a tool that keeps times does
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    changed = load_dataset(f"folder:{copy}", "")
    assert len(decodes) == 1  # train only: test is as it was
    assert changed.train_x[8, 2, -1, -1] == first.train_x[8, 2, -1, -1] ^ 0xFF
    assert changed.digest != first.digest
    assert np.array_equal(load_dataset(f"folder:{root}", "").train_x, first.train_x)


def test_different_datasets_never_share_an_entry(tmp_path, monkeypatch):
    """The same image files under other class folders, or other class names, or the same
    IDX files as another dataset: other arrays or labels, so other entries."""
    root = write_folder(tmp_path / "pets")
    first = load_dataset(f"folder:{root}", "")
    swapped = _copy(root, tmp_path / "swapped")
    for split in ("train", "test"):
        (swapped / split / "cat").rename(swapped / split / "tmp")
        (swapped / split / "dog").rename(swapped / split / "cat")
        (swapped / split / "tmp").rename(swapped / split / "dog")
    renamed = _copy(root, tmp_path / "renamed")
    for split in ("train", "test"):
        (renamed / split / "fox").rename(renamed / split / "owl")
    decodes = _count(monkeypatch, "read_folder_split")
    other = load_dataset(f"folder:{swapped}", "")
    assert np.array_equal(other.train_x[:6], first.train_x[6:12])  # dog's images, as cat
    assert load_dataset(f"folder:{renamed}", "").classes == ["cat", "dog", "owl"]
    assert len(decodes) == 4
    mnist = write_mnist(tmp_path / "data", 40, 20)
    shutil.copytree(mnist / "MNIST", mnist / "FashionMNIST")  # the same bytes
    assert load_dataset("mnist", mnist, download=False).classes[0] == "0"
    assert load_dataset("fashion-mnist", mnist, download=False).classes[0] == "T-shirt/top"


def test_a_damaged_reference_costs_a_reading_not_a_decode(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "pets")
    first = load_dataset(f"folder:{root}", "")
    for ref in (root / ".cnnlab-cache").glob("*.ref"):
        ref.write_bytes(b"\xff not a key")
    monkeypatch.setattr(readers, "read_folder_split", lambda *a, **k: pytest.fail("decoded"))
    _same(load_dataset(f"folder:{root}", ""), first)
    assert capsys.readouterr().err == ""
    _no_reading(monkeypatch)  # the references were written again
    _same(load_dataset(f"folder:{root}", ""), first)


def test_a_damaged_entry_found_by_content_is_decoded_again_with_a_note(tmp_path, capsys):
    root = write_folder(tmp_path / "pets")
    first = load_dataset(f"folder:{root}", "")
    copy = _copy(root, tmp_path / "copy")
    (entry,) = (copy / ".cnnlab-cache").glob("folder-train-*.x.npy")
    entry.write_bytes(entry.read_bytes()[:-1] + b"\x00")
    capsys.readouterr()
    _same(load_dataset(f"folder:{copy}", ""), first)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and re.fullmatch(r"cnnlab: note: cached data .*copy/\.cnnlab-cache/"
                                            r"folder-train-[0-9a-f]{32} does not match the "
                                            r"content digest it was stored with; decoding "
                                            r"the data again", notes[0]), notes


def test_real_mnist_copied_elsewhere_is_not_decoded_again(real_data, tmp_path, monkeypatch):
    raw = real_data / "MNIST" / "raw"
    for name in ("a", "b"):
        (tmp_path / name / "MNIST" / "raw").mkdir(parents=True)
        for f in raw.glob("*-ubyte*"):
            shutil.copy(f, tmp_path / name / "MNIST" / "raw")  # new files, new times
    first = load_dataset("mnist", tmp_path / "a", download=False)
    shutil.copytree(tmp_path / "a" / "MNIST" / "raw" / ".cnnlab-cache",
                    tmp_path / "b" / "MNIST" / "raw" / ".cnnlab-cache")
    monkeypatch.setattr(formats, "read_split", lambda *a: pytest.fail("decoded again"))
    again = load_dataset("mnist", tmp_path / "b", download=False)
    assert again.train_x.shape == (60000, 1, 28, 28)
    _same(again, first)
