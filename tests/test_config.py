import re
from pathlib import Path

import pytest

from cnnlab.config import resolve
from cnnlab.errors import CnnlabError


def _recipe(cfg):
    return (cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov,
            cfg.weight_decay, cfg.schedule, cfg.label_smoothing, cfg.augment, cfg.normalize,
            cfg.tta)


def test_seed_preset_is_the_report():
    """The lab report's recipe (docs/training.md "Presets", SEED.md): ToTensor only, batch 64, SGD
    momentum 0.9, constant lr 0.001 for 64 epochs (MNIST) or 0.01 for 30 (CIFAR-10)."""
    mnist = resolve("lenet5", "mnist", overrides={"preset": "seed"})
    assert _recipe(mnist) == (64, 64, "sgd", 0.001, 0.9, False, 0.0, "constant", 0.0, "none",
                              False, "none")
    cifar = resolve("resnet18", "cifar10", overrides={"preset": "seed"})
    assert _recipe(cifar) == (30, 64, "sgd", 0.01, 0.9, False, 0.0, "constant", 0.0, "none",
                              False, "none")


def test_fast_preset_defaults():
    """docs/training.md, "Presets": LeNet-5 trains 1.5 epochs with SGD Nesterov, one-cycle lr
    0.1, batch 64, label smoothing 0.1; ResNet-18 on CIFAR-10 with crop+flip, one-cycle,
    label smoothing 0.1, batch 512, scored with flip TTA; digits and folders are not
    mirrored."""
    lenet = resolve("lenet5", "mnist")
    assert lenet.preset == "fast"
    assert _recipe(lenet) == (1.5, 64, "sgd", 0.1, 0.9, True, 5e-4, "onecycle", 0.1, "none",
                              True, "none")
    cifar = resolve("resnet18", "cifar10")
    assert (cifar.augment, cifar.schedule, cifar.label_smoothing, cifar.batch_size,
            cifar.normalize, cifar.tta) == ("crop,flip", "onecycle", 0.1, 512, True, "flip")
    folder = resolve("resnet18", "folder:x")
    assert (folder.augment, folder.tta) == ("none", "none")


def test_precedence_cli_beats_file_beats_preset(tmp_path):
    from cnnlab.config import load_toml

    path = tmp_path / "c.toml"
    path.write_text('epochs = 7\nbatch-size = 32\nlr = 0.5\npreset = "seed"\n')
    cfg = resolve("lenet5", "mnist", file_values=load_toml(path),
                  overrides={"lr": 0.2, "epochs": None})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.preset) == (7, 32, 0.2, "seed")
    assert cfg.momentum == 0.9 and cfg.schedule == "constant"  # from the seed preset


