"""Predict the classes of your own images with a trained model.

Every image is brought to what the model saw in training: grayscale or RGB as the model's
input channels, resized to its input size, the dataset's normalisation; a transparent
background becomes white. Models trained on light-on-dark grayscale images (MNIST,
Fashion-MNIST) also get the usual inversion of dark-on-light drawings: with
invert="auto", an image whose border is light is inverted."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .checkpoint import ModelMeta, load_model
from .data.readers import IMAGE_SUFFIXES, decode_image, image_error, show_path
from .errors import CnnlabError
from .inference import predict_logits

INVERTS = ("auto", "yes", "no")


def light_on_dark(meta: ModelMeta) -> bool:
    """Whether the model was trained on grayscale images with a dark background."""
    return meta.in_channels == 1 and meta.mean[0] < 0.5


def load_image(path: str | Path, meta: ModelMeta, invert: str = "auto"
               ) -> tuple[np.ndarray, bool]:
    """Any image Pillow reads -> (uint8 array (C, H, W) as the model takes it, inverted?).
    Raises CnnlabError naming the file when it cannot be read."""
    channels = meta.in_channels
    if channels not in (1, 3):
        raise CnnlabError(f"the model takes {channels}-channel images; only grayscale (1) "
                          "and RGB (3) images can be prepared for it")
    height, width = meta.image_size
    try:
        arr = decode_image(path, "L" if channels == 1 else "RGB", (width, height),
                           crop=meta.fit == "crop")
    except Exception as e:  # Pillow raises many types for bad files (a decompression bomb's
        raise CnnlabError(image_error(path, e)) from None  # is none of OSError, ValueError)
    flip = invert == "yes" or (invert == "auto" and light_on_dark(meta)
                               and _border_mean(arr) > 127.5)
    return (255 - arr if flip else arr).copy(), flip


def _border_mean(arr: np.ndarray) -> float:
    gray = arr.astype(np.float64).mean(0)
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return float(border.mean())


def collect_images(inputs: Iterable[str | Path]) -> list[tuple[str, str | None]]:
    """(path, error) for every image named or inside a folder named (recursively, image
    suffixes only, hidden files and folders aside, sorted); error is None where the path is
    there to read. A broken link or link loop inside a folder is listed, for reading it to
    fail and say why; a subfolder that cannot be listed gets an error."""
    found: list[tuple[str, str | None]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            images = _images_in(p)
            if not images:
                images = [(str(p), f"folder {show_path(p)} holds no images "
                                   f"({', '.join(sorted(IMAGE_SUFFIXES))})")]
            found.extend(images)
        elif os.path.lexists(p):
            found.append((str(p), None))
        else:
            found.append((str(p), f"no such file or folder: {show_path(p)}"))
    return found


def _images_in(folder: Path) -> list[tuple[str, str | None]]:
    def unlisted(e: OSError) -> None:
        found.append((Path(e.filename), f"cannot list folder {show_path(e.filename)}: "
                                        f"{e.strerror}"))

    found: list[tuple[Path, str | None]] = []
    for top, dirs, files in os.walk(folder, onerror=unlisted):  # links to folders not followed
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend((Path(top, f), None) for f in files
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return [(str(path), error) for path, error in sorted(found, key=lambda e: e[0])]


def predict(checkpoint: str | Path, inputs: Iterable[str | Path], *, top_k: int = 3,
            invert: str = "auto", batch_size: int = 256,
            device: str | torch.device = "cpu", trust_code: bool = False) -> list[dict]:
    """The top-k classes of each image: one dict per image, in order,
    {"path", "top": [{"label", "probability"}, ...], "inverted"} or {"path", "error"}.
    A file that cannot be read gets an error entry; the others are still predicted."""
    if not isinstance(top_k, int) or top_k <= 0:
        raise CnnlabError(f"--top-k must be a positive number of classes, got {top_k}")
    if invert not in INVERTS:
        raise CnnlabError(f"unknown --invert '{invert}'; choose one of {', '.join(INVERTS)}")
    if batch_size <= 0:
        raise CnnlabError(f"--batch-size must be positive, got {batch_size}")
    trained = load_model(checkpoint, device, trust_code=trust_code)
    meta = trained.meta
    entries = collect_images(inputs)
    if not entries:
        raise CnnlabError("no images given")
    classes = meta.classes
    k = min(top_k, len(classes))
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start:start + batch_size]
            loaded = list(pool.map(lambda e: _try_load(e, meta, invert), chunk))
            ok = [r for r in loaded if "image" in r]
            if ok:
                images = torch.from_numpy(np.stack([r.pop("image") for r in ok]))
                probs = predict_logits(trained.model, images, meta,
                                       batch_size=batch_size).softmax(1)
                values, indices = probs.topk(k, dim=1)
                for r, v, i in zip(ok, values.tolist(), indices.tolist()):
                    r["top"] = [{"label": classes[c], "probability": round(p, 6)}
                                for p, c in zip(v, i)]
            results.extend(loaded)
    return [{key: r[key] for key in ("path", "top", "inverted", "error") if key in r}
            for r in results]


def _try_load(entry: tuple[str, str | None], meta: ModelMeta, invert: str) -> dict:
    path, error = entry
    if error:
        return {"path": path, "error": error}
    try:
        image, inverted = load_image(path, meta, invert)
    except CnnlabError as e:
        return {"path": path, "error": str(e)}
    return {"path": path, "image": image, "inverted": inverted}


def format_prediction(result: dict) -> str:
    """One line: `path: label 99.80%, label 0.15%, ...`."""
    top = ", ".join(f"{t['label']} {100 * t['probability']:.2f}%" for t in result["top"])
    inverted = "  (inverted)" if result.get("inverted") else ""
    return f"{show_path(result['path'])}: {top}{inverted}"
