"""Predict the classes of your own images with a trained model.

Every image is brought to what the model saw in training: grayscale or RGB as the model's
input channels, resized to its input size, the dataset's normalisation; a transparent
background becomes white. Models trained on light-on-dark grayscale images (MNIST,
Fashion-MNIST) also get the usual inversion of dark-on-light drawings: with
invert="auto", an image whose border is light is inverted."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .checkpoint import ModelMeta, load_model
from .data.readers import IMAGE_SUFFIXES, decode_image
from .errors import CnnlabError, one_line
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
        arr = decode_image(path, "L" if channels == 1 else "RGB", (width, height))
    except Exception as e:  # Pillow raises many types for bad files; all mean the same here
        raise CnnlabError(f"cannot read image {path}: {one_line(e)}") from None
    flip = invert == "yes" or (invert == "auto" and light_on_dark(meta)
                               and _border_mean(arr) > 127.5)
    return (255 - arr if flip else arr).copy(), flip


def _border_mean(arr: np.ndarray) -> float:
    gray = arr.astype(np.float64).mean(0)
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return float(border.mean())


def collect_images(inputs: Iterable[str | Path]) -> list[tuple[str, str | None]]:
    """(path, error) for every image named or inside a folder named (recursively, image
    suffixes only, sorted); error is None where the path is there to read."""
    found: list[tuple[str, str | None]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                found.append((str(p), f"folder {p} holds no images "
                                      f"({', '.join(sorted(IMAGE_SUFFIXES))})"))
            found.extend((str(f), None) for f in files)
        elif p.is_file():
            found.append((str(p), None))
        else:
            found.append((str(p), f"no such file or folder: {p}"))
    return found


def predict(checkpoint: str | Path, inputs: Iterable[str | Path], *, top_k: int = 3,
            invert: str = "auto", batch_size: int = 256,
            device: str | torch.device = "cpu") -> list[dict]:
    """The top-k classes of each image: one dict per image, in order,
    {"path", "top": [{"label", "probability"}, ...], "inverted"} or {"path", "error"}.
    A file that cannot be read gets an error entry; the others are still predicted."""
    if not isinstance(top_k, int) or top_k <= 0:
        raise CnnlabError(f"--top-k must be a positive number of classes, got {top_k}")
    if invert not in INVERTS:
        raise CnnlabError(f"unknown --invert '{invert}'; choose one of {', '.join(INVERTS)}")
    if batch_size <= 0:
        raise CnnlabError(f"--batch-size must be positive, got {batch_size}")
    trained = load_model(checkpoint, device)
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
    return f"{result['path']}: {top}" + ("  (inverted)" if result.get("inverted") else "")
