"""The user's own model (path/to/net.py:Class, package.module:function, an instance from
Python) through every command, the refusal of code that is not the user's own, one line for
each classic mistake of hand-written models; torchvision's and timm's models by name, with
published weights served here the way torchvision fetches them."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch

import cnnlab
from cnnlab.checkpoint import load
from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.models import code, create_model, hub
from cnnlab.runs import MODEL_SOURCE

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN for 28x28 images."""

    def __init__(self, in_channels, num_classes, width=8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width * 14 * 14, num_classes)

    def forward(self, x):
        return self.fc(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def build(num_classes, width=4):
    return Net(1, num_classes, width)
'''

# The lab report's own mistakes, each a module, with what its one line must say
FAULTS = {
    "Wide": ("self.fc = nn.Linear(4 * 28 * 28, 1000)", "x = self.fc(x)",
             "returns 1000 scores per image; mnist has 10 classes"),
    "Lazy": ("pass", "self.fc = nn.Linear(x.shape[1], 10)\n        x = self.fc(x)",
             "creates fc inside forward"),
    "Local": ("pass", "x = nn.Linear(x.shape[1], 10)(x)", "makes a tensor that requires "
                                                          "gradients (10x3136) inside forward"),
    "Chatty": ("self.fc = nn.Linear(4 * 28 * 28, 10)", "print('x is', x.shape)\n        "
                                                       "x = self.fc(x)", "forward prints"),
    "Misfit": ("self.fc = nn.Linear(400, 10)", "x = self.fc(x)",
               "does not fit 1x28x28 images: at fc (Linear), input 3136"),
}


def _faulty(name: str, init: str, forward: str) -> str:
    return f'''
class {name}(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        {init}

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        {forward}
        return x
'''


@pytest.fixture
def net(tmp_path) -> Path:
    path = tmp_path / "mine" / "net.py"
    path.parent.mkdir()
    path.write_text(NET + "".join(_faulty(k, *v[:2]) for k, v in FAULTS.items()))
    return path


def _train(*args: str) -> int:
    return main(["train", *args, "--quiet", "--batch-size", "64", "--eval-batch-size", "128",
                 "--telemetry", "0"])


def test_a_model_file_trains_and_every_command_rebuilds_it(net, tiny_mnist, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(f"{net}:Net", "mnist", "--data-dir", str(tiny_mnist), "--model-arg",
                  "width=4", "--epochs", "1", "--schedule", "constant", "--out", str(run)) == 0
    capsys.readouterr()
    kept = (run / MODEL_SOURCE).read_bytes()
    assert kept == net.read_bytes()
    meta = load(run / "best.pt")["model_meta"]
    assert meta["source"]["sha256"] == hashlib.sha256(kept).hexdigest()
    assert meta["options"] == {"width": 4}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == f"{net}:Net" and config["model_args"] == "width=4"
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 10
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert main(["report", str(run), "--no-eval"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert main(["summary", f"{net}:build", "mnist", "--model-arg", "width=2"]) == 0
    assert "parameters: 3,950" in capsys.readouterr().out  # 2*9+2 + 2*14*14*10+10


def test_code_that_is_not_the_users_own_is_refused_unless_trusted(net, tiny_mnist, tmp_path,
                                                                    capsys):
    """Loading a model runs its code: only the user's own file, unchanged, runs unasked."""
    run = tmp_path / "run"
    assert _train(f"{net}:Net", "mnist", "--data-dir", str(tiny_mnist), "--epochs", "0.2",
                  "--out", str(run)) == 0
    capsys.readouterr()

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["eval", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    original = net.read_text()
    net.write_text(original + "\nprint('changed')\n")  # the user's file changed since
    assert "net.py has changed since the run was trained" in refused()
    assert main(["eval", str(run), "--trust-code"]) == 0  # runs the run's copy
    assert "changed" not in capsys.readouterr().out
    net.unlink()  # a run sent from elsewhere: its file is not here
    assert "which is not on this machine" in refused()
    assert main(["eval", str(run), "--trust-code"]) == 0
    net.write_text(original)
    assert main(["eval", str(run)]) == 0
    trained_with = Path(os.environ["CNNLAB_CACHE"]) / "trained-models.txt"
    kept = trained_with.read_text()
    trained_with.write_text("")  # a run sent by someone else, naming a file here
    assert "which this user has not trained with on this machine" in refused()
    trained_with.write_text(kept)
    (run / MODEL_SOURCE).write_text(original + "\nimport os  # tampered\n")
    assert "is not the source the run recorded" in refused()


@pytest.mark.parametrize("fault", FAULTS)
def test_each_classic_mistake_is_one_line(fault, net, tiny_mnist, tmp_path):
    with pytest.raises(CnnlabError, match=FAULTS[fault][2].replace("(", r"\(")
                       .replace(")", r"\)")):
        cnnlab.train(f"{net}:{fault}", "mnist", data_dir=str(tiny_mnist), epochs=0.1,
                     out=tmp_path / "run", progress=False)


def test_a_module_function_and_an_instance_from_python(net, tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(net.parent.parent))
    (net.parent / "__init__.py").write_text("")
    first = cnnlab.train("mine.net:build", "mnist", data_dir=str(tiny_mnist), epochs=0.2,
                         out=tmp_path / "module", progress=False, model_args={"width": 2})
    assert load(tmp_path / "module" / "best.pt")["model_meta"]["source"]["module"] == "mine.net"
    from mine.net import Net  # an instance of the user's class, as a notebook makes it

    second = cnnlab.train(Net(1, 10, width=2), "mnist", data_dir=str(tiny_mnist), epochs=0.2,
                          out=tmp_path / "instance", progress=False, model_args={"width": 2})
    assert second["model"].endswith("net.py:Net")
    for run in (first, second):
        assert main(["eval", run["run_dir"]]) == 0
    with pytest.raises(CnnlabError, match="pass the arguments it was built with"):
        cnnlab.train(Net(1, 10, width=3), "mnist", data_dir=str(tiny_mnist), epochs=0.2,
                     out=tmp_path / "other", progress=False)
    for name, message in ((f"{net}:Nope", "has no class or function Nope; it defines .*Net"),
                          (f"{net}:build", "takes no argument 'depth'"),
                          (f"{tmp_path}/none.py:Net", "model file not found"),
                          ("mine.nothing:Net", "mine.nothing is not an importable")):
        with pytest.raises(CnnlabError, match=message):
            cnnlab.train(name, "mnist", data_dir=str(tiny_mnist), epochs=0.2, progress=False,
                         out=tmp_path / "x", model_args="depth=2" if "build" in name else None)


def test_model_arguments_are_python_literals_or_words():
    assert code.parse_args("width=64, act=relu, sizes=(16, 32), bn=false, p=0.5") == {
        "width": 64, "act": "relu", "sizes": (16, 32), "bn": False, "p": 0.5}
    assert code.parse_args(code.args_text({"a": (1, 2), "b": "x"})) == {"a": (1, 2), "b": "x"}
    for bad in ("64", "width", "w=f(1)", "**x"):
        with pytest.raises(CnnlabError, match="--model-arg"):
            code.parse_args(bad)


# ---- torchvision and timm ------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A local server of published weights; torch's cache in the test's folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _publish(served: Path, base: str, state: dict, monkeypatch, stem: str = "mnv3",
             right_hash: bool = True) -> None:
    file = served / "weights.pth"
    torch.save(state, file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:8] if right_hash else "00000000"
    name = f"{stem}-{digest}.pth"  # torch.hub checks the digits after the last '-'
    file.rename(served / name)
    monkeypatch.setattr(hub, "published_url", lambda weights: f"{base}/{name}")


def test_torchvision_pretrained_weights_are_fetched_checked_and_fine_tuned(
        weights_server, tiny_mnist, tmp_path, monkeypatch):
    import torchvision

    served, base = weights_server
    published = torchvision.models.mobilenet_v3_small().state_dict()
    _publish(served, base, published, monkeypatch)
    model = create_model("torchvision:mobilenet_v3_small", in_channels=1, num_classes=10,
                         image_size=(28, 28), pretrained=True)
    state = model.state_dict()
    stem, head = "features.0.0.weight", "classifier.3.weight"
    assert torch.equal(state[stem], published[stem].sum(dim=1, keepdim=True))
    assert state[head].shape == (10, 1024)
    assert all(torch.equal(state[k], v) for k, v in published.items()
               if k not in (stem, head, "classifier.3.bias"))
    assert any(Path(tmp_path, "torch-home", "hub", "checkpoints").iterdir())  # torch's cache
    summary = cnnlab.train("torchvision:mobilenet_v3_small", "mnist", pretrained=True,
                           data_dir=str(tiny_mnist), epochs=0.2, out=tmp_path / "run",
                           progress=False)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert main(["eval", summary["run_dir"]]) == 0  # rebuilt without the published weights


def test_damaged_or_unreachable_weights_are_one_line(weights_server, monkeypatch, tmp_path):
    import torchvision

    served, base = weights_server
    _publish(served, base, torchvision.models.squeezenet1_1().state_dict(), monkeypatch,
             "sq", right_hash=False)
    with pytest.raises(CnnlabError, match="downloaded weights are damaged"):
        create_model("torchvision:squeezenet1_1", in_channels=3, num_classes=10,
                     image_size=(64, 64), pretrained=True)
    monkeypatch.setattr(hub, "published_url", lambda weights: "http://127.0.0.1:9/sq-1.pth")
    with pytest.raises(CnnlabError, match=r"cannot download .* put sq-1.pth in "):
        create_model("torchvision:squeezenet1_1", in_channels=3, num_classes=10,
                     image_size=(64, 64), pretrained=True)


def test_named_models_are_built_for_the_data(tmp_path):
    model = create_model("torchvision:squeezenet1_1", in_channels=1, num_classes=7,
                         image_size=(64, 64))
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 7)
    with pytest.raises(CnnlabError, match="did you mean resnet18"):
        create_model("torchvision:resnet19", in_channels=3, num_classes=10, image_size=(32, 32))
    timm = pytest.importorskip("timm")
    model = create_model("timm:resnet10t", in_channels=1, num_classes=5, image_size=(32, 32))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    assert "resnet10t" in timm.list_models()


def test_model_options_are_refused_where_they_mean_nothing(tiny_mnist):
    for name, options, message in (
            ("lenet5", {"pretrained": True}, "--pretrained loads the published weights"),
            ("lenet5", {"model_args": "width=2"}, "--model-arg is for your own"),
            ("torchvision:", {}, "name the model")):
        with pytest.raises(CnnlabError, match=message):
            cnnlab.train(name, "mnist", data_dir=str(tiny_mnist), progress=False, **options)


def test_a_sweep_and_lr_find_take_a_model_file(net, tiny_mnist, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid",
                 f"model=lenet5,{net}:Net", "--epochs", "0.2", "--telemetry", "0", "--quiet",
                 "--out", str(out)]) == 0
    results = (out / "results.md").read_text()
    assert "# Sweep: lenet5, net.py:Net on mnist" in results and "| net.py:Net | 1 |" in results
    assert main(["lr-find", f"{net}:Net", "mnist", "--data-dir", str(tiny_mnist), "--steps",
                 "20", "--quiet", "--out", str(tmp_path / "lr")]) == 0
    assert (tmp_path / "lr" / "lr_find.json").is_file()


def test_cnnlab_models_all_names_torchvisions_and_timms(capsys):
    assert main(["models", "--all"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:NAME (" in out and "resnet50, resnext101_32x8d" in out
    assert "your own: path/to/net.py:Class" in out
    assert "timm:NAME: " in out
