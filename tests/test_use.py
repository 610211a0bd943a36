"""Using a trained model: cnnlab eval, predict and export (and their bad inputs)."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_cifar, write_folder, write_mnist
from PIL import Image

import cnnlab
from cnnlab import checkpoint
from cnnlab.checkpoint import ModelMeta, load_model
from cnnlab.cli import main
from cnnlab.data import load_dataset
from cnnlab.data.loader import DeviceLoader
from cnnlab.errors import CnnlabError
from cnnlab.export import export_model, read_torchscript_metadata
from cnnlab.inference import evaluate_checkpoint, predict_logits, preprocess
from cnnlab.predict import load_image, predict
from cnnlab.runs import read_metrics

RUN_FILES = ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "best.pt",
             "summary.json", "loss.png", "accuracy.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet-5 trained once on the tiny synthetic MNIST (100% test accuracy)."""
    root = tmp_path_factory.mktemp("use")
    data = write_mnist(root / "data")
    run = root / "run"
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(data), out=run, epochs=3,
                           batch_size=32, lr=0.05, log_every=8, progress=False)
    test = load_dataset("mnist", data)
    return SimpleNamespace(root=root, data=data, run=run, summary=summary,
                           x=test.test_x, y=test.test_y)


def _cli(capsys, *args):
    """cnnlab ARGS in this process: (exit status, stdout, stderr lines)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _snapshot(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in RUN_FILES}


# ---------------------------------------------------------------- eval

def test_preprocess_is_the_training_loaders_normalisation_bit_for_bit(trained):
    meta = load_model(trained.run).meta
    images = torch.from_numpy(trained.x[:50])
    for normalize in (True, False):
        m = dataclasses.replace(meta, normalize=normalize)
        loader = DeviceLoader(images, torch.from_numpy(trained.y[:50]), batch_size=50,
                              mean=m.mean, std=m.std,
                              device=torch.device("cpu"), normalize=normalize)
        (x, _), = list(loader)
        assert torch.equal(preprocess(images, m), x)


def test_eval_matches_the_accuracy_recorded_in_training(trained):
    before = _snapshot(trained.run)
    best = evaluate_checkpoint(trained.run)  # a run directory means its best.pt
    assert best["checkpoint"] == str(trained.run / "best.pt")
    assert best["accuracy"] == trained.summary["best_test_acc"]
    last = evaluate_checkpoint(trained.run / "checkpoint.pt")
    final = [r for r in read_metrics(trained.run) if r["type"] == "eval"][-1]
    assert last["accuracy"] == final["test_acc"] == trained.summary["final_test_acc"]
    assert last["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert last["images"] == 128 and last["epoch"] == 3 and last["split"] == "test"
    conf = np.array(last["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == 128
    assert np.array_equal(conf.sum(1), np.bincount(trained.y, minlength=10))
    assert [r["support"] for r in last["per_class"]] == conf.sum(1).tolist()
    assert [r["class"] for r in last["per_class"]] == [str(i) for i in range(10)]
    train = evaluate_checkpoint(trained.run, split="train", batch_size=100)
    assert train["images"] == 512 and train["accuracy"] > 90
    assert _snapshot(trained.run) == before


def test_cli_eval_prints_and_saves_text_and_json(trained, capsys, tmp_path):
    before = _snapshot(trained.run)
    code, out, err = _cli(capsys, "eval", trained.run)
    assert code == 0, err
    assert f"accuracy {trained.summary['best_test_acc']:.2f}%" in out
    assert "precision" in out and "recall" in out and "confusion matrix" in out
    png = trained.run / "confusion-best-mnist-test.png"
    js = trained.run / "eval-best-mnist-test.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(js.read_text())
    assert saved["accuracy"] == trained.summary["best_test_acc"]
    assert _snapshot(trained.run) == before  # training's files untouched

    code, out, err = _cli(capsys, "eval", trained.run / "checkpoint.pt", "--json",
                          "--out-dir", tmp_path / "ev")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"accuracy", "loss", "per_class", "confusion", "classes", "files"}
    assert result["accuracy"] == trained.summary["final_test_acc"]
    assert Path(result["files"]["png"]) == tmp_path / "ev" / "confusion-checkpoint-mnist-test.png"
    assert Path(result["files"]["json"]).is_file()


def test_eval_computes_in_the_precision_asked(trained, capsys, tmp_path):
    fp32 = evaluate_checkpoint(trained.run, progress=False)
    bf16 = evaluate_checkpoint(trained.run, precision="bf16", progress=False)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["loss"] != fp32["loss"] and abs(bf16["accuracy"] - fp32["accuracy"]) < 2
    code, out, err = _cli(capsys, "eval", trained.run, "--precision", "fp16", "--device", "cpu",
                          "--out-dir", tmp_path)
    assert code == 2 and err == ["cnnlab: error: --precision fp16 needs a GPU; on CPU use "
                                 "bf16 or fp32"]


def test_eval_with_tta_flip_on_a_model_trained_with_flips(tmp_path, capsys):
    folder = write_folder(tmp_path / "pets", size=16)
    cnnlab.train("lenet5", f"folder:{folder}", out=tmp_path / "f", epochs=1, batch_size=6,
                 augment="crop,flip", progress=False)
    loaded = load_model(tmp_path / "f")
    model, meta = loaded.model, loaded.meta
    data = load_dataset(f"folder:{folder}", "")
    x, y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    flipped = ((model(preprocess(x, meta)) + model(preprocess(x.flip(3), meta))) / 2)
    result = evaluate_checkpoint(tmp_path / "f", tta="flip")
    expected = 100 * (flipped.argmax(1) == y).sum().item() / len(y)
    assert result["accuracy"] == pytest.approx(expected) and result["tta"] == "flip"
    assert torch.allclose(predict_logits(model, x, meta, tta="flip"), flipped, atol=1e-6)
    code, out, err = _cli(capsys, "eval", tmp_path / "f", "--tta", "flip", "--json")
    assert code == 0, err
    assert json.loads(out)["classes"] == ["cat", "dog", "fox"]
    assert (tmp_path / "f" / "confusion-best-pets-test-tta-flip.png").is_file()


def _damaged(tmp_path: Path, run: Path) -> dict:
    """Checkpoint files that are not usable cnnlab checkpoints, by case name."""
    good = checkpoint.load(run / "best.pt")
    files = {}
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    files["garbage"] = tmp_path / "garbage.pt"
    (tmp_path / "truncated.pt").write_bytes((run / "best.pt").read_bytes()[:2000])
    files["truncated"] = tmp_path / "truncated.pt"
    checkpoint.save({"state_dict": good["model"]}, tmp_path / "foreign.pt")
    files["foreign"] = tmp_path / "foreign.pt"
    checkpoint.save(torch.zeros(3), tmp_path / "tensor.pt")
    files["tensor"] = tmp_path / "tensor.pt"
    checkpoint.save({k: v for k, v in good.items() if k != "model_meta"}, tmp_path / "nometa.pt")
    files["nometa"] = tmp_path / "nometa.pt"
    bad_meta = good["model_meta"] | {"num_classes": 5}
    checkpoint.save(good | {"model_meta": bad_meta}, tmp_path / "badmeta.pt")
    files["badmeta"] = tmp_path / "badmeta.pt"
    weights = dict(good["model"]) | {"classifier.5.weight": torch.zeros(3, 84)}
    checkpoint.save(good | {"model": weights}, tmp_path / "badweights.pt")
    files["badweights"] = tmp_path / "badweights.pt"
    (tmp_path / "notarun").mkdir()
    files["notarun"] = tmp_path / "notarun"
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.json").write_text("{}")
    files["early"] = tmp_path / "early"
    files["missing"] = tmp_path / "missing.pt"
    return files


CHECKPOINT_CASES = [
    ("missing", "no checkpoint or run directory at"),
    ("notarun", "holds no best.pt or checkpoint.pt; is it a run directory?"),
    ("early", "has no checkpoint yet"),
    ("garbage", "it is damaged"),
    ("truncated", "it is damaged"),
    ("foreign", "is not a cnnlab checkpoint"),
    ("tensor", "is not a cnnlab checkpoint"),
    ("nometa", "is not a cnnlab checkpoint"),
    ("badmeta", "inconsistent model_meta"),
    ("badweights", "the stored weights do not fit lenet5"),
]


@pytest.mark.parametrize("command", [["eval"], ["predict", "IMAGE"], ["export", "--format",
                                                                        "torchscript"]])
@pytest.mark.parametrize("case,message", CHECKPOINT_CASES)
def test_bad_checkpoints_one_line_exit_2(trained, tmp_path, capsys, command, case, message):
    path = _damaged(tmp_path, trained.run)[case]
    args = [command[0], path, *command[1:]]
    if command[0] == "predict":
        Image.fromarray(trained.x[0, 0]).save(tmp_path / "digit.png")
        args[2] = tmp_path / "digit.png"
    code, out, err = _cli(capsys, *args)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("cnnlab: error:") and message in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("args,message", [
    (["--tta", "flip"], "was not trained with flips (augment 'none')"),
    (["--tta", "mirror"], "unknown tta 'mirror'; choose one of none, flip, flip,translate"),
    (["--split", "valid"], "unknown split 'valid'; choose one of test, train"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--dataset", "cifar10"], "cifar10 has 3x32x32 (channels x height x width) images but "
                               "the model takes 1x28x28"),
    (["--dataset", "FOLDER"], "has classes [cat, dog, fox] (3) but the model was trained on "
                              "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] (10)"),
    (["--dataset", "fashion-mnist", "--no-download"], "fashion-mnist not found"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
])
def test_eval_bad_input_one_line_exit_2(trained, tmp_path, capsys, args, message):
    write_cifar(trained.data, n_train=10, n_test=10)
    folder = write_folder(tmp_path / "gray", size=28, mode="L")  # fits the shape, not classes
    args = [f"folder:{folder}" if a == "FOLDER" else a for a in args]
    code, out, err = _cli(capsys, "eval", trained.run, "--data-dir", trained.data, *args)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("cnnlab: error:") and message in err[0], err


def test_a_checkpoint_alone_is_enough(trained, tmp_path, capsys):
    """No run directory, no training config, no dataset: the checkpoint rebuilds the model
    and its preprocessing; eval then only needs to be told the data."""
    ckpt = checkpoint.load(trained.run / "best.pt")
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    checkpoint.save({"model": ckpt["model"], "model_meta": ckpt["model_meta"]}, alone)
    meta = load_model(alone).meta
    assert meta.classes == tuple(str(i) for i in range(10)) and meta.image_size == (28, 28)
    assert meta.mean == (0.1307,) and meta.std == (0.3081,) and meta.name == "lenet5"
    Image.fromarray(trained.x[0, 0]).save(tmp_path / "digit.png")
    assert predict(alone, [tmp_path / "digit.png"])[0]["top"][0]["label"] == str(trained.y[0])
    assert export_model(alone, "torchscript")["max_abs_diff"] <= 1e-4
    code, _, err = _cli(capsys, "eval", alone)
    assert code == 2 and "does not say which dataset it was trained on; give --dataset" in err[0]
    code, out, err = _cli(capsys, "eval", alone, "--dataset", "mnist", "--data-dir",
                          trained.data, "--json")
    assert code == 0 and json.loads(out)["accuracy"] == trained.summary["best_test_acc"]
    assert (alone.parent / "eval-model-mnist-test.json").is_file()


# ---------------------------------------------------------------- predict

def _write_images(folder: Path, images: np.ndarray, fmt: str, **save) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:03d}.{fmt}")
        Image.fromarray(img[0]).save(paths[-1], **save)
    return paths


def test_predict_png_and_jpeg_files_gives_their_labels(trained, tmp_path):
    n = 24
    png = _write_images(tmp_path / "png", trained.x[:n], "png")
    jpg = _write_images(tmp_path / "jpg", trained.x[:n], "jpg", quality=90)
    for paths in (png, jpg):
        results = predict(trained.run, paths, top_k=3)
        assert [r["path"] for r in results] == [str(p) for p in paths]
        assert [r["top"][0]["label"] for r in results] == [str(v) for v in trained.y[:n]]
        for r in results:
            probs = [t["probability"] for t in r["top"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True)
            assert 0 < sum(probs) <= 1 + 1e-5 and r["inverted"] is False
    # a PNG decodes to the very pixels: the same probabilities as the arrays themselves
    loaded = load_model(trained.run)
    model, meta = loaded.model, loaded.meta
    probs = predict_logits(model, torch.from_numpy(trained.x[:n]), meta).softmax(1)
    got = [r["top"][0]["probability"] for r in predict(trained.run, png)]
    assert got == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)


def test_predict_prepares_images_as_in_training(trained, tmp_path):
    meta = load_model(trained.run).meta
    digit = trained.x[3, 0]
    Image.fromarray(digit).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([digit] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit
    Image.fromarray(255 - digit).save(tmp_path / "drawn.png")  # dark on light
    for name in ("gray", "rgb", "deep", "drawn"):
        arr, inverted = load_image(tmp_path / f"{name}.png", meta)
        assert arr.shape == (1, 28, 28) and arr.dtype == np.uint8
        assert np.array_equal(arr, digit[None]), name
        assert inverted == (name == "drawn")
    arr, inverted = load_image(tmp_path / "drawn.png", meta, invert="no")
    assert not inverted and np.array_equal(arr, 255 - digit[None])
    arr, inverted = load_image(tmp_path / "gray.png", meta, invert="yes")
    assert inverted and np.array_equal(arr, 255 - digit[None])
    # black strokes on a transparent background, drawn at 4x the size: composited on
    # white, inverted, resized
    big = np.kron(digit, np.ones((4, 4), dtype=np.uint8))
    rgba = np.zeros((112, 112, 4), dtype=np.uint8)
    rgba[..., 3] = big
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sketch.png")
    arr, inverted = load_image(tmp_path / "sketch.png", meta)
    assert inverted and arr.shape == (1, 28, 28)
    assert np.abs(arr.astype(int) - digit).mean() < 8
    result = predict(trained.run, [tmp_path / "sketch.png", tmp_path / "drawn.png"])
    assert [r["top"][0]["label"] for r in result] == [str(trained.y[3])] * 2
    assert all(r["inverted"] for r in result)


def test_predict_rgb_model_converts_grayscale_input(tmp_path):
    folder = write_folder(tmp_path / "pets", size=16)  # RGB, 3 classes, not MNIST-style
    cnnlab.train("lenet5", f"folder:{folder}", out=tmp_path / "f", epochs=1, batch_size=6,
                 progress=False)
    meta = load_model(tmp_path / "f").meta
    Image.fromarray(np.full((40, 30), 250, np.uint8)).save(tmp_path / "light.png")
    arr, inverted = load_image(tmp_path / "light.png", meta)
    assert arr.shape == (3, 16, 16) and not inverted and (arr == 250).all()
    (r,) = predict(tmp_path / "f", [tmp_path / "light.png"], top_k=10)
    assert len(r["top"]) == 3 and {t["label"] for t in r["top"]} == {"cat", "dog", "fox"}


def test_cli_predict_json_and_batches(trained, tmp_path, capsys):
    folder = tmp_path / "digits"
    paths = _write_images(folder / "a", trained.x[:5], "png")
    paths += _write_images(folder / "b", trained.x[5:10], "jpg")
    (folder / "notes.txt").write_text("not an image: skipped inside a folder")
    code, out, err = _cli(capsys, "predict", trained.run, folder, "--top-k", "2", "--json",
                          "--batch-size", "3")
    assert code == 0 and err == []
    results = json.loads(out)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert [r["top"][0]["label"] for r in results] == [str(v) for v in trained.y[:10]]
    assert all(set(r) == {"path", "top", "inverted"} and len(r["top"]) == 2 for r in results)
    assert all(set(t) == {"label", "probability"} for r in results for t in r["top"])
    code, out2, _ = _cli(capsys, "predict", trained.run, folder, "--top-k", "2", "--json")
    again = json.loads(out2)  # the batch size changes nothing (but rounding)
    assert [[t["label"] for t in r["top"]] for r in again] == \
        [[t["label"] for t in r["top"]] for r in results]
    assert [t["probability"] for r in again for t in r["top"]] == \
        pytest.approx([t["probability"] for r in results for t in r["top"]], abs=1e-5)
    code, out, _ = _cli(capsys, "predict", trained.run, paths[0], "--top-k", "50")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith(f"{paths[0]}: {trained.y[0]} ")
    assert lines[0].count("%") == 10  # top-k beyond the number of classes: all of them


def test_predict_bad_files_are_reported_and_the_rest_predicted(trained, tmp_path, capsys):
    good = _write_images(tmp_path / "in", trained.x[:2], "png")
    (tmp_path / "in" / "text.png").write_text("hello")
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    full = (tmp_path / "in" / "000.png").read_bytes()
    (tmp_path / "in" / "torn.png").write_bytes(full[:len(full) // 2])
    (tmp_path / "nothing").mkdir()
    bad = [tmp_path / "in" / n for n in ("empty.jpg", "text.png", "torn.png")]
    args = ["predict", trained.run, tmp_path / "in", tmp_path / "missing.png",
            tmp_path / "nothing", "--json"]
    code, out, err = _cli(capsys, *args)
    assert code == 1
    results = json.loads(out)
    by_path = {r["path"]: r for r in results}
    for p, label in zip(good, trained.y[:2]):
        assert by_path[str(p)]["top"][0]["label"] == str(label)
    for p in bad:
        assert by_path[str(p)]["error"].startswith(f"cannot read image {p}:")
    assert "no such file or folder" in by_path[str(tmp_path / "missing.png")]["error"]
    assert "holds no images" in by_path[str(tmp_path / "nothing")]["error"]
    assert len(err) == 5 and all(line.startswith("cnnlab: error:") for line in err), err
    assert sorted(p for p in map(str, bad) if any(p in line for line in err)) == \
        sorted(map(str, bad))
    # the same through a real process: the exit status says some failed
    res = subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args[:3])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stdout.strip().splitlines()) == 2
    assert len(res.stderr.strip().splitlines()) == 3


@pytest.mark.parametrize("args,message", [
    (["--top-k", "0"], "--top-k must be a positive number of classes, got 0"),
    (["--top-k", "-2"], "--top-k must be a positive number of classes, got -2"),
    (["--top-k", "two"], "invalid int value"),
    (["--invert", "maybe"], "unknown --invert 'maybe'; choose one of auto, yes, no"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
def test_predict_bad_options_one_line_exit_2(trained, tmp_path, capsys, args, message):
    path = _write_images(tmp_path, trained.x[:1], "png")[0]
    code, out, err = _cli(capsys, "predict", trained.run, path, *args)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("cnnlab: error:") and message in err[0], err


# ---------------------------------------------------------------- export

def test_export_onnx_gives_the_same_logits_with_onnxruntime(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    info = export_model(trained.run, "onnx")
    path = trained.run / "best.onnx"
    assert info["path"] == str(path) and info["max_abs_diff"] <= 1e-4
    sidecar = json.loads((trained.run / "best.onnx.json").read_text())
    assert sidecar["classes"] == [str(i) for i in range(10)]
    assert sidecar["preprocessing"] == {
        "color_mode": "L", "size": [28, 28], "resize": "to the size, bilinear",
        "mean": [0.1307], "std": [0.3081],
        "normalize": True, "invert_light_background": True,
        "formula": "input = (pixel / 255 - mean) / std, per channel"}
    assert sidecar["parity"]["max_abs_diff"] <= 1e-4 and sidecar["file"] == "best.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["classes"]) == sidecar["classes"]
    assert json.loads(props["cnnlab"])["preprocessing"] == sidecar["preprocessing"]
    # on real test images, at batch sizes other than the one exported with
    loaded = load_model(trained.run)
    model, meta = loaded.model, loaded.meta
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 128):
        x = preprocess(torch.from_numpy(trained.x[:n]), meta)
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(got - expected).max() <= 1e-4
        assert np.array_equal(got.argmax(1), trained.y[:n])


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated, still asked for
def test_cli_export_torchscript_gives_the_same_logits(trained, tmp_path, capsys):
    out = tmp_path / "exports" / "lenet.pt"
    code, stdout, err = _cli(capsys, "export", trained.run / "checkpoint.pt", "--format",
                             "torchscript", "--out", out)
    assert code == 0, err
    assert stdout.strip() == str(out) and "max |logit difference|" in err[-1]
    loaded = torch.jit.load(str(out))
    original = load_model(trained.run / "checkpoint.pt")
    model, meta = original.model, original.meta
    for n in (1, 64):
        x = preprocess(torch.from_numpy(trained.x[:n]), meta)
        with torch.no_grad():
            assert (loaded(x) - model(x)).abs().max() <= 1e-4
    inside = read_torchscript_metadata(out)
    beside = json.loads((tmp_path / "exports" / "lenet.pt.json").read_text())
    assert inside["classes"] == beside["classes"] == list(meta.classes)
    assert inside["preprocessing"] == beside["preprocessing"]
    assert beside["format"] == "torchscript" and beside["source"]["epoch"] == 3
    code, _, err = _cli(capsys, "export", trained.run, "--format", "torchscript")
    assert code == 0 and (trained.run / "best.torchscript.pt").is_file()


def test_cli_export_program_loads_in_a_process_without_cnnlab(trained, tmp_path, capsys):
    """`--format export`: torch.export's ExportedProgram, loaded in a fresh Python that never
    imports cnnlab, gives PyTorch's logits on real images (here the test split) within 1e-4
    of their scale, at two batch sizes."""
    out = tmp_path / "lenet.pt2"
    code, stdout, err = _cli(capsys, "export", trained.run, "--format", "export", "--out", out)
    assert code == 0, err
    original = load_model(trained.run / "best.pt")
    x = preprocess(torch.from_numpy(trained.x[:64]), original.meta)
    torch.save(x, tmp_path / "x.pt")
    code_ = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); "
             "x = torch.load(sys.argv[2]); "
             "assert 'cnnlab' not in sys.modules; "
             "torch.save([m(x[:1]).detach(), m(x).detach()], sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", code_, str(out), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    one, many = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        expected = original.model(x)
    scale = max(1.0, float(expected.abs().max()))
    assert float((many - expected).abs().max()) / scale <= 1e-4
    assert float((one - expected[:1]).abs().max()) / scale <= 1e-4
    beside = json.loads((tmp_path / "lenet.pt2.json").read_text())
    assert beside["format"] == "export" and beside["parity"]["max_rel_diff"] <= 1e-4
    # export checked it on the data it was trained on, found where training read it
    n = len(trained.y)
    assert beside["parity"]["checked_on"] == (f"random images (batches of 16 and 1) and the "
                                              f"first {n} mnist test images")
    assert beside["parity"]["top1_agreement"] == f"{n}/{n}"
    assert f"the same class for {n}/{n} images" in err[-1] and "W1" not in " ".join(err)
    # where the data is not at hand: random images only, and it says so
    code, _, err = _cli(capsys, "export", trained.run, "--format", "export", "--out",
                        tmp_path / "again.pt2", "--data-dir", tmp_path / "empty")
    assert code == 0, err
    parity = json.loads((tmp_path / "again.pt2.json").read_text())["parity"]
    assert parity["checked_on"].startswith("random images (batches of 16 and 1) only: no mnist")
    assert "top1_agreement" not in parity and not (tmp_path / "empty").exists()


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "unknown export format 'tflite'; choose one of onnx, export, "
                             "torchscript"),
    (["--format", "torchscript", "--out", "RUN/summary.json"], "would overwrite"),
    (["--format", "torchscript", "--out", "RUN/best.pt"], "would overwrite"),
    (["--format", "torchscript", "--out", "RUN/config"], "would overwrite"),  # config.json
    (["--format", "torchscript", "--out", "RUN"], "is a folder; give a file name"),
    (["--format", "torchscript", "--out", "RUN/loss.png"], "which is not an earlier export"),
    (["--format", "onnx", "--out", "RUN/metrics.jsonl"], "would overwrite"),
    ([], "the following arguments are required: --format"),
])
def test_export_bad_input_one_line_exit_2(trained, capsys, args, message):
    before = _snapshot(trained.run)
    args = [a.replace("RUN", str(trained.run)) for a in args]
    code, out, err = _cli(capsys, "export", trained.run, *args)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("cnnlab: error:") and message in err[0], err
    assert _snapshot(trained.run) == before


def test_export_onnx_without_the_packages_says_how_to_install(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(CnnlabError, match=r"pip install 'cnnlab\[export\]'"):
        export_model(trained.run, "onnx", trained.root / "never.onnx")
    assert not (trained.root / "never.onnx").exists()


def test_export_refuses_a_model_that_does_not_match(trained, tmp_path, monkeypatch):
    import cnnlab.export as export

    real = export._run_torchscript
    # off by a thousandth of the logits' scale: ten times what is allowed
    monkeypatch.setattr(export, "_run_torchscript", lambda path, inputs: [
        y + 1e-3 * max(1.0, float(y.abs().max())) for y in real(path, inputs)])
    with pytest.raises(CnnlabError, match=r"away from the PyTorch model's, 0\.001 of their "
                                          r"scale [\d.]+ \(allowed 0\.0001\)"):
        export_model(trained.run, "torchscript", tmp_path / "off.pt")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_the_exported_model_is_found_by_name(trained, tmp_path):
    shutil.copy(trained.run / "best.pt", tmp_path / "my model.pt")
    info = export_model(tmp_path / "my model.pt", "torchscript")
    assert Path(info["path"]) == tmp_path / "my model.torchscript.pt"
    assert Path(info["metadata_path"]) == tmp_path / "my model.torchscript.pt.json"
    assert export_model(tmp_path / "my model.pt", "torchscript")["path"] == info["path"]
    (tmp_path / "photo.jpg").write_bytes(b"someone's photo")  # not an export: kept
    with pytest.raises(CnnlabError, match="would overwrite .*photo.jpg, which is not an"):
        export_model(tmp_path / "my model.pt", "torchscript", tmp_path / "photo.jpg")
    assert (tmp_path / "photo.jpg").read_bytes() == b"someone's photo"


def test_folder_datasets_decode_images_as_predict_does(tmp_path):
    from cnnlab.data.readers import folder_files, read_folder_split

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[:8, :, 3] = 0  # the top half transparent
    deep = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(folder / "0-rgba.png")
    Image.fromarray(deep).save(folder / "1-deep.png")
    with Image.open(folder / "1-deep.png") as im:
        assert im.mode.startswith("I")  # a 16-bit PNG
    files = folder_files(tmp_path / "train", ["a"], require_all=True)
    for channels, mode in ((1, "L"), (3, "RGB")):
        meta = ModelMeta(name="lenet5", in_channels=channels, num_classes=1, image_size=(16, 16),
                         classes=("a",), mean=(0.5,) * channels, std=(0.25,) * channels)
        x, _ = read_folder_split(files, mode=mode)
        for got, (path, _) in zip(x, files):
            assert np.array_equal(got, load_image(path, meta, invert="no")[0]), (mode, path)
        assert (x[0][:, :8] == 255).all()  # transparent: white
        scaled = np.clip(deep / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
        assert (x[1] == scaled).all()  # 16 bits scaled down, not clipped
    x, _ = read_folder_split(files[1:])  # a 16-bit image alone: a grayscale dataset
    assert x.shape == (1, 1, 16, 16) and (x[0, 0] == scaled).all()


def test_export_runtime_errors_are_one_line_and_write_nothing(trained, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed\nreading the archive")

    monkeypatch.setattr(torch.jit, "load", broken)
    with pytest.raises(CnnlabError, match="TorchScript export cannot be loaded and run: "
                                          "PytorchStreamReader failed reading the archive$"):
        export_model(trained.run, "torchscript", tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []  # neither the model nor its JSON, no temporary file


@pytest.mark.parametrize("model, data", [("lenet5", "mnist"), ("resnet18", "cifar10")])
def test_checkpoint_weights_are_plain_tensors_other_tools_save(tmp_path, model, data):
    """best.pt's weights are contiguous tensors: safetensors (which refuses views, such as
    channels-last ones) writes them all, and they load back equal."""
    from safetensors.torch import load_file, save_file

    root = write_mnist(tmp_path / "d", 64, 16) if data == "mnist" else write_cifar(
        tmp_path / "d", 40, 10)
    out = tmp_path / "run"
    cnnlab.train(model, data, data_dir=str(root), out=out, epochs=0.2, batch_size=8,
                 channels_last=True, telemetry=0, progress=False)
    weights = checkpoint.load(out / "best.pt")["model"]
    assert all(t.is_contiguous() for t in weights.values())
    save_file(weights, tmp_path / "model.safetensors")
    again = load_file(tmp_path / "model.safetensors")
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def _snippet(page: str, marker: str) -> str:
    """The first Python block of docs/`page` that holds `marker`."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b)


