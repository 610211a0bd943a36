"""cnnlab: train classic convolutional networks fast, with run directories you can trust.

    >>> import cnnlab
    >>> summary = cnnlab.train("lenet5", "mnist", epochs=1)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import option_values
from .config import load_toml, resolve
from .resume import resume_config

__version__ = "0.1.0"


def train(model: str | None = None, dataset: str | None = None, *,
          config: str | Path | None = None, out: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True, **options: Any) -> dict:
    """Train `model` on `dataset` exactly as `cnnlab train` does and return the summary dict.

    `options` are the command-line options with underscores (epochs=3, lr=0.01,
    batch_size=128, preset="seed", ...); they beat the `config` TOML file, which beats the
    preset. `resume=RUN_DIR` continues an interrupted run, or finishes one whose plots or
    summary are missing (only options that cannot change the result may change).
    Raises CnnlabError on bad input.
    """

    file_values = option_values(load_toml(config), "config file key") if config else {}
    if resume is not None:
        from .trainer import fit

        cfg, how = resume_config(resume, options, model=model, dataset=dataset,
                                 file_values=file_values, out=out)
        return fit(cfg, resume, progress=progress, resume=how)
    cfg = resolve(model, dataset, file_values=file_values, overrides=options)
    from .trainer import fit  # torch: only once the options are known to be good

    return fit(cfg, out, progress=progress)


__all__ = ["train", "__version__"]
