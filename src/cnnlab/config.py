"""A new run's configuration, resolved: preset < config file < command line, validated;
and config.json's schema (the options as asked, and under "resolved" what ran).

Everything a run did is in `Config` (options.py), which is written to the run directory and
travels inside every checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import option_values, typed_value, validate
from .devices import default_device
from .errors import CnnlabError
from .models import checked_name
from .options import OPTIONS, Config
from .presets import fast_tta, preset_values

if TYPE_CHECKING:  # torch is imported where a device is resolved: --help stays light
    import torch

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def default_data_dir(value: str | os.PathLike | None = None) -> str:
    """The data root as an absolute path: `value`, else $CNNLAB_DATA, else ./data."""
    return os.path.abspath(value or os.environ.get("CNNLAB_DATA") or "data")


def data_dir_for(given: str | os.PathLike | None, trained: dict[str, Any]) -> str:
    """The data root of a command that uses a trained model: `given` (its --data-dir), else
    the one the model was trained on (`trained`: its saved config), else the default."""
    return default_data_dir(given or trained.get("data_dir"))


CONFIG_FILE_MAX = 1 << 20  # bytes: a configuration or sweep file is far smaller


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file, its keys as the file spells them (option_values makes them field
    names, so that a message can quote a wrong key as it is written)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_file() and not p.is_dir():  # a device, a FIFO: never opened
            raise CnnlabError(f"config file {p} is not a regular file; give a TOML file")
        with p.open("rb") as f:
            text = f.read(CONFIG_FILE_MAX + 1)
        if len(text) > CONFIG_FILE_MAX:
            raise CnnlabError(f"config file {p} is larger than a configuration can be (at most "
                              f"{CONFIG_FILE_MAX:,} bytes); give the right file")
        raw = tomllib.loads(text.decode())
    except FileNotFoundError:
        raise CnnlabError(f"config file not found: {p}") from None
    except OSError as e:  # a folder, a path through a file, no permission
        raise CnnlabError(f"cannot read config file {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CnnlabError(f"config file {p} is not valid TOML: {e}") from None
    return raw


def resolve(model: str, dataset: str, *, file_values: dict[str, Any] | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config for a new run: preset < file < overrides (None values are
    ignored). Keys are field names, or option names ('-' for '_'). Overrides may be text
    (as from a command line); a file's numbers must be numbers."""
    overrides = option_values({k: v for k, v in (overrides or {}).items() if v is not None},
                              "option")
    file_values = option_values(file_values or {}, "config file key")
    preset = overrides.get("preset") or file_values.get("preset") or OPTIONS["preset"].default
    optimizer = next((typed_value("optimizer", source["optimizer"], text=source is overrides)
                      for source in (overrides, file_values) if "optimizer" in source), None)
    values: dict[str, Any] = preset_values(preset, model, dataset, optimizer)
    for source in (file_values, overrides):  # a file's values are typed; options may be text
        for key, value in source.items():
            values[key] = typed_value(key, value, text=source is overrides)
    if "tta" not in values:  # the fast preset scores flip-trained models on both mirror images
        values["tta"] = fast_tta(values["augment"]) if preset == "fast" else "none"
    values["data_dir"] = default_data_dir(values.get("data_dir"))
    values["device"] = default_device(values.get("device"))
    cfg = Config(model=checked_name(model), dataset=dataset, **values)
    validate(cfg)
    return cfg


def run_config(cfg: Config, device: torch.device | str, precision: str,
               world_size: int, channels_last: bool) -> dict[str, Any]:
    """A run's config.json: every option as asked (device "auto", precision "auto", ...),
    and under "resolved" what ran: the device, the precision, the number of processes and
    the memory format.
    (Earlier versions wrote the device that ran as "device", and "precision_used" and
    "world_size" beside the options.)"""
    return cfg.to_dict() | {"resolved": {"device": str(device), "precision": precision,
                                         "world_size": world_size,
                                         "channels_last": channels_last}}
