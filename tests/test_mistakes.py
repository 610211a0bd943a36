"""The model's mistakes as pictures: cnnlab eval --mistakes (top losses, saliency, confused
pairs, listed in the eval JSON) and the report's Mistakes section."""

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_mnist

import cnnlab
from cnnlab.checkpoint import ModelMeta, load_model
from cnnlab.cli import main
from cnnlab.data import load_dataset
from cnnlab.inference import evaluate_checkpoint, predict_logits, preprocess
from cnnlab.mistakes import Mistakes, files_line, find_mistakes, to_pixels
from cnnlab.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet-5 trained half an epoch on the tiny synthetic MNIST: it still makes mistakes."""
    root = tmp_path_factory.mktemp("mistakes")
    data = write_mnist(root / "data")
    run = root / "run"
    cnnlab.train("lenet5", "mnist", data_dir=str(data), out=run, epochs=0.5, batch_size=32,
                 lr=0.05, log_every=8, progress=False)
    test = load_dataset("mnist", data)
    return SimpleNamespace(data=data, run=run, x=test.test_x, y=test.test_y)


def test_eval_mistakes_draws_them_and_lists_them_consistently(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(trained.run), "--mistakes", "9", "--out-dir", str(out),
                 "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    stem = "best-mnist-test"
    names = {"top_losses": f"top_losses-{stem}.png", "saliency": f"saliency-{stem}.png",
             "confused": f"confused-{stem}.png"}
    assert {k: printed["files"][k] for k in names} == {k: str(out / n) for k, n in names.items()}
    assert all((out / n).read_bytes().startswith(PNG) for n in names.values())
    assert files_line(printed["files"]) in captured.err
    saved = json.loads((out / f"eval-{stem}.json").read_text())
    found = saved["mistakes"]
    assert found == printed["mistakes"]
    assert found["files"] == {k: printed["files"][k] for k in names}

    trained_model = load_model(trained.run)
    scores = predict_logits(trained_model.model, torch.from_numpy(trained.x), trained_model.meta)
    pred, classes = scores.argmax(1), saved["classes"]
    wrong = int((pred != torch.from_numpy(trained.y).long()).sum())
    top = found["top_losses"]
    assert 0 < len(top) == min(9, wrong)
    for t in top:  # each really misclassified, as the JSON says
        i = t["index"]
        assert classes[trained.y[i]] == t["true"] != t["pred"] == classes[pred[i]]
        assert 0 < t["prob"] <= 1
        assert t["prob"] == pytest.approx(scores[i].softmax(0).max().item(), abs=1e-6)
    losses = [t["loss"] for t in top]
    assert losses == sorted(losses, reverse=True)
    assert found["saliency"] == [t["index"] for t in top[:4]]

    confusion = saved["confusion"]
    off = sorted((confusion[a][b] for a in range(10) for b in range(10) if a != b and
                  confusion[a][b]), reverse=True)
    assert [p["count"] for p in found["pairs"]] == off[:5]
    for p in found["pairs"]:
        a, b = classes.index(p["true"]), classes.index(p["pred"])
        assert p["count"] == confusion[a][b] and len(p["examples"]) == min(4, p["count"])
        assert all(trained.y[i] == a and pred[i] == b for i in p["examples"])


def test_eval_without_mistakes_draws_none_and_refuses_a_negative_count(trained, tmp_path,
                                                                       capsys):
    assert main(["eval", str(trained.run), "--out-dir", str(tmp_path), "--json"]) == 0
    assert "mistakes" not in json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion-best-mnist-test.png",
                                                          "eval-best-mnist-test.json"]
    assert main(["eval", str(trained.run), "--mistakes", "-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--mistakes must be 0 (none) or more, got -1" in lines[0]


def test_the_drawn_images_are_the_input_the_model_saw_and_saliency_fits_them(trained):
    found = evaluate_checkpoint(trained.run, mistakes=3, progress=False)["mistakes"]
    assert isinstance(found, Mistakes) and len(found.top_losses) == 3
    for t in found.top_losses:
        image = trained.x[t["index"]].transpose(1, 2, 0) / 255  # (H, W, 1)
        assert np.allclose(found.pixels[t["index"]], image, atol=1e-6)
        heat = found.saliency[t["index"]]
        assert heat.shape == (28, 28) and np.isfinite(heat).all()
        assert heat.min() >= 0 and heat.max() == pytest.approx(1)
    # the un-normalising helper: normalised RGB, and pixels / 255 without normalisation
    rgb = torch.randint(0, 256, (2, 3, 8, 6), dtype=torch.uint8)
    for normalize in (True, False):
        meta = ModelMeta("resnet18", 3, 10, (8, 6), tuple("abcdefghij"), (0.5, 0.4, 0.3),
                         (0.2, 0.25, 0.3), normalize=normalize)
        shown = to_pixels(preprocess(rgb, meta), meta)
        assert shown.shape == (2, 8, 6, 3)
        assert np.allclose(shown, rgb.permute(0, 2, 3, 1).numpy() / 255, atol=1e-6)


def test_a_model_without_mistakes_draws_nothing(tmp_path):
    meta = ModelMeta("lenet5", 1, 3, (28, 28), ("a", "b", "c"), (0.1,), (0.3,))
    labels = np.array([0, 1, 2, 1])
    found = find_mistakes(meta.build(), meta, np.zeros((4, 1, 28, 28), np.uint8), labels,
                          torch.eye(3)[labels] * 5, shown=9,
                          prepare=lambda x: preprocess(x, meta))
    assert found.top_losses == [] and found.pairs == [] and found.saliency == {}
    assert found.draw(tmp_path) == {} and not list(tmp_path.iterdir())
    assert files_line({}) == "mistakes: none, every image was classified correctly"


def test_report_has_a_mistakes_section(trained, tmp_path):
    run = shutil.copytree(trained.run, tmp_path / "run")
    written = write_report([run], data_dir=trained.data, device="cpu")
    md = written["md"].read_text()
    assert "## Mistakes" in md and "most confidently wrong" in md
    assert "| true class | predicted as | test images | share of the true class |" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images[-3:] == ["top_losses.png", "saliency.png", "confused.png"]
    assert all((run / name).read_bytes().startswith(PNG) for name in images)
    html = written["html"].read_text()
    assert html.count('src="data:image/png;base64,') == len(images)  # every one embedded


def test_top_loss_captions_show_what_they_are_ordered_by():
    from cnnlab.mistakes import _caption

    tops = [{"true": "7", "pred": "1", "prob": 0.62, "loss": 3.25},
            {"true": "4", "pred": "9", "prob": 0.89, "loss": 2.5}]
    captions = [_caption(t) for t in tops]
    assert captions[0] == "loss 3.25, true 7\npredicted 1 (p 0.62)"
    losses = [float(c.split(",")[0].removeprefix("loss ")) for c in captions]
    assert losses == sorted(losses, reverse=True)
