"""`--resume`: a run directory to continue, its saved configuration checked and the
changes a resumed run may make applied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import Damaged, config_fields, typed_value, validate
from .config import default_data_dir
from .errors import CnnlabError
from .options import RESUME_SAFE, Config, option_name
from .runs import CHECKPOINT, CONFIG, SUMMARY, DamagedFile, RunDir, read_object


@dataclass(frozen=True)
class Resume:
    """A run directory to continue: from its checkpoint, or from the start when the run
    stopped before it wrote one."""

    checkpoint: dict | None
    trust_code: bool = False  # run the run's copy of its model's code, whatever its file says


def resume_config(run_dir: str | Path, overrides: dict, *, model: str | None = None,
                  dataset: str | None = None, file_values: dict | None = None,
                  out: str | Path | None = None, trust_code: bool = False
                  ) -> tuple[Config, Resume]:
    """The run's own configuration, with only the changes that are safe to make, and where
    to continue from. What a resumed run cannot honour - another model, dataset or --out,
    options that would change the result - is refused, whether given as options, as
    `file_values` (a --config file) or as arguments."""
    from . import checkpoint

    path = Path(run_dir)
    if out is not None and Path(out).resolve() != path.resolve():
        raise CnnlabError(f"--out {out} differs from the run being resumed ({run_dir}); a "
                          "resumed run stays in its directory (drop --out)")
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a run directory"
        within = (f" (the run directory is {path.parent})"
                  if path.exists() and (path.parent / CONFIG).is_file() else "")
        raise CnnlabError(f"nothing to resume at {run_dir}: it {what}{within}")
    if (path / CHECKPOINT).is_file():
        ckpt = checkpoint.load_for_resume(path)
        try:
            saved, epochs_done = config_fields(ckpt["config"], "config."), ckpt["epoch"]
        except Damaged as e:
            raise checkpoint.damaged(path / CHECKPOINT, str(e)) from None
        RunDir.check_metrics(path, ckpt["metrics_offset"])  # before anything is written
    elif (path / CONFIG).is_file():  # stopped before its first checkpoint
        saved, epochs_done, ckpt = _saved_config(path), 0, None
    else:
        raise CnnlabError(f"nothing to resume in {run_dir}: it holds no run (no config.json "
                          "or checkpoint.pt)")
    given = {"model": model, "dataset": dataset}
    values = dict(saved)
    options = {k: v for k, v in overrides.items() if v is not None}  # beat the file's
    for key, value in {**given, **(file_values or {}), **options}.items():
        if key == "data_dir" and value is not None:
            value = default_data_dir(value)  # stored absolute, as a new run's
        if value is None or value == saved.get(key):
            continue
        if key not in RESUME_SAFE:
            what = key.upper() if key in given else f"--{option_name(key)}"
            raise CnnlabError(f"{what} {value} differs from the run's {saved.get(key)}; a "
                              "resumed run keeps its configuration (start a new run to "
                              "change it)")
        if key == "epochs" and (value < epochs_done or saved["schedule"] != "constant"
                                or not float(saved["epochs"]).is_integer()):
            raise CnnlabError(f"--epochs {value}: a resumed run may only add epochs, and only "
                              f"with the constant schedule after whole epochs (this run's "
                              f"schedule, '{saved['schedule']}', was laid out for "
                              f"{saved['epochs']})")
        values[key] = typed_value(key, value)  # as resolve() types a new run's options
    cfg = Config(**values)
    validate(cfg)
    if epochs_done >= cfg.epochs and (path / SUMMARY).is_file():
        raise CnnlabError(f"{run_dir} already finished its {cfg.epochs} epochs; pass --epochs N "
                          "to train more (constant schedule only) or start a new run")
    return cfg, Resume(ckpt, trust_code)


def _saved_config(path: Path) -> dict[str, Any]:
    """The Config fields of a run directory's config.json (the device as asked; an earlier
    version's config.json holds the device that ran)."""
    file = path / CONFIG
    try:
        return config_fields(read_object(file, missing_ok=False))
    except (DamagedFile, ValueError) as e:  # unreadable, not JSON, or a field missing or mistyped
        why = f" ({e})" if isinstance(e, Damaged) else ""
        raise CnnlabError(f"{file} is damaged{why}; this run cannot be resumed - start a new "
                          "one") from None