def test_torchvision_resnet18_loads_the_weights_as_the_docs_say(tmp_path):
    """The docs' snippet, run as it is on a trained ResNet-18's best.pt: torchvision's model
    loads the weights strictly and gives cnnlab's logits."""
    root = write_cifar(tmp_path / "d", 40, 10)
    run = tmp_path / "run"
    cnnlab.train("resnet18", "cifar10", data_dir=str(root), out=run, epochs=0.2,
                 batch_size=8, telemetry=0, progress=False)
    code = _snippet("using-results.md", "torchvision.models.resnet18").replace(
        "runs/RUN", str(run))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the documented snippet itself
    ours = load_model(run / "best.pt").model
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scope["model"](x), ours(x), atol=1e-5)


def test_a_resnet_checkpoint_of_the_earlier_layer_names_still_loads(trained, tmp_path):
    """Checkpoints written before the layers took torchvision's names (stem, layers.K,
    shortcut) load under the new names, giving the same model."""
    from cnnlab.models.resnet import resnet18

    model = resnet18()
    old = {}
    for key, value in model.state_dict().items():  # today's names -> the earlier ones
        key = key.replace("conv1.", "stem.0.", 1) if key.startswith("conv1.") else key
        key = key.replace("bn1.", "stem.1.", 1) if key.startswith("bn1.") else key
        if key.startswith("layer"):
            stage, block, rest = key[5:].split(".", 2)
            key = f"layers.{2 * (int(stage) - 1) + int(block)}.{rest}"
        old[key.replace(".downsample.", ".shortcut.")] = value
    assert "stem.0.weight" in old and "layers.2.shortcut.0.weight" in old
    ckpt = checkpoint.load(trained.run / "best.pt")
    ckpt["model"] = old
    ckpt["model_meta"] = {**ckpt["model_meta"], "name": "resnet18", "in_channels": 3,
                          "options": {}}
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = checkpoint.load(tmp_path / "old.pt")["model"]
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
