"""Export a trained model to ONNX, torch.export's ExportedProgram or TorchScript, checked
against the PyTorch model.

The exported model takes the normalised float input (N, C, H, W), any batch size, and
returns the logits. How to get from an image to that input (colour mode, size,
mean/std) and the class names travel with it: inside the file (ONNX metadata_props, the
extra file `cnnlab.json` of an ExportedProgram or a TorchScript file) and in `<file>.json`
beside it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint import ModelMeta, Trained, load_model
from .config import data_dir_for
from .data.loader import mean_std
from .errors import CnnlabError, one_line
from .files import temp_file, write_synced
from .inference import preprocess
from .predict import light_on_dark
from .runs import CONFIG, RUN_FILES

FORMATS = ("onnx", "export", "torchscript")
SUFFIXES = {"onnx": ".onnx", "export": ".pt2", "torchscript": ".torchscript.pt"}
# the largest difference allowed between an export's logits and PyTorch's, relative to the
# logits' scale (their largest magnitude, at least 1): float32 rounding grows with it
TOLERANCE = 1e-4
_CHECK_BATCHES = (16, 1)  # parity on a batch and on a single image: the batch axis is free
REAL_IMAGES = 256  # and on the first test images of the model's dataset, where at hand


def export_metadata(trained: Trained, fmt: str) -> dict:
    """Everything a user of the exported file needs besides the file itself."""
    meta = trained.meta
    c, (h, w) = meta.in_channels, meta.image_size
    normalize = meta.normalize
    mean, std = mean_std(meta.mean, meta.std, normalize)
    return {
        "format": fmt, "model": meta.name, "options": meta.options,
        "classes": list(meta.classes),
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", c, h, w]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", meta.num_classes]},
        "preprocessing": {
            "color_mode": "L" if c == 1 else "RGB", "size": [h, w],
            "resize": ("shorter side to fit, then centre crop" if meta.fit == "crop"
                       else "to the size, bilinear"),
            "formula": "input = (pixel / 255 - mean) / std, per channel",
            "mean": mean, "std": std, "normalize": normalize,
            "invert_light_background": light_on_dark(meta),
        },
        "source": {"checkpoint": trained.path.name, "epoch": trained.epochs_done,
                   "test_acc": trained.test_acc, "dataset": trained.config.get("dataset")},
        "cnnlab_version": __version__, "torch_version": torch.__version__,
    }


def default_output(source: Path, fmt: str) -> Path:
    return source.with_name(source.stem + SUFFIXES[fmt])


def export_model(checkpoint: str | Path, fmt: str, out: str | Path | None = None, *,
                 tolerance: float = TOLERANCE, data_dir: str | Path | None = None,
                 trust_code: bool = False) -> dict:
    """Export the model of a checkpoint (or a run directory's best.pt) to `fmt`, check
    that it gives the PyTorch model's logits within `tolerance` of their scale - on random
    images and, where the dataset it was trained on is at hand (in `data_dir`, default the
    one it was trained from; never downloaded), on its first REAL_IMAGES test images - and
    write it to `out` (default beside the checkpoint) with `<out>.json`. Returns the
    metadata plus "path", "metadata_path" and "max_abs_diff"."""
    if fmt not in FORMATS:
        raise CnnlabError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    trained = load_model(checkpoint, "cpu", trust_code=trust_code)
    model, source = trained.model, trained.path
    out = Path(out) if out else default_output(source, fmt)
    sidecar = out.with_name(out.name + ".json")
    _check_output(out, sidecar, source)
    info = export_metadata(trained, fmt)
    inputs = _sample_inputs(trained.meta)
    real, checked_on = _real_inputs(trained, data_dir)
    inputs += [real] if real is not None else []
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    temps: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temps.append(temp_file(out))
        temps.append(temp_file(sidecar))
    except OSError as e:
        for path in temps:
            path.unlink(missing_ok=True)
        raise CnnlabError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    tmp, tmp_sidecar = temps
    try:
        got, checked_with = _export_and_run(fmt, model, info, inputs, tmp)
        diff = max(float((a - b).abs().max()) for a, b in zip(expected, got))
        scale = max(1.0, max(float(a.abs().max()) for a in expected))
        if not diff / scale <= tolerance:
            raise CnnlabError(f"the {fmt} export gives logits up to {diff:.3g} away from the "
                              f"PyTorch model's, {diff / scale:.3g} of their scale {scale:.3g} "
                              f"(allowed {tolerance:g}); nothing written")
        info["parity"] = {"max_abs_diff": diff, "max_rel_diff": diff / scale,
                          "logit_scale": scale, "tolerance": tolerance,
                          "tolerance_is": "relative to the logits' largest magnitude, at "
                                          "least 1",
                          "checked_with": checked_with, "batch_sizes": list(_CHECK_BATCHES),
                          "checked_on": checked_on}
        if real is not None:  # the same class, image by image (a near tie may differ)
            same = int((expected[-1].argmax(1) == got[-1].argmax(1)).sum())
            info["parity"]["top1_agreement"] = f"{same}/{len(real)}"
        info["file"] = out.name
        try:  # both files complete beside their places before either is moved into it
            write_synced(tmp_sidecar, (json.dumps(info, indent=2) + "\n").encode())
            os.replace(tmp, out)
            os.replace(tmp_sidecar, sidecar)
        except OSError as e:
            raise CnnlabError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
    return info | {"path": str(out), "metadata_path": str(sidecar), "max_abs_diff": diff}


def _export_and_run(fmt: str, model: nn.Module, info: dict, inputs: list[torch.Tensor],
                    path: Path) -> tuple[list[torch.Tensor], str]:
    """Write `model` as `fmt` into `path` and run that file on `inputs`: (the logits it
    gives, what ran it)."""
    if fmt == "onnx":
        import onnxruntime

        _export_onnx(model, inputs[0], info, path)
        return _run_onnx(path, inputs), f"onnxruntime {onnxruntime.__version__}"
    if fmt == "export":
        _export_program(model, info, inputs[0], path)
        return _run_program(path, inputs), f"torch.export.load, torch {torch.__version__}"
    _export_torchscript(model, info, inputs[0], path)
    return _run_torchscript(path, inputs), f"torch.jit.load, torch {torch.__version__}"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise CnnlabError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is "
                          "missing); install them with: pip install 'cnnlab[export]'") from None


def _check_output(out: Path, sidecar: Path, source: Path) -> None:
    """Write over nothing but an earlier export: never the checkpoint, never a run's files."""
    if out.is_dir():
        raise CnnlabError(f"--out {out} is a folder; give a file name")
    for path in (out, sidecar):
        if path.resolve() == source.resolve() or (
                path.exists() and not _earlier_export(sidecar)) or (
                path.name in RUN_FILES and (path.parent / CONFIG).is_file()):
            raise CnnlabError(f"--out {out} would overwrite {path}, which is not an earlier "
                              "export; choose another file name")


def _earlier_export(sidecar: Path) -> bool:
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") in FORMATS and "cnnlab_version" in info


def _real_inputs(trained: Trained, data_dir: str | Path | None
                 ) -> tuple[torch.Tensor | None, str]:
    """The model's input for the first REAL_IMAGES test images of the dataset it was trained
    on, where that is at hand (else None), and what the parity was checked on."""
    from .data import load_dataset
    from .inference import check_dataset_fits

    random = f"random images (batches of {' and '.join(map(str, _CHECK_BATCHES))})"
    meta, dataset = trained.meta, trained.config.get("dataset")
    if not isinstance(dataset, str):
        return None, f"{random} only: the checkpoint names no dataset"
    try:
        data = load_dataset(dataset, data_dir_for(data_dir, trained.config), download=False,
                            image_size=meta.image_size if meta.fit == "crop" else None)
        check_dataset_fits(data, meta, dataset)
    except CnnlabError:
        return None, (f"{random} only: no {dataset} test images at hand "
                      f"(--data-dir gives their folder)")
    if len(data.test_y) == 0:
        return None, f"{random} only: {dataset} has no test images"
    images = torch.from_numpy(data.test_x[:REAL_IMAGES])
    return preprocess(images, meta), f"{random} and the first {len(images)} {dataset} test images"


def _sample_inputs(meta: ModelMeta) -> list[torch.Tensor]:
    """Normalised inputs from random uint8 images: the value range real images have."""
    g = torch.Generator().manual_seed(0)
    c, (h, w) = meta.in_channels, meta.image_size
    return [preprocess(torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
                       meta) for n in _CHECK_BATCHES]


@contextlib.contextmanager
def _quiet():
    """The exporters' progress prints and deprecation warnings stay out of our output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_onnx(model: nn.Module, example: torch.Tensor, info: dict, path: Path) -> None:
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (example,), None, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                external_data=False, verbose=False)
            props = program.model.metadata_props
            props["cnnlab"] = json.dumps(info)
            props["classes"] = json.dumps(info["classes"])
            props["preprocessing"] = json.dumps(info["preprocessing"])
            program.save(str(path), external_data=False)
    except CnnlabError:
        raise
    except Exception as e:  # the exporter raises many types
        raise CnnlabError(f"ONNX export of {info['model']} failed: {one_line(e)}") from None


def _run_onnx(path: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
                for x in inputs]
    except Exception as e:  # onnxruntime raises its own exception types
        raise CnnlabError(f"onnxruntime cannot run the ONNX export: {one_line(e)}") from None


def _export_program(model: nn.Module, info: dict, example: torch.Tensor, path: Path) -> None:
    """torch.export's ExportedProgram (the format TorchScript gives way to), the batch axis
    free, the metadata inside as the extra file cnnlab.json."""
    try:
        with _quiet():
            program = torch.export.export(model.eval(), (example,), dynamic_shapes=(
                {0: torch.export.Dim("batch", min=1, max=1 << 16)},))
            buffer = io.BytesIO()  # a path must end in .pt2, and the temporary file's does not
            torch.export.save(program, buffer, extra_files={"cnnlab.json": json.dumps(info)})
        write_synced(path, buffer.getvalue())
    except Exception as e:  # the exporter raises many types
        raise CnnlabError(f"torch.export of {info['model']} failed: {one_line(e)}") from None


def _run_program(path: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    try:
        with _quiet():
            loaded = torch.export.load(io.BytesIO(path.read_bytes())).module()
        with torch.no_grad():
            return [loaded(x) for x in inputs]
    except Exception as e:  # torch.export raises many types
        raise CnnlabError(f"the torch.export file cannot be loaded and run: "
                          f"{one_line(e)}") from None


def _export_torchscript(model: nn.Module, info: dict, example: torch.Tensor,
                        path: Path) -> None:
    with _quiet():
        try:
            scripted = torch.jit.script(model)
            with torch.no_grad():  # scripted, torchvision's GoogLeNet returns a tuple
                if not isinstance(scripted(example), torch.Tensor):
                    raise TypeError("the scripted model returns no tensor")
        except Exception:  # noqa: BLE001 - a model scripting cannot handle: trace it
            try:
                scripted = torch.jit.trace(model, example)
            except Exception as e:  # tracing raises many types
                raise CnnlabError(f"TorchScript export of {info['model']} failed: neither "
                                  f"scripting nor tracing works ({one_line(e)})") from None
        torch.jit.save(scripted, str(path), _extra_files={"cnnlab.json": json.dumps(info)})


def _run_torchscript(path: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    try:
        with _quiet():
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return [loaded(x) for x in inputs]
    except Exception as e:  # torch.jit raises many types
        raise CnnlabError(f"the TorchScript export cannot be loaded and run: "
                          f"{one_line(e)}") from None


def read_torchscript_metadata(path: str | Path) -> dict:
    """The metadata stored inside a TorchScript export."""
    extra = {"cnnlab.json": ""}
    try:
        with _quiet():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # torch.jit raises many types
        raise CnnlabError(f"cannot load TorchScript file {path}: {one_line(e)}") from None
    return json.loads(extra["cnnlab.json"])
