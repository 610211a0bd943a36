"""`cnnlab summary`: a network's layers on a dataset's images - each layer's output shape,
parameters and multiply-adds, and the output-size formula of each convolution and pooling
layer worked as the lab report writes it - from the dataset's shape alone, without its data.

Also `check_model`, which training calls: a model whose layers do not fit the images is
refused in one line naming the layer where they stop fitting, before anything trains; so is
one that returns another number of scores than the dataset has classes, and, for a model
that is not built in, one whose forward creates parameters or prints.

Multiply-adds are PyTorch's own count (`torch.utils.flop_counter.FlopCounterMode`, flops / 2):
convolutions and matrix products only, without their bias additions; batch norm,
activations, pooling and the residual additions count as none, as is usual."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, count
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CnnlabError, one_line, unknown_choice
from .models import REGISTRY, about, checked_name, code, create_model, label
from .specs import SPECS

_WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)  # layers with an output-size formula
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class _Seen:
    """A module's first call in the traced forward pass: input and output shapes (one image's,
    without the batch), and when it finished among the modules."""

    input: tuple[int, ...] | None
    output: tuple[int, ...] | None = None
    order: int = -1


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else None


def _text(shape: tuple[int, ...] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "?"


def _trace(model: nn.Module, input_shape: tuple[int, ...], model_name: str
           ) -> dict[nn.Module, _Seen]:
    """Run one all-zero image of `input_shape` (C, H, W) through `model` on its own device,
    in eval mode without gradients (its modes restored after; no random numbers drawn, no
    state changed), with hooks on every module: what each saw. A RuntimeError inside is a
    CnnlabError naming the innermost module then running, its input and torch's reason."""
    names = {module: name for name, module in model.named_modules()}
    seen: dict[nn.Module, _Seen] = {}
    running: list[tuple[nn.Module, tuple[int, ...] | None]] = []
    finished = count()

    def enter(module: nn.Module, args: tuple) -> None:
        shape = _shape(args[0]) if args else None
        running.append((module, shape))
        seen.setdefault(module, _Seen(shape))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()
        if seen[module].order < 0:
            seen[module].output, seen[module].order = _shape(output), next(finished)

    handles = [h for m in names for h in (m.register_forward_pre_hook(enter),
                                          m.register_forward_hook(leave))]
    modes = {m: m.training for m in names}
    first = next(chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(1, *input_shape, device=first.device if first is not None else "cpu",
                    dtype=first.dtype if first is not None and first.is_floating_point()
                    else torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:
        module, shape = running[-1]  # the innermost module running: the model at least
        where = names[module] or f"{type(model).__name__}.forward"
        raise CnnlabError(
            f"{model_name} does not fit {_text(tuple(input_shape))} images: at {where} "
            f"({type(module).__name__}), input {_text(shape)} (torch: "
            f"{one_line(e, 200).rstrip('.')}); use larger images (a folder dataset's: "
            "--image-size)") from None
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return seen


def check_shapes(model: nn.Module, input_shape: tuple[int, ...], model_name: str) -> None:
    """Refuse (CnnlabError) a model whose layers do not fit images of `input_shape` (C, H, W),
    naming the layer where they stop fitting; the model and the random state stay as they
    were."""
    _trace(model, input_shape, model_name)


def check_model(model: nn.Module, input_shape: tuple[int, ...], classes: int, name: str,
                dataset: str, *, built_in: bool) -> None:
    """`check_shapes`, then the model's scores: one per class for each image. A model that is
    not `built_in` is also run once as training runs it (its state and the random numbers
    restored after): a forward that prints, or that creates parameters (new ones at each
    call, which the optimiser never sees), is refused in one line."""
    printed, before = io.StringIO(), dict(model.named_parameters())
    with contextlib.redirect_stdout(printed):
        seen = _trace(model, input_shape, name)
    returned = seen[model].output
    if returned is None:
        raise CnnlabError(f"{name} returns no tensor of scores (a tuple or other value); its "
                          "forward must return one tensor, images x classes")
    if returned != (classes,):
        scores = (f"{returned[0]} scores per image" if len(returned) == 1
                  else f"scores of shape {_text(returned)} per image")
        raise CnnlabError(f"{name} returns {scores}; {dataset} has {classes} classes (give its "
                          f"last layer {classes} outputs: take a num_classes argument"
                          f"{', and flatten' if len(returned) > 1 else ''})")
    if not built_in:
        _check_forward(model, input_shape, name, printed.getvalue(), before)


def _check_forward(model: nn.Module, input_shape: tuple[int, ...], name: str, printed: str,
                   before: dict[str, nn.Parameter]) -> None:
    first = next(chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {m: m.training for m in model.modules()}
    out = io.StringIO()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                contextlib.redirect_stdout(out):
            model.train()
            scores = model(torch.zeros(2, *input_shape, device=device))
        after = dict(model.named_parameters())
        made = sorted(k for k, p in after.items() if before.get(k) is not p)
        owned = {id(p) for p in after.values()}
        strays = [v for v in _leaves(scores) if id(v) not in owned]
    finally:
        for m, training in modes.items():
            m.training = training
    if made:
        raise CnnlabError(f"{name} creates {made[0].rsplit('.', 1)[0]} inside forward (its "
                          "parameters appear only when forward runs, anew at each call, so "
                          "the optimiser never trains them): create layers in __init__")
    if strays:
        shape = _text(tuple(strays[0].shape))
        raise CnnlabError(f"{name} makes a tensor that requires gradients ({shape}) inside "
                          "forward, new at each call, so the optimiser never trains it (an "
                          "nn.Linear or nn.Parameter created in forward?): create layers in "
                          "__init__")
    model.load_state_dict(kept)
    said = (printed or out.getvalue()).strip()
    if said:
        raise CnnlabError(f"{name}'s forward prints ({said.splitlines()[0][:60]!r}): it would "
                          "print at every training step; remove the print")


def _leaves(output: Any) -> list[torch.Tensor]:
    """The tensors requiring gradients that `output` was computed from (autograd's leaves)."""
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        return []
    leaves, todo, seen = [], [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            leaves.append(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return leaves


def dataset_shape(dataset: str, image_size: tuple[int, int] | None = None
                  ) -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), classes) of `dataset`'s images, from its spec, or for
    `folder:PATH` from the first image of its train/ split (as training reads it, resized
    and centre-cropped to `image_size` if given) and its class folders."""
    from .data import DATASETS, FOLDER_PREFIX

    if not dataset.startswith(FOLDER_PREFIX):
        if dataset not in SPECS:
            raise CnnlabError(unknown_choice("dataset", dataset, DATASETS))
        if image_size is not None:
            raise CnnlabError(f"--image-size resizes the images of folder datasets; "
                              f"{dataset}'s images come in one size already")
        spec = SPECS[dataset]
        return spec.shape, len(spec.classes)
    return _folder_shape(Path(dataset[len(FOLDER_PREFIX):]).expanduser(), image_size)


def _folder_shape(root: Path, image_size: tuple[int, int] | None
                  ) -> tuple[tuple[int, int, int], int]:
    from .data import check_folder, readers

    check_folder(root)
    classes = readers.folder_classes(root)
    path = readers.folder_files(root / "train", classes, require_all=True)[0][0]
    fit = None if image_size is None else (image_size[1], image_size[0])  # Pillow's (w, h)
    try:
        with readers.open_image(path) as im:
            mode = "L" if im.mode in readers._GRAYSCALE else "RGB"
        image = readers.decode_image(path, mode, fit, crop=fit is not None)
    except Exception as e:  # Pillow raises many types for bad files; all mean the same here
        raise CnnlabError(readers.image_error(path, e)) from None
    return tuple(image.shape), len(classes)


def summarize(model_name: str, dataset: str, *, image_size: tuple[int, int] | None = None,
              pool: str | None = None, model_args: str | None = None) -> dict[str, Any]:
    """The summary of model `model_name` on `dataset`'s images (built on the meta device: no
    weights are made), as plain data: the input, the layers in the order they finish (every
    leaf module and every block, a module with a forward of its own such as a ResNet
    block), the totals. A block's parameters and multiply-adds are those of its layers."""
    from torch.utils.flop_counter import FlopCounterMode

    shape, classes = dataset_shape(dataset, image_size)
    model_name = checked_name(model_name)
    options = {"pool": pool} if model_name in REGISTRY else code.parse_args(model_args)
    with torch.device("meta"):
        model = create_model(model_name, in_channels=shape[0], num_classes=classes,
                             image_size=shape[1:], **options)
    with FlopCounterMode(display=False) as counter:
        seen = _trace(model, shape, model_name)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    layers = []
    used = [(name, module) for name, module in _rows(model) if module in seen]
    for name, module in sorted(used, key=lambda row: seen[row[1]].order):
        s = seen[module]
        counted = flops.get(f"{root}.{name}")
        layer = {"name": name, "type": type(module).__name__, "output": list(s.output or ()),
                 "parameters": sum(p.numel() for p in module.parameters()),
                 "macs": sum(counted.values()) // 2 if counted else 0,
                 "counted": counted is not None, "block": bool(list(module.children()))}
        if isinstance(module, _WINDOWED) and s.input and s.output:
            layer["formula"] = _formula(module, s.input[-2:], s.output[-2:])
        layers.append(layer)
    title, reference = about(model_name)
    return {"model": label(model_name), "title": title, "reference": reference,
            "dataset": dataset, "input": list(shape), "classes": classes, "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters()
                                        if p.requires_grad),
            "macs": counter.get_total_flops() // 2}


def _rows(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules a summary shows: the leaves, and the blocks (modules other than the model
    and plain containers that hold others)."""
    for name, module in model.named_modules():
        leaf = not list(module.children())
        if name and (leaf or not isinstance(module, _CONTAINERS)):
            yield name, module


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


def _formula(module: nn.Module, size_in: tuple[int, ...], size_out: tuple[int, ...]
             ) -> list[str]:
    """The output-size formula (n + 2p - f)/s + 1 (the division rounded down) worked for a
    convolution or pooling layer: one line when height and width work alike, else one each.
    A dilated kernel counts by the extent it covers; "same" padding by what it adds."""
    kernel, stride, dilation = (_pair(getattr(module, a, 1))
                                for a in ("kernel_size", "stride", "dilation"))
    padding = module.padding
    lines = []
    for i in range(2):
        f = dilation[i] * (kernel[i] - 1) + 1
        if padding == "same":
            added = f - 1
            pad = f"2*{added // 2}" if added % 2 == 0 else str(added)
        else:
            pad = f"2*{0 if padding == 'valid' else _pair(padding)[i]}"
        lines.append(f"({size_in[i]} + {pad} - {f})/{stride[i]} + 1 = {size_out[i]}")
    if lines[0] == lines[1]:
        return lines[:1]
    return [f"height {lines[0]}", f"width {lines[1]}"]


def _quantity(n: int) -> str:
    """416,520 -> '0.42 M', 555,422,720 -> '0.56 G'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale / 10:
            return f"{n / scale:.2f} {suffix}"
    return str(n)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table, the formulas under it and the totals."""
    head = ("layer", "type", "output", "parameters", "multiply-adds")
    rows = [(layer["name"], layer["type"], _text(tuple(layer["output"])),
             f"{layer['parameters']:,}", f"{layer['macs']:,}" if layer["counted"] else "-")
            for layer in summary["layers"]]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    lines = [f"{summary['model']} on {summary['dataset']}: input "
             f"{_text(tuple(summary['input']))}, {summary['classes']} classes",
             f"{summary['title']} ({summary['reference']})", ""]
    for row in (head, *rows):
        lines.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    blocks = sorted({layer["type"] for layer in summary["layers"] if layer["block"]})
    if blocks:
        lines.append(f"(a {' or '.join(blocks)} row totals its layers above it)")
    lines += ["", "output sizes, (n + 2p - f)/s + 1 rounded down:"]
    lines += [f"  {layer['name']} ({layer['type']}): {formula}"
              for layer in summary["layers"] for formula in layer.get("formula", ())]
    lines += ["", f"parameters: {summary['parameters']:,} (trainable "
                  f"{summary['trainable_parameters']:,})",
              f"multiply-adds per image: {summary['macs']:,} ({_quantity(summary['macs'])}; "
              "convolutions and linear layers, as torch's flop counter counts them)"]
    return "\n".join(lines)
