"""Your own photos, any size: --image-size resizes each image's shorter side and centre-crops
it (torchvision's Resize + CenterCrop); the size and the way are kept with the model, so that
predict and export prepare images as training did. Without it, a folder of mixed sizes is
refused once, with the size to pass."""

import numpy as np
import pytest
from PIL import Image

import cnnlab
from cnnlab import checkpoint
from cnnlab.checks import parse_image_size
from cnnlab.cli import main
from cnnlab.data.readers import decode_image
from cnnlab.errors import CnnlabError


def _photos(root, sizes=((320, 240), (200, 300), (256, 256), (400, 180))):
    """A folder of photo-like images of mixed sizes (a bright disc on a gradient per class)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for k, name in enumerate(("sun", "moon")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[(i + k) % len(sizes)]
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 90 * k)], -1)
                disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2
                img[disc] = (255, 220 - 150 * k, 40)
                img = (img + rng.integers(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("text,size", [("64", (64, 64)), ("64x48", (64, 48)),
                                       (" 32 X 40 ", (32, 40))])
def test_parse_image_size(text, size):
    assert parse_image_size(text) == size


@pytest.mark.parametrize("text", ["0", "64x", "x64", "64x0", "-3", "big", "6.5"])
def test_bad_image_size(text):
    with pytest.raises(CnnlabError, match="--image-size must be N or HxW in pixels"):
        parse_image_size(text)


def test_resize_and_centre_crop_matches_torchvision(tmp_path):
    tf = pytest.importorskip("torchvision.transforms.functional")
    rng = np.random.default_rng(1)
    for (w, h), (th, tw) in (((300, 200), (64, 64)), ((200, 300), (48, 64)),
                             ((64, 64), (32, 32))):
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
        arr = (arr + rng.integers(0, 8, arr.shape)).clip(0, 255).astype(np.uint8)
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(arr).save(path)
        ours = decode_image(path, "RGB", (tw, th), crop=True)
        scale = max(tw / w, th / h)
        ref = tf.center_crop(tf.resize(Image.open(path), [round(h * scale), round(w * scale)]),
                             [th, tw])
        ref = np.asarray(ref).transpose(2, 0, 1)
        assert ours.shape == ref.shape == (3, th, tw)
        assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 2.0  # within interpolation


def test_a_folder_of_mixed_size_photos(tmp_path, capsys):
    root = _photos(tmp_path / "photos")
    code = main(["train", "lenet5", f"folder:{root}", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "8 of the 12 images are not 200x300, the dataset's size" in err[0]
    assert "pass --image-size 300x200 (or another HxW)" in err[0]

    out = tmp_path / "run"
    summary = cnnlab.train("lenet5", f"folder:{root}", out=out, image_size="40x48", epochs=1,
                           batch_size=4, progress=False, telemetry=0)
    meta = checkpoint.load(out / "best.pt")["model_meta"]
    assert meta["image_size"] == [40, 48] and meta["fit"] == "crop"
    assert summary["final_test_acc"] >= 0
    # predict prepares a photo of yet another size the same way
    photo = root / "test" / "sun" / "0.jpg"
    from cnnlab.checkpoint import load_model
    from cnnlab.predict import load_image

    trained = load_model(out)
    arr, _ = load_image(photo, trained.meta)
    assert np.array_equal(arr, decode_image(photo, "RGB", (48, 40), crop=True))
    assert main(["predict", str(out), str(photo)]) == 0
    with pytest.raises(CnnlabError, match="--image-size resizes the images of folder datasets"):
        cnnlab.train("lenet5", "mnist", image_size="32", out=tmp_path / "m", progress=False)
