import pytest

from cnnlab.config import resolve
from cnnlab.errors import CnnlabError


def test_seed_preset_is_the_report():
    mnist = resolve("lenet5", "mnist", overrides={"preset": "seed"})
    assert (mnist.batch_size, mnist.optimizer, mnist.lr, mnist.momentum) == (64, "sgd", 0.001, 0.9)
    assert mnist.schedule == "constant" and not mnist.normalize and mnist.augment == "none"
    assert 64 <= mnist.epochs <= 100
    cifar = resolve("resnet18", "cifar10", overrides={"preset": "seed"})
    assert (cifar.lr, cifar.epochs, cifar.batch_size) == (0.01, 30, 64)


def test_fast_preset_defaults():
    lenet = resolve("lenet5", "mnist")
    assert lenet.preset == "fast" and lenet.epochs <= 3 and lenet.augment == "none"
    cifar = resolve("resnet18", "cifar10")
    assert cifar.augment == "crop,flip" and cifar.label_smoothing > 0
    assert cifar.schedule in ("onecycle", "cosine") and cifar.normalize
    assert resolve("resnet18", "folder:x").augment == "none"


def test_precedence_cli_beats_file_beats_preset(tmp_path):
    from cnnlab.config import load_toml

    path = tmp_path / "c.toml"
    path.write_text('epochs = 7\nbatch-size = 32\nlr = 0.5\npreset = "seed"\n')
    cfg = resolve("lenet5", "mnist", file_values=load_toml(path),
                  overrides={"lr": 0.2, "epochs": None})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.preset) == (7, 32, 0.2, "seed")
    assert cfg.momentum == 0.9 and cfg.schedule == "constant"  # from the seed preset


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", "/somewhere")
    assert resolve("lenet5", "mnist").data_dir == "/somewhere"
    assert resolve("lenet5", "mnist", overrides={"data_dir": "/x"}).data_dir == "/x"
    monkeypatch.delenv("CNNLAB_DATA")
    assert resolve("lenet5", "mnist").data_dir == "data"


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
    ({"epochs": 2.5}, "epochs must be int"),
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
