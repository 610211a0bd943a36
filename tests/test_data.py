import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_images, write_cifar, write_folder, write_idx, write_mnist

from cnnlab.data import load_dataset
from cnnlab.data.cache import channel_stats
from cnnlab.data.readers import read_cifar_batch, read_idx
from cnnlab.errors import CnnlabError


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    x, _ = synthetic_images(5, 28, 1, 0)
    path = write_idx(tmp_path / "imgs", x[:, 0], gz=gz)
    np.testing.assert_array_equal(read_idx(path), x[:, 0])


def test_idx_truncated_and_bad_magic(tmp_path):
    x, _ = synthetic_images(5, 28, 1, 0)
    path = write_idx(tmp_path / "imgs", x[:, 0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CnnlabError, match="truncated.*download again"):
        read_idx(path)
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 10)
    with pytest.raises(CnnlabError, match="bad magic"):
        read_idx(path)
    gzpath = tmp_path / "bad.gz"
    gzpath.write_bytes(b"not gzip at all")
    with pytest.raises(CnnlabError, match="cannot read"):
        read_idx(gzpath)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_layout_loads(tmp_path, gz):
    root = write_mnist(tmp_path, 40, 20, gz=gz)
    ds = load_dataset("mnist", root, download=False)
    assert ds.train_x.shape == (40, 1, 28, 28) and ds.train_x.dtype == np.uint8
    assert ds.test_y.shape == (20,) and ds.test_y.dtype == np.int64
    assert ds.classes == [str(i) for i in range(10)] and ds.mean == (0.1307,)
    fashion = load_dataset("fashion-mnist", write_mnist(tmp_path, 40, 20, folder="FashionMNIST"),
                           download=False)
    assert fashion.classes[0] == "T-shirt/top"


def test_mnist_count_mismatch_and_bad_labels(tmp_path):
    root = write_mnist(tmp_path, 40, 20)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(CnnlabError, match="do not match"):
        load_dataset("mnist", root, download=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(20, 12, np.uint8))
    with pytest.raises(CnnlabError, match=r"labels outside 0\.\.9"):
        load_dataset("mnist", root, download=False)


def test_missing_data_without_download(tmp_path):
    with pytest.raises(CnnlabError, match="mnist not found.*train-images-idx3-ubyte.*"
                                          "--no-download"):
        load_dataset("mnist", tmp_path, download=False)
    with pytest.raises(CnnlabError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


def test_cifar_batches(tmp_path):
    root = write_cifar(tmp_path)
    ds = load_dataset("cifar10", root, download=False)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (50, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.channels == 3
    x, y = synthetic_images(20, 32, 3, 1)  # batch 1 as written by write_cifar
    np.testing.assert_array_equal(ds.train_x[:20], x)
    np.testing.assert_array_equal(ds.train_y[:20], y)


def test_cifar_corrupt_truncated_and_malicious(tmp_path):
    root = write_cifar(tmp_path)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(CnnlabError, match="data_batch_2 is not a valid CIFAR batch"):
        read_cifar_batch(batch, 10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    batch.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(CnnlabError, match="refusing to load"):
        read_cifar_batch(batch, 10)
    assert not (tmp_path / "pwned").exists()
    batch.write_bytes(pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0] * 3}))
    with pytest.raises(CnnlabError, match="expected.*3072"):
        read_cifar_batch(batch, 10)


@pytest.mark.parametrize("mode,fmt", [("RGB", "png"), ("L", "png"), ("RGB", "jpg")])
def test_image_folder(tmp_path, mode, fmt):
    root = write_folder(tmp_path / "pets", mode=mode, fmt=fmt)
    ds = load_dataset(f"folder:{root}", "unused")
    channels = 1 if mode == "L" else 3
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.train_x.shape == (18, channels, 16, 16) and ds.test_x.shape == (9, channels, 16, 16)
    assert list(ds.train_y) == [0] * 6 + [1] * 6 + [2] * 6
    assert (ds.mean, ds.std) == channel_stats(ds.train_x) and len(ds.mean) == channels
    assert 0 < ds.mean[0] < 1 and 0 < ds.std[0] < 1
    cached = load_dataset(f"folder:{root}", "unused")  # the statistics stored with the cache
    assert (cached.mean, cached.std) == (ds.mean, ds.std)


def test_image_folder_errors(tmp_path):
    with pytest.raises(CnnlabError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}", "")
    root = write_folder(tmp_path / "pets")
    (root / "train" / "emu").mkdir()
    with pytest.raises(CnnlabError, match="class folder .*emu has no images"):
        load_dataset(f"folder:{root}", "")
    (root / "train" / "emu").rmdir()
    (root / "train" / "cat" / "5.png").write_bytes(b"this is no png")
    with pytest.raises(CnnlabError, match="cannot read image .*5.png"):
        load_dataset(f"folder:{root}", "")
    from PIL import Image
    Image.new("RGB", (20, 16)).save(root / "train" / "cat" / "5.png")
    with pytest.raises(CnnlabError, match="1 of the 18 images are not 16x16, the dataset's "
                                          "size \\(e.g. .*5.png is 20x16\\); pass --image-size "
                                          "16x16"):
        load_dataset(f"folder:{root}", "")
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "b").mkdir()
    (empty / "test").mkdir()
    with pytest.raises(CnnlabError, match="has no images"):
        load_dataset(f"folder:{empty}", "")
    with pytest.raises(CnnlabError, match="must hold train/ and test/"):
        load_dataset(f"folder:{tmp_path}", "")


