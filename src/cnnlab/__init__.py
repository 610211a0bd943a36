"""cnnlab: train classic convolutional networks fast, with run directories you can trust.

    >>> import cnnlab
    >>> summary = cnnlab.train("lenet5", "mnist", epochs=1)   # doctest: +SKIP
    >>> summary = cnnlab.train(MyNet(), "mnist", epochs=3)    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import option_values
from .config import load_toml, resolve
from .errors import CnnlabError
from .models import code
from .resume import resume_config

__version__ = "0.1.0"


def train(model: Any = None, dataset: str | None = None, *,
          config: str | Path | None = None, out: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True, trust_code: bool = False,
          **options: Any) -> dict:
    """Train `model` on `dataset` exactly as `cnnlab train` does and return the summary dict.

    `dataset` is a name as the command line takes it, or data a notebook holds:
    `(x_train, y_train, x_test, y_test)` arrays or tensors (images uint8 or floats in [0, 1]),
    or `(train, test)` torch Datasets of (image, label); resuming such a run takes the same
    data again.
    `model` is a name as the command line takes it ("lenet5", "torchvision:resnet50",
    "path/to/net.py:Net") or an nn.Module instance: it trains that instance, and the run
    rebuilds it later from its class (the dataset's facts and `model_args` its arguments).

    `options` are the command-line options with underscores (epochs=3, lr=0.01,
    batch_size=128, preset="seed", ...); they beat the `config` TOML file, which beats the
    preset. `resume=RUN_DIR` continues an interrupted run, or finishes one whose plots or
    summary are missing (only options that cannot change the result may change).
    `trust_code`: with `resume`, run the run's copy of its model's code even where the file
    it came from is not the user's own or has changed.
    Raises CnnlabError on bad input.
    """
    instance = data = None
    if model is not None and not isinstance(model, str):
        instance, model = model, _instance_name(model)
    if dataset is not None and not isinstance(dataset, str):  # arrays or torch Datasets
        from .data import from_python

        data = from_python(dataset)
        dataset = data.name
    if isinstance(options.get("model_args"), dict):
        options["model_args"] = code.args_text(options["model_args"])

    file_values = option_values(load_toml(config), "config file key") if config else {}
    if resume is not None:
        from .trainer import fit

        cfg, how = resume_config(resume, options, model=model, dataset=dataset,
                                 file_values=file_values, out=out, trust_code=trust_code)
        return fit(cfg, resume, progress=progress, resume=how, instance=instance, data=data)
    cfg = resolve(model, dataset, file_values=file_values, overrides=options)
    from .trainer import fit  # torch: only once the options are known to be good

    return fit(cfg, out, progress=progress, instance=instance, data=data)


def _instance_name(model: Any) -> str:
    """The name a run records for an nn.Module instance: its class's file and name."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise CnnlabError(f"model must be a name or an nn.Module, not a "
                          f"{type(model).__name__}")
    source, _ = code.of_instance(model)
    return f"{source.file or '__main__'}:{source.attr}"


__all__ = ["train", "__version__"]
