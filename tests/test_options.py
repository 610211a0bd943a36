"""Every Config field a user may set is one command-line option and one TOML key, both made
from the field's metadata, and they mean the same value."""

import dataclasses
import json
import os
import re

import pytest

from cnnlab.cli import build_parser, train_options
from cnnlab.config import default_data_dir, load_toml, resolve
from cnnlab.errors import CnnlabError
from cnnlab.models import MODELS
from cnnlab.options import (
    ARGUMENT,
    COMPARED,
    LISTED,
    MANY,
    OFF,
    ON,
    OPTIONS,
    PRESETS,
    RESUME_SAFE,
    SWITCH,
    format_value,
    option_name,
)
from cnnlab.presets import preset_values
from cnnlab.specs import SPECS

SETTABLE = [o for o in OPTIONS.values() if o.kind != ARGUMENT]
# lenet5 (it has --pool) on cifar10 (the fast preset trains it with flips, so --tta flip is
# allowed and the default): every option can take a value other than the one it has there.
MODEL, DATASET = "lenet5", "cifar10"
TEXTS = {"device": "cuda:1", "checkpoint_every": "500steps", "data_dir": "/data/elsewhere",
         "image_size": "64x48", "model_args": "width=64"}
FOLDER_ONLY = {"image_size"}  # options of folder datasets: tried on one
NAMED_ONLY = {"model_args", "pretrained"}  # options of models by name: tried on one
NAMED = "torchvision:resnet18"


def _flag(o) -> str:
    return f"--{option_name(o.name).removesuffix('s') if o.kind == MANY else option_name(o.name)}"


def _samples():
    """(option, value) pairs: both values of a --x/--no-x switch, the value another flag
    sets, every choice but the one the field has without it, and for numbers and text a
    valid value it does not have."""
    base = resolve(MODEL, DATASET)
    for o in SETTABLE:
        if o.type == "bool":
            values = {SWITCH: [True, False], ON: [True], OFF: [False]}[o.kind]
        elif o.choices:
            values = [c for c in o.choices if c != getattr(base, o.name)]
        else:
            values = [{"int": 7, "float": 0.25}.get(o.type) or TEXTS[o.name]]
        for value in values:
            assert o.kind == SWITCH or value != getattr(base, o.name), o.name
            # photos' resized crops: of a folder, at a size
            needs = {"image_size": "32"} if "resized-crop" in str(value) else {}
            dataset = "folder:x" if o.name in FOLDER_ONLY or needs else DATASET
            yield pytest.param(o.name, value, dataset, needs,
                               id=f"{o.name}={format_value(value)}")


def _argv(name: str, value) -> list[str]:
    flag = _flag(OPTIONS[name])
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    return [flag, format_value(value)]


def _toml(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, str)) else repr(value)


@pytest.mark.parametrize("name,value,dataset,needs", list(_samples()))
def test_flag_field_and_toml_key_round_trip(name, value, dataset, needs, tmp_path):
    model = NAMED if name in NAMED_ONLY else MODEL
    also = [a for k, v in needs.items() for a in _argv(k, v)]
    for command in ("train", "sweep"):
        args = build_parser().parse_args([command, model, dataset, *_argv(name, value), *also])
        given = {k: v for k, v in train_options(args).items() if v is not None}
        assert given == {name: value, **needs} and type(given[name]) is type(value)
        assert getattr(resolve(model, dataset, overrides=given), name) == value
    for key in (option_name(name), name):
        path = tmp_path / "options.toml"
        path.write_text(f"{key} = {_toml(value)}\n")
        values = load_toml(path) | needs
        assert getattr(resolve(model, dataset, file_values=values), name) == value


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_every_settable_field_has_an_option_whose_default_is_none(command):
    options = train_options(build_parser().parse_args([command]))
    assert options == {o.name: None for o in SETTABLE}


def test_model_and_dataset_are_arguments_not_options_or_keys():
    assert [o.name for o in OPTIONS.values() if o.kind == ARGUMENT] == ["model", "dataset"]
    with pytest.raises(CnnlabError, match="unknown config file key 'model'"):
        resolve(MODEL, DATASET, file_values={"model": "resnet18"})


def test_help_names_the_registries(capsys):
    for command in ("train", "sweep"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in [*MODELS, *SPECS, "fastnet"])
        assert all(_flag(o) in text or f"--no-{option_name(o.name)}" in text
                   for o in SETTABLE)