def test_cache_is_used_and_falls_back_when_read_only(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "pets")
    first = load_dataset(f"folder:{root}", "")
    assert list((root / ".cnnlab-cache").glob("*.x.npy"))
    # a second load must not decode any image
    monkeypatch.setattr("cnnlab.data.readers.read_folder_split",
                        lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_dataset(f"folder:{root}", "")
    np.testing.assert_array_equal(first.train_x, again.train_x)
    # nor the same folder spelled another way: relative, through "..", through a link
    (tmp_path / "link").symlink_to(root)
    monkeypatch.chdir(tmp_path)
    for spelling in ("pets", "./link/../pets", "link"):
        load_dataset(f"folder:{spelling}", "")
    monkeypatch.undo()

    # A data folder we cannot write to (a file where the cache folder would go stops even
    # root, who may write to read-only folders): the cache goes to CNNLAB_CACHE instead.
    ro = write_folder(tmp_path / "ro")
    (ro / ".cnnlab-cache").write_text("not a folder")
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    load_dataset(f"folder:{ro}", "")
    assert (ro / ".cnnlab-cache").read_text() == "not a folder"
    assert list(cache.rglob("*.x.npy"))


def test_folder_decoding_in_worker_processes_equals_decoding_here(tmp_path, monkeypatch):
    """Large folders are decoded by one worker process a core; the arrays are the same."""
    from cnnlab.data import readers

    root = write_folder(tmp_path / "pets", n_train=10, n_test=2, size=12, fmt="jpg")
    files = readers.folder_files(root / "train", ["cat", "dog", "fox"], require_all=True)
    here = readers.read_folder_split(files)
    monkeypatch.setattr(readers, "_SMALL", 0)
    monkeypatch.setattr(readers, "_cores", lambda: 2)
    pooled = readers.read_folder_split(files)
    assert np.array_equal(here[0], pooled[0]) and np.array_equal(here[1], pooled[1])
    assert here[0].shape == (30, 3, 12, 12)


def test_a_failed_download_says_why_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        Path(args[0], "MNIST", "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does
        raise ConnectionError()  # no message: the reason is its type

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(CnnlabError, match=r"could not download mnist \(ConnectionError\); "
                                          "without a network, put"):
        load_dataset("mnist", tmp_path / "wrong" / "place")
    assert list(tmp_path.iterdir()) == []


def test_channel_stats_equal_the_plain_float_computation():
    """The integer-sum formula gives what the mean and sample std of x / 255 give."""
    import torch

    for seed, (n, c) in enumerate([(300, 3), (50, 1), (1, 3)]):
        x = np.random.default_rng(seed).integers(0, 256, (n, c, 9, 7), dtype=np.uint8) // 3
        t = torch.from_numpy(x).double() / 255
        mean = tuple(round(t[:, k].mean().item(), 4) for k in range(c))
        std = tuple(round(max(t[:, k].std().item(), 1e-3), 4) for k in range(c))
        assert channel_stats(x) == (mean, std)


@pytest.mark.parametrize("first_pass_pixels", [64 * 64, 1])  # decoded at once / probed first
def test_folder_split_equals_decoding_each_file_as_the_dataset_does(tmp_path, monkeypatch,
                                                                   first_pass_pixels):
    """Small images are decoded as they are first opened, in their own mode, and made RGB
    afterwards where the dataset is RGB; larger ones are probed, then decoded in the
    dataset's mode. Either way each image equals decode_image in the dataset's mode."""
    from PIL import Image

    from cnnlab.data import readers

    monkeypatch.setattr(readers, "_FIRST_PASS_PIXELS", first_pass_pixels)
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    images = {"rgb.png": Image.fromarray(rgb), "gray.png": Image.fromarray(gray, "L"),
              "bits.png": Image.fromarray(gray > 128),
              "alpha.png": Image.fromarray(np.dstack([rgb, gray]), "RGBA"),
              "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257),
              "palette.png": Image.fromarray(rgb).convert("P")}
    for name, im in images.items():
        im.save(folder / name)
    files = [(folder / name, 0) for name in images]
    x, _ = readers.read_folder_split(files)
    expected = np.stack([readers.decode_image(p, "RGB") for p, _ in files])
    assert np.array_equal(x, expected)
    grays = [(folder / n, 0) for n in ("gray.png", "bits.png", "gray16.png")]
    x, _ = readers.read_folder_split(grays)
    assert x.shape[1] == 1
    assert np.array_equal(x, np.stack([readers.decode_image(p, "L") for p, _ in grays]))
    # an image of another size is named, and with more of the common size left out
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "big.png")
    with pytest.raises(CnnlabError, match="1 of the 7 images are not 16x16.*big.png is 24x20"):
        readers.read_folder_split([*files, (folder / "big.png", 0)])
    x, _ = readers.read_folder_split([*files, (folder / "big.png", 0)], skip_bad=True)
    assert len(x) == len(files)


def test_a_cached_split_is_memory_mapped_not_loaded(tmp_path):
    """Read back from the cache, the images stay memory-mapped (a split larger than RAM still
    trains) - copy-on-write, so tensors made from them take writes without a warning."""
    import warnings

    import torch

    root = write_folder(tmp_path / "pets", n_train=4, n_test=2)
    first = load_dataset(f"folder:{root}", "")
    again = load_dataset(f"folder:{root}", "")
    assert not isinstance(first.train_x, np.memmap) and isinstance(again.train_x, np.memmap)
    assert np.array_equal(first.train_x, again.train_x) and first.digest == again.digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = torch.from_numpy(again.train_x)
    t[0] = 0  # the process's own copy of that page; the cache file is untouched
    assert np.array_equal(load_dataset(f"folder:{root}", "").train_x, first.train_x)
