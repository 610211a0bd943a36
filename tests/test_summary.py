"""`cnnlab summary`: each layer's output shape, parameters and multiply-adds (torch's flop
counter), the output-size formula of convolutions and poolings, the totals; and the one-line
refusal, in `summary` and `train` alike, of a model whose layers do not fit the images."""

import json

import pytest
import torch
from conftest import write_folder

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.summary import check_shapes, summarize


def _layer(summary: dict, name: str) -> dict:
    return next(layer for layer in summary["layers"] if layer["name"] == name)


def test_lenet5_on_mnist(capsys):
    summary = summarize("lenet5", "mnist")
    assert summary["input"] == [1, 28, 28] and summary["classes"] == 10
    assert summary["parameters"] == summary["trainable_parameters"] == 61_706
    assert summary["macs"] == pytest.approx(0.42e6, rel=0.05)
    assert _layer(summary, "features.0")["formula"] == ["(28 + 2*2 - 5)/1 + 1 = 28"]
    assert _layer(summary, "features.4")["formula"] == ["(10 + 2*0 - 2)/2 + 1 = 5"]
    assert _layer(summary, "classifier.0")["output"] == [400]
    assert main(["summary", "lenet5", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "features.0 (Conv2d): (28 + 2*2 - 5)/1 + 1 = 28" in out
    assert "parameters: 61,706 (trainable 61,706)" in out
    assert "multiply-adds per image: 416,520 (0.42 M" in out


def test_resnet18_on_cifar10_shows_every_block():
    summary = summarize("resnet18", "cifar10")
    assert summary["parameters"] == 11_173_962
    assert summary["macs"] == pytest.approx(0.56e9, rel=0.05)
    blocks = [layer for layer in summary["layers"] if layer["block"]]
    assert [b["output"] for b in blocks[1::2]] == [[64, 32, 32], [128, 16, 16],
                                                  [256, 8, 8], [512, 4, 4]]
    assert sum(b["macs"] for b in blocks) + _layer(summary, "conv1")["macs"] + \
        _layer(summary, "fc")["macs"] == summary["macs"]
    assert _layer(summary, "layer2.0.conv1")["formula"] == ["(32 + 2*1 - 3)/2 + 1 = 16"]


def test_folder_dataset_as_json(tmp_path, capsys):
    root = write_folder(tmp_path / "pets", size=24)
    code = main(["summary", "lenet5", f"folder:{root}", "--image-size", "20x16", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input"] == [3, 20, 16] and summary["classes"] == 3
    assert _layer(summary, "classifier.5")["output"] == [3]
    assert _layer(summary, "features.0")["formula"] == ["height (20 + 2*2 - 5)/1 + 1 = 20",
                                                        "width (16 + 2*2 - 5)/1 + 1 = 16"]
    assert main(["summary", "resnet18", "mnist", "--image-size", "64"]) == 2
    assert "folder datasets" in capsys.readouterr().err


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("model,where", [
    ("lenet5", "LeNet-5 needs images of at least 12x12, got 8x8: at features.3 (Conv2d) the "
               "6x4x4 input is smaller than its 5x5 kernel"),  # its builder refuses at once
    ("fastnet", "fastnet does not fit 3x8x8 images: at groups.2.block.1 (MaxPool2d), "
                "input 256x1x1 (torch: "),
])
def test_too_small_images_are_refused_in_one_line(tmp_path, capsys, model, where):
    root = write_folder(tmp_path / "tiny", size=8, n_train=2, n_test=1)
    assert where in _refused(capsys, ["summary", model, f"folder:{root}"])
    line = _refused(capsys, ["train", model, f"folder:{root}", "--epochs", "1", "--quiet",
                             "--out", str(tmp_path / "run")])
    assert where in line
    assert not (tmp_path / "run" / "config.json").exists()


def test_check_shapes_changes_nothing():
    torch.manual_seed(0)
    model = create_model("fastnet", in_channels=3, num_classes=10, image_size=(32, 32))
    model.groups[0].block[2].eval()  # one module's own mode is kept, as the others'
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_shapes(model, (3, 32, 32), "fastnet")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and not model.groups[0].block[2].training
    with pytest.raises(CnnlabError, match=r"at stem\.0 \(Conv2d\), input 3x1x1 "):
        check_shapes(model, (3, 1, 1), "fastnet")
    assert model.training and all(h == {} for m in model.modules()
                                  for h in (m._forward_hooks, m._forward_pre_hooks))


def test_a_closed_pipe_ends_quietly():
    """`cnnlab summary ... | head -1`: the reader has its line; cnnlab says nothing more."""
    import subprocess
    import sys

    done = subprocess.run(f"set -o pipefail; {sys.executable} -m cnnlab summary resnet18 "
                          "cifar10 | head -1", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "resnet18 on cifar10: input 3x32x32, 10 classes\n"
    assert (done.returncode, done.stderr) == (0, "")