def test_data_dir_from_environment(monkeypatch, tmp_path):
    """--data-dir, else $CNNLAB_DATA, else ./data: always stored as an absolute path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNNLAB_DATA", "/somewhere")
    assert resolve("lenet5", "mnist").data_dir == "/somewhere"
    assert resolve("lenet5", "mnist", overrides={"data_dir": "/x"}).data_dir == "/x"
    assert resolve("lenet5", "mnist", overrides={"data_dir": "mine"}).data_dir == \
        str(Path.cwd() / "mine")
    monkeypatch.setenv("CNNLAB_DATA", "shared")
    assert resolve("lenet5", "mnist").data_dir == str(Path.cwd() / "shared")
    monkeypatch.delenv("CNNLAB_DATA")
    assert resolve("lenet5", "mnist").data_dir == str(Path.cwd() / "data")


@pytest.mark.parametrize("overrides,message", [
    ({"lr": 0}, "--lr must be positive"),
    ({"lr": -1.0}, "--lr must be positive"),
    ({"batch_size": 0}, "--batch-size must be positive"),
    ({"epochs": -2}, "--epochs must be positive"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of sgd"),
    ({"schedule": "poly"}, "unknown schedule"),
    ({"augment": "rotate"}, "unknown augment"),
    ({"pool": "min"}, "unknown pool"),
    ({"preset": "slow"}, "unknown preset 'slow'"),
    ({"label_smoothing": 1.5}, "label-smoothing"),
    ({"epochs": "two"}, "epochs must be float"),
    ({"val_split": 1.0}, "--val-split must be a fraction"),
    ({"muon_lr": 0}, "--muon-lr must be positive"),
    ({"muon_momentum": 1}, "--muon-momentum must be below 1, got 1"),
    ({"muon_momentum": -0.1}, "--muon-momentum must be at least 0"),
])
def test_validation(overrides, message):
    with pytest.raises(CnnlabError, match=message):
        resolve("lenet5", "mnist", overrides=overrides)


def test_bad_config_files(tmp_path):
    from cnnlab.config import load_toml

    with pytest.raises(CnnlabError, match="config file not found"):
        load_toml(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(CnnlabError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(CnnlabError, match="unknown config file key 'epoch'"):
        resolve("lenet5", "mnist", file_values={"epoch": 3})


def test_cnnlab_device_replaces_the_default_device(monkeypatch):
    monkeypatch.delenv("CNNLAB_DEVICE")
    assert resolve("lenet5", "mnist").device == "auto"
    monkeypatch.setenv("CNNLAB_DEVICE", "cuda:1")
    assert resolve("lenet5", "mnist").device == "cuda:1"
    assert resolve("lenet5", "mnist", file_values={"device": "cpu"}).device == "cpu"
    assert resolve("lenet5", "mnist", overrides={"device": "cpu"}).device == "cpu"
    from cnnlab.devices import default_device  # eval, predict and report too

    assert (default_device(), default_device("cpu")) == ("cuda:1", "cpu")


def test_the_fast_preset_with_muon_gives_its_own_values_and_the_users_win(tmp_path):
    from cnnlab.config import load_toml

    sgd = resolve("fastnet", "cifar10")
    muon = resolve("fastnet", "cifar10", overrides={"optimizer": "muon"})
    assert (sgd.epochs, muon.epochs, muon.muon_lr, muon.muon_momentum) == (10, 8, 0.24, 0.6)
    assert muon.optimizer == "muon" and _recipe(muon)[3:] == _recipe(sgd)[3:]  # lr 1.5, ...
    assert muon.batch_size == sgd.batch_size == 1024
    assert (muon.norm_lr_scale, muon.lookahead) == (sgd.norm_lr_scale, sgd.lookahead)
    mine = resolve("fastnet", "cifar10", overrides={"optimizer": "muon", "epochs": "3",
                                                    "muon_lr": "0.1"})
    assert (mine.epochs, mine.muon_lr, mine.muon_momentum) == (3, 0.1, 0.6)
    path = tmp_path / "c.toml"
    path.write_text('optimizer = "muon"\nmuon-momentum = 0.7\n')
    from_file = resolve("fastnet", "cifar10", file_values=load_toml(path))
    assert (from_file.optimizer, from_file.epochs, from_file.muon_momentum) == ("muon", 8, 0.7)
    lenet = resolve("lenet5", "mnist", overrides={"optimizer": "muon"})
    assert (lenet.epochs, lenet.lr, lenet.muon_lr, lenet.muon_momentum) == (1.5, 0.1, 0.01, 0.89)


def test_muon_is_refused_where_torch_lacks_it_and_with_cuda_graph(monkeypatch):
    import torch

    if hasattr(torch.optim, "Muon"):
        with pytest.raises(CnnlabError, match=r"^--cuda-graph needs a fused optimiser step: "
                                              "sgd, adam or adamw with --fused, not "
                                              "--optimizer muon$"):
            resolve("fastnet", "cifar10", overrides={"optimizer": "muon", "cuda_graph": True})
        monkeypatch.delattr(torch.optim, "Muon")
    message = (r"^--optimizer muon needs torch >= 2\.9 \(torch\.optim\.Muon\); this is torch "
               + re.escape(torch.__version__) + "$")
    with pytest.raises(CnnlabError, match=message):
        resolve("lenet5", "mnist", overrides={"optimizer": "muon"})
    resolve("lenet5", "mnist", overrides={"optimizer": "sgd"})  # the others need nothing new


def test_old_runs_read_with_the_muon_options_at_their_defaults():
    from cnnlab.checks import config_fields

    saved = resolve("lenet5", "mnist").to_dict()
    del saved["muon_lr"], saved["muon_momentum"]  # written before the options existed
    assert (config_fields(saved)["muon_lr"], config_fields(saved)["muon_momentum"]) == (0.24, 0.6)