def test_sweep_and_train_each_have_their_own_config_option():
    assert build_parser().parse_args(["sweep", "--config", "s.toml"]).config == "s.toml"
    assert build_parser().parse_args(["train", "--config", "o.toml"]).config == "o.toml"


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_gives_every_value_the_fields_leave_open(preset):
    """Fields without a default take their value from the preset (tta and data_dir from
    resolve), for every model and dataset."""
    open_fields = {o.name for o in OPTIONS.values() if o.default is dataclasses.MISSING}
    for model in MODELS:
        for dataset in [*SPECS, "folder:x"]:
            values = preset_values(preset, model, dataset)
            assert set(values) == open_fields - {"model", "dataset", "tta", "data_dir"}
            assert resolve(model, dataset, overrides={"preset": preset}).preset == preset


def test_roles_classify_the_fields():
    """What a resumed run may change, what sweeps and reports compare and what a results
    table lists, as the roles in the field metadata give them."""
    runtime = {"log_every", "checkpoint_every", "device", "data_dir", "download", "telemetry",
               "tensorboard", "detect_anomaly", "eval_every", "threads", "in_memory", "workers"}
    assert set(RESUME_SAFE) == runtime | {"epochs"}
    assert set(COMPARED) == set(OPTIONS) - runtime
    assert set(LISTED) == set(COMPARED) - {"model", "dataset", "seed", "eval_batch_size", "compile",
                                           "cuda_graph", "skip_bad_files", "sync_bn"}


def test_choices_are_validated_from_the_metadata():
    for o in SETTABLE:
        if o.choices:
            with pytest.raises(CnnlabError, match=re.escape(f"unknown {option_name(o.name)} "
                                                            "'nonsense'") + ".*" + re.escape(
                                                  f"choose one of {', '.join(o.choices)}")):
                resolve(MODEL, DATASET, overrides={o.name: "nonsense"})
    with pytest.raises(CnnlabError, match=f"choose one of {', '.join(MODELS)}"):
        resolve("inception", DATASET)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    assert default_data_dir() == str(tmp_path.resolve() / "data")
    assert default_data_dir("/x/y") == "/x/y"
    monkeypatch.setenv("CNNLAB_DATA", "d")
    assert default_data_dir() == str(tmp_path.resolve() / "d")
    assert default_data_dir("e") == str(tmp_path.resolve() / "e")


def test_version_prefixes_and_where_to_look(capsys):
    from cnnlab import __version__
    from cnnlab.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"cnnlab {__version__}"
    with pytest.raises(SystemExit) as done:  # a prefix of --epochs is not --epochs
        main(["train", "lenet5", "mnist", "--epoch", "1"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == ("cnnlab: error: unrecognized arguments: --epoch "
                                               "1; --epoch: did you mean --epochs? (see "
                                               "'cnnlab train --help')")


# The third-party packages cnnlab defers: `cnnlab --help`, every command's help and an
# option error load none of them (start-up stays fast).
HEAVY = ("torch", "numpy", "optuna", "sqlalchemy", "matplotlib", "captum", "onnx",
         "onnxruntime", "scipy", "PIL", "torchvision")


def test_help_and_argument_errors_do_not_import_heavy_packages():
    import subprocess
    import sys

    check = ("import sys; from cnnlab.cli import main; code = main(ARGV); "
             f"heavy = set({HEAVY!r}) & {{m.split('.')[0] for m in sys.modules}}; "
             "assert not heavy, heavy; print(code)")
    for argv in (["train", "lenet5", "mnist", "--lr", "-1"], ["train", "vgg", "mnist"],
                 ["train", "lenet5", "mnist", "--pool", "mean"],
                 ["train", "resnet18", "mnist", "--pool", "avg"]):
        res = subprocess.run([sys.executable, "-c", check.replace("ARGV", repr(argv))],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == "2", res.stderr
    res = subprocess.run([sys.executable, "-c", "import sys; from cnnlab.cli import build_parser;"
                          " p = build_parser(); p.format_help();"
                          " [c.format_help() for c in p.commands.values()];"
                          f" heavy = set({HEAVY!r}) & {{m.split('.')[0] for m in sys.modules}};"
                          " assert not heavy, heavy"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "cnnlab", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert res.returncode == 0 and "usage: cnnlab" in res.stdout, res.stderr
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines()
              if line.startswith("import time:")}
    assert not set(HEAVY) & loaded, set(HEAVY) & loaded
