"""Shared fixtures: tiny datasets written in the official formats, and the real data."""

from __future__ import annotations

import gzip
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests compare with results computed on the CPU (bitwise resumes, one process against
# two): on a machine with a GPU they still train on the CPU, in this process and in the
# commands they start (whatever the shell's CNNLAB_DEVICE says). Tests of CUDA behaviour ask
# for --device cuda and skip without one.
os.environ["CNNLAB_DEVICE"] = "cpu"
# Runs the tests compare bitwise train with one number of threads, whatever else the machine
# does (cnnlab's default takes fewer threads beside busy processes: limits.default_threads).
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


# The slow tests (`make test-fast` leaves them out; every module is still touched by the
# rest): whole files of real processes on many hosts, kills at many moments, real data...
SLOW_FILES = {"test_storage_faults.py", "test_multihost.py", "test_multihost_sweep.py",
              "test_mnist_real.py", "test_lifecycle.py", "test_reliability.py",
              "test_launch_output.py", "test_study.py", "test_distributed.py",
              "test_bench_install.py", "test_attacks.py"}
# ... and single tests of many seconds in files that are otherwise quick
SLOW_TESTS = {"test_ctrl_c_stops_every_concurrent_run_and_the_same_command_continues",
              "test_real_mnist_pooling_sweep", "test_gpu_suite_plumbing_on_the_cpu",
              "test_the_fast_recipe_trains_evaluates_when_asked_and_resumes_bitwise",
              "test_concurrent_runs_give_the_one_by_one_results",
              "test_a_diverged_run_is_recorded_and_the_sweep_goes_on",
              "test_a_dead_workers_trial_is_continued_from_its_checkpoint",
              "test_the_suggestion_trains_better_than_a_hundredth_or_a_hundred_times_it",
              "test_checkpoint_weights_are_plain_tensors_other_tools_save"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of `make test-fast`")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _signals_as_they_were():
    """A test that leaves cnnlab's signal handling in pytest's own process would keep
    Ctrl-C and SIGTERM from stopping the test run: each test must put it back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    changed = [sig.name for sig, handler in before.items() if signal.getsignal(sig) != handler]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not changed, f"the test left its own handler of {', '.join(changed)}"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep decoded caches that fall back to the user cache inside the test's temp dir."""
    os.environ.setdefault("CNNLAB_CACHE", str(tmp_path_factory.mktemp("cnnlab-cache")))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real datasets (CNNLAB_TEST_DATA, else ../shared/data); skip if absent."""
    path = Path(os.environ.get("CNNLAB_TEST_DATA") or REPO.parent / "shared" / "data")
    if not (path / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found under {path} (set CNNLAB_TEST_DATA)")
    return path


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write a uint8 array as an IDX file (type 0x08), optionally gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def synthetic_images(n: int, size: int, channels: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Easy-to-learn images: class k is a bright 6x6 square at a class-specific place."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, channels, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = 2 + (k // 5) * (size // 2), 2 + (k % 5) * (size // 6)
        images[i, :, r:r + 6, c:c + 4] = 255
    return images, labels.astype(np.uint8)


def write_mnist(root: Path, n_train: int = 512, n_test: int = 128, *, gz: bool = False,
                folder: str = "MNIST") -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = synthetic_images(n, 28, 1, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0], gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, gz=gz)
    return root


def write_cifar(root: Path, n_train: int = 100, n_test: int = 50) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for i in range(1, 6):
        x, y = synthetic_images(per, 32, 3, i)
        batch = {b"data": x.reshape(per, -1), b"labels": y.astype(int).tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    x, y = synthetic_images(n_test, 32, 3, 9)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": x.reshape(n_test, -1), b"labels": y.astype(int).tolist()}))
    return root


def write_folder(root: Path, classes=("cat", "dog", "fox"), n_train: int = 6, n_test: int = 3,
                 size: int = 16, mode: str = "RGB", fmt: str = "png") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size) if mode == "L" else (size, size, 3)
                arr = rng.integers(0, 256, shape, dtype=np.uint8) // 4 + 60 * k
                Image.fromarray(arr.astype(np.uint8), mode).save(d / f"{i}.{fmt}")
    return root


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    return write_mnist(tmp_path / "data")
