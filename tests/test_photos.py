"""Photos decoded each epoch (--augment resized-crop): the crops, the path said in one line,
views that depend on neither the workers nor the rank nor where the JPEGs are decoded, a
resume bitwise equal to the run it continues, and bad files as one line."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import cnnlab
from cnnlab.checkpoint import load
from cnnlab.data import load_dataset
from cnnlab.data.photos import PhotoLoader, crop_box, decode, decode_jpegs, upright
from cnnlab.errors import CnnlabError, Interrupted
from cnnlab.inference import evaluate_checkpoint


def write_photos(root: Path, n_train: int = 10, n_test: int = 3) -> Path:
    """Photos of two classes in sizes from 40 to 90 pixels a side, JPEGs and PNGs mixed."""
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, 2)
                pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8) + 100 * k
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 4 == 3 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "pets")


def test_crops_cover_8_to_100_percent_with_ratios_3_4_to_4_3():
    rng = np.random.default_rng(0)
    boxes = [crop_box(rng, 60, 60) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 60 - h and 0 <= left <= 60 - w
    areas = np.array([h * w / (60 * 60) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert 0.07 < areas.min() < 0.12 and areas.max() > 0.9
    assert 0.7 < ratios.min() < 0.8 and 1.25 < ratios.max() < 1.4
    assert crop_box(np.random.default_rng(0), 1, 1) == (0, 0, 1, 1)
    # a strip: no random box fits, so the largest centred one of ratio 4/3
    assert crop_box(np.random.default_rng(0), 3, 400) == (0, 198, 3, 4)


def test_upright_turns_jpegs_as_pillow_does():
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:4, :10] = 255  # a bright corner at the top left
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=95)
        data = buffer.getvalue()
        turned = decode(data, "x.jpg", "RGB")  # torchvision, its EXIF applied
        ours = upright(decode_jpegs(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                    "RGB"), orientation)
        assert torch.equal(turned, ours), orientation
        with Image.open(io.BytesIO(data)) as im:
            pillow = np.asarray(ImageOps.exif_transpose(im)).transpose(2, 0, 1)
        assert turned.shape == pillow.shape
        assert np.abs(turned.numpy().astype(int) - pillow).mean() < 3, orientation


def _loader(data, **kwargs) -> PhotoLoader:
    options = dict(batch_size=6, mean=data.mean, std=data.std, device=torch.device("cpu"),
                   seed=3, augment=frozenset({"resized-crop", "flip"}), workers=0,
                   shuffle=True, generator=torch.Generator().manual_seed(3))
    return PhotoLoader(data.train_x, torch.from_numpy(data.train_y), **(options | kwargs))


def _epoch(loader: PhotoLoader, epoch: int = 1, start: int = 0) -> list:
    order = torch.randperm(len(loader.labels), generator=torch.Generator().manual_seed(epoch))
    return list(loader.batches(order, start, epoch))


def test_views_depend_on_seed_epoch_and_image_alone(photos, capsys):
    data = load_dataset(f"folder:{photos}", photos, image_size=(24, 20), photos=True,
                        progress=False)
    assert "its 20 training photos are decoded each epoch" in capsys.readouterr().err
    assert data.train_x.shape == (20, 3, 24, 20) and data.test_x.shape == (6, 3, 24, 20)
    one = _epoch(_loader(data))
    assert [x.shape for x, _ in one] == [(6, 3, 24, 20)] * 3 + [(2, 3, 24, 20)]
    for (x, y), (a, b) in zip(one, _epoch(_loader(data, workers=2))):
        assert torch.equal(x, a) and torch.equal(y, b)
    # JPEGs only read by a worker, decoded in the training process (as nvJPEG does on a
    # GPU): the same views
    for (x, _), (a, _) in zip(one, _epoch(_loader(data, on_device=True, workers=1))):
        assert torch.equal(x, a)
    # two ranks: each its own slice, which together are the one-process batch
    ranks = [_epoch(_loader(data, rank=r, world_size=2)) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    # a resumed epoch: its later batches as they were; another epoch: other views
    assert all(torch.equal(x, a) for (x, _), (a, _) in zip(one[2:], _epoch(_loader(data),
                                                                           1, 2)))
    assert not torch.equal(one[0][0], _epoch(_loader(data), epoch=2)[0][0])


def test_training_on_photos_resumes_bitwise(photos, tmp_path, monkeypatch):
    """Stopped by SIGTERM in the middle of epoch 2 and resumed (decoding in this process),
    the run ends as the uninterrupted one (a worker process) does."""
    batches = PhotoLoader.batches

    def stopping(self, order, start_batch=0, epoch=1):
        for k, batch in enumerate(batches(self, order, start_batch, epoch)):
            if epoch == 2 and k == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    options = dict(image_size="32", epochs=2, augment="resized-crop,flip", batch_size=8,
                   schedule="constant", telemetry=0, progress=False)
    whole = cnnlab.train("lenet5", f"folder:{photos}", workers=1, out=tmp_path / "whole",
                         **options)
    monkeypatch.setattr(PhotoLoader, "batches", stopping)
    with pytest.raises(Interrupted):
        cnnlab.train("lenet5", f"folder:{photos}", workers=0, out=tmp_path / "cut", **options)
    monkeypatch.undo()
    assert load(tmp_path / "cut" / "checkpoint.pt")["batch"] == 2
    cnnlab.train(resume=tmp_path / "cut", progress=False)
    weights = [load(tmp_path / name / "checkpoint.pt")["model"] for name in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # evaluated as it was trained: its test split alone decoded, at its size
    scored = evaluate_checkpoint(tmp_path / "whole" / "checkpoint.pt", progress=False)
    assert scored["images"] == 6
    assert scored["accuracy"] == pytest.approx(whole["final_test_acc"])
    assert not list((photos / ".cnnlab-cache").glob("folder-train-*"))  # never decoded


def test_photos_need_a_folder_and_a_size_and_say_their_bad_files(photos, tmp_path, capsys):
    for dataset, size in (("mnist", None), (f"folder:{photos}", None)):
        with pytest.raises(CnnlabError, match="resized-crop cuts its crops from "
                                              "full-resolution photos"):
            cnnlab.train("lenet5", dataset, augment="resized-crop", image_size=size,
                         progress=False, out=tmp_path / "never")
    with pytest.raises(CnnlabError, match="--cuda-graph with --skip-bad-files: a photo"):
        cnnlab.train("lenet5", f"folder:{photos}", augment="resized-crop", image_size="32",
                     cuda_graph=True, skip_bad_files=True, progress=False, out=tmp_path / "no")
    with pytest.raises(CnnlabError, match="--val-split 0.2: .* trains from photos decoded"):
        cnnlab.train("lenet5", f"folder:{photos}", augment="resized-crop", image_size="32",
                     val_split=0.2, progress=False, out=tmp_path / "never")
    bad = write_photos(tmp_path / "bad", n_train=3, n_test=1)
    (bad / "train" / "dog" / "9.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    data = load_dataset(f"folder:{bad}", tmp_path, image_size=(16, 16), photos=True,
                        skip_bad_files=True, progress=False)
    assert len(data.train_y) == 7  # listed: found bad when it is decoded
    for on_device in (False, True):  # decoded by a worker, or here (as on a GPU)
        with pytest.raises(CnnlabError, match=r"^cannot read image .*9\.jpg: .*; fix or "
                                              r"remove it, or pass --skip-bad-files$"):
            _epoch(_loader(data, on_device=on_device))
        capsys.readouterr()
        skipping = _loader(data, skip_bad=True, on_device=on_device)
        batches = _epoch(skipping) + _epoch(skipping, 2)
        assert sum(len(y) for _, y in batches) == 12
        assert capsys.readouterr().err.count("cnnlab: skipping: cannot read image") == 1


def test_photo_workers_are_chosen_once_beside_the_loops_threads(monkeypatch):
    """Chosen once per run (and kept in config.json): on the CPU half the CPUs decode, on a
    GPU all but one; the loop keeps its threads; what is given is as given."""
    from cnnlab import trainer
    from cnnlab.config import resolve

    monkeypatch.setattr(trainer, "default_threads", lambda: 4)
    photos = dict(augment="resized-crop", image_size="32")

    def cpus(device: str = "cpu", **given):
        cfg = resolve("lenet5", "folder:x", overrides={**photos, **given})
        got = trainer._cpus(cfg, torch.device(device))
        return got.threads, got.workers

    assert cpus() == (4, 2) and cpus(workers=1) == (4, 1) and cpus(threads=2) == (2, 1)
    assert cpus("cuda") == (4, 3)
    photos = {}
    assert cpus() == (4, None)
