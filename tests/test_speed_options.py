"""Every precision and memory-format option trains correctly on CPU (no timing asserted)."""

import pytest
import torch

import cnnlab
from cnnlab import checkpoint
from cnnlab.errors import CnnlabError
from cnnlab.models import count_parameters, create_model


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("fp32", True),
                                                     ("bf16", False), ("bf16", True)])
def test_precisions_and_memory_formats_learn(tiny_mnist, tmp_path, precision, channels_last):
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "r",
                           epochs=2, batch_size=32, lr=0.05, precision=precision,
                           channels_last=channels_last, progress=False, telemetry=0)
    assert summary["precision"] == precision and summary["channels_last"] == channels_last
    assert summary["best_test_acc"] > 50  # the synthetic classes are easy to learn
    weights = checkpoint.load(tmp_path / "r" / "checkpoint.pt")["model"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_fp16_needs_a_gpu(tiny_mnist, tmp_path):
    with pytest.raises(CnnlabError, match="fp16 needs a GPU"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "r",
                     precision="fp16", progress=False)


@pytest.mark.parametrize("native,model,expected", [
    (True, "resnet18", "bf16"), (True, "fastnet", "bf16"), (True, "lenet5", "fp32"),
    (False, "resnet18", "fp32")])
def test_auto_precision_on_cpu_picks_bf16_where_native_and_it_pays(monkeypatch, native, model,
                                                                   expected):
    from cnnlab.devices import resolve_precision

    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: native, raising=False)
    assert resolve_precision("auto", torch.device("cpu"), model) == expected
    assert resolve_precision("fp32", torch.device("cpu"), model) == "fp32"


def test_fastnet_shapes():
    model = create_model("fastnet", in_channels=3, num_classes=10, image_size=(32, 32))
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(model) < 2_500_000  # a fraction of ResNet-18's 11.2M


def test_bench_times_the_real_loop(tiny_mnist):
    from cnnlab.bench import cnnlab_epoch

    result = cnnlab_epoch("lenet5", "mnist", str(tiny_mnist), max_steps=3, warmup=1,
                          batch_size=64, precision="bf16")
    assert result["images"] == 3 * 64 and result["seconds"] > 0
    assert result["config"] == {"batch_size": 64, "precision": "bf16"}


def test_tensorboard_and_telemetry_records(tiny_mnist, tmp_path):
    from cnnlab.runs import read_metrics

    out = tmp_path / "r"
    cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=2, batch_size=16,
                 log_every=8, telemetry=0.05, tensorboard=True, progress=False, val_split=0.1)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    records = read_metrics(out)
    for kind, step, keys in (("train", "step", ("loss", "train_acc", "lr")),
                             ("eval", "steps", ("test_loss", "test_acc", "val_loss",
                                                "val_acc"))):
        ours = [r for r in records if r["type"] == kind]
        for key in keys:  # every point at its true global step, as metrics.jsonl has it
            events = [(e.step, e.value) for e in acc.Scalars(f"{kind}/{key}")]
            assert events == [(r[step], pytest.approx(r[key], rel=1e-6)) for r in ours], key
    assert len({e.step for e in acc.Scalars("eval/test_acc")}) == 2  # not all at step 0
    telemetry = [r for r in read_metrics(out) if r["type"] == "telemetry"]
    assert telemetry and all(r["rss_mb"] > 0 and r["gpu_util"] is None for r in telemetry)
    assert "no GPU" in telemetry[0]["notes"][0]
    assert (out / "utilization.png").is_file()


def test_fused_and_unfused_optimiser_steps_agree(tiny_mnist, tmp_path):
    weights = {}
    for fused in (True, False):
        out = tmp_path / str(fused)
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=1,
                     batch_size=32, fused=fused, progress=False, telemetry=0)
        weights[fused] = checkpoint.load(out / "checkpoint.pt")["model"]
        assert checkpoint.load(out / "checkpoint.pt")["optimizer"]["param_groups"][0][
            "fused"] is (True if fused else None)
    for k, v in weights[True].items():
        torch.testing.assert_close(v, weights[False][k], rtol=1e-4, atol=1e-5)


def test_weight_ema_is_a_warmed_up_exponential_average():
    from cnnlab.engine import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9)
    expected = [t.detach().clone() for t in (*model.parameters(), model[1].running_mean)]
    for step in range(1, 40):
        with torch.no_grad():
            for t in (*model.parameters(), model[1].running_mean):
                t.add_(torch.randn_like(t))
        ema.update(step)
        decay = min(0.9, (1 + step) / (10 + step))  # 0.18 at step 1: the start fades fast
        current = (*model.parameters(), model[1].running_mean)
        expected = [decay * e + (1 - decay) * c.detach() for e, c in zip(expected, current)]
    averaged = (*ema.module.parameters(), ema.module[1].running_mean)
    for a, e in zip(averaged, expected):
        torch.testing.assert_close(a, e)
    assert ema.module[1].num_batches_tracked == 0  # integer buffers are not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_training_with_ema_evaluates_and_saves_the_average(tiny_mnist, tmp_path):
    from cnnlab.inference import evaluate_checkpoint

    out = tmp_path / "r"
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=2,
                           batch_size=32, ema=0.9, progress=False, telemetry=0)
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert ckpt["config"]["ema"] == 0.9
    assert not all(torch.equal(ckpt["model"][k], ckpt["train_model"][k]) for k in ckpt["model"])
    # what eval, predict and export load is what training scored
    result = evaluate_checkpoint(out / "checkpoint.pt", data_dir=str(tiny_mnist))
    assert result["accuracy"] == summary["final_test_acc"]
    with pytest.raises(CnnlabError, match="--ema must be a decay in"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "x", ema=1.5)


def test_flip_tta_is_the_fast_preset_default_for_flip_trained_models(tmp_path):
    from cnnlab.config import resolve

    assert resolve("fastnet", "cifar10").tta == "flip,translate"
    assert resolve("resnet18", "cifar10").tta == "flip"
    assert resolve("resnet18", "folder:x", overrides={"augment": "crop,flip"}).tta == "flip"
    assert resolve("fastnet", "folder:x", overrides={"augment": "crop,altflip"}).tta == "flip"
    assert resolve("resnet18", "cifar10", overrides={"preset": "seed"}).tta == "none"
    assert resolve("lenet5", "mnist").tta == "none"
    assert resolve("fastnet", "cifar10", overrides={"tta": "none"}).tta == "none"
    with pytest.raises(CnnlabError, match="--tta flip needs a model trained with flips"):
        resolve("lenet5", "mnist", overrides={"tta": "flip"})
    with pytest.raises(CnnlabError, match="unknown tta 'mirror'"):
        resolve("fastnet", "cifar10", overrides={"tta": "mirror"})


def test_training_scores_flip_tta_as_eval_does(tmp_path):
    from conftest import write_folder

    from cnnlab.checkpoint import load_model
    from cnnlab.engine import evaluate
    from cnnlab.inference import evaluate_checkpoint

    folder = write_folder(tmp_path / "pets", size=16, n_train=12, n_test=9)
    out = tmp_path / "r"
    summary = cnnlab.train("lenet5", f"folder:{folder}", out=out, epochs=2, batch_size=6,
                           augment="flip", tta="flip", progress=False, telemetry=0)
    assert checkpoint.load(out / "checkpoint.pt")["config"]["tta"] == "flip"
    default = evaluate_checkpoint(out / "checkpoint.pt")  # as training scored the model
    assert default["tta"] == "flip" and default["accuracy"] == summary["final_test_acc"]
    assert evaluate_checkpoint(out / "checkpoint.pt", tta="none")["tta"] is None
    # the loop's evaluation averages the logits of each image and its mirror image
    model = load_model(out / "checkpoint.pt", "cpu").model
    x = torch.rand(4, 3, 16, 16)
    y = ((model(x) + model(x.flip(3))) / 2).argmax(1)
    assert evaluate(model, [(x, y)], tta="flip")["accuracy"] == 100.0


def test_compile_time_is_reported_apart_from_training(tiny_mnist, tmp_path, monkeypatch):
    from cnnlab.runs import read_metrics

    real_compile = torch.compile  # dynamo without inductor's code generation: seconds, not minutes
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    out = tmp_path / "r"
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=out, epochs=2,
                           batch_size=32, lr=0.05, compile=True, progress=False, telemetry=0)
    records = [r for r in read_metrics(out) if r["type"] == "compile"]
    assert len(records) == 1 and records[0]["step"] == 1
    assert summary["compile_seconds"] == pytest.approx(records[0]["seconds"], abs=1e-3)
    assert 0 < summary["train_seconds"] and summary["best_test_acc"] > 50
    assert summary["steps"] == 2 * (512 // 32)


def test_compiled_training_compiles_once(tiny_mnist, tmp_path, monkeypatch):
    """Static shapes: the last partial batch is left out, and evaluation runs eagerly, so a
    run compiles its model once - not again for eval mode, the evaluation's batch size or a
    smaller last batch."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(tuple(tuple(x.shape) for x in example_inputs if hasattr(x, "shape")))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=counting))
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "r",
                           epochs=2, batch_size=48, lr=0.05, compile=True, progress=False,
                           telemetry=0)
    assert summary["steps"] == 2 * (512 // 48)  # 10 full batches an epoch, the 32 left out
    assert len(graphs) == 1, graphs


def test_gpu_suite_plumbing_on_the_cpu(tmp_path, monkeypatch):
    """The gpu suite's own code (not the GPU), on a tiny CIFAR-10 and MNIST: every row of
    issue 14 measured from real runs and run directories, and printed with its target."""
    from conftest import write_cifar, write_mnist

    from cnnlab import bench

    root = write_mnist(write_cifar(tmp_path / "data", n_train=40, n_test=20), 64, 32)
    real_train, real_process, real_epoch, real_compile = (
        cnnlab.train, bench._process, bench.cnnlab_epoch, torch.compile)
    trained = []

    # on the CPU: --cuda-graph rows are timed as eager steps (test_cuda_graph covers it)
    def small(kw: dict) -> dict:
        return {**kw, "device": "cpu", "epochs": 1, "batch_size": 20, "cuda_graph": False}

    def small_train(model, dataset, **kw):
        trained.append((model, dataset, kw["seed"], kw["cuda_graph"]))
        return real_train(model, dataset, **small(kw))

    def small_process(cmd):
        trained.append((cmd[4], "--cuda-graph" in cmd))
        cmd = [arg for arg in cmd if arg != "--cuda-graph"]
        return real_process([*cmd, "--epochs", "1", "--batch-size", "20"])

    def small_epoch(*args, **kw):
        return real_epoch(*args, **{**small(kw), "batch_size": 8, "max_steps": 2, "warmup": 1})

    answers = iter([True])  # the suite's own check passes; everything after sees no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: next(answers, False))
    monkeypatch.setattr(cnnlab, "train", small_train)
    monkeypatch.setattr(bench, "_process", small_process)
    monkeypatch.setattr(bench, "cnnlab_epoch", small_epoch)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    rows = bench.gpu_suite(str(root), None)
    assert trained == [*(("fastnet", "cifar10", seed, graph) for graph in (False, True)
                         for seed in range(5)),
                       ("resnet18", False), ("lenet5", False), ("lenet5", True)]
    assert [r["target"] for r in rows] == [
        "<= 2.0 s, mean >= 90.5%", ">= 90%", "<= 2.0 s, mean >= 90.5%", ">= 90%", "<= 10 s",
        ">= 90%", "<= 15 s", "<= 1.0 s, >= 99.0%", "<= 6 s", "<= 1.0 s, >= 99.0%", "<= 6 s",
        *["(--compile pays: > 1)", "(--cuda-graph pays: > 1)"] * 2]
    assert "--cuda-graph" in rows[2]["name"] and "--cuda-graph" in rows[9]["name"]
    for fastnet in rows[0], rows[2]:
        assert len(fastnet["seconds"]) == len(fastnet["accuracy"]) == 5
        assert fastnet["cnnlab"] == sorted(fastnet["seconds"])[2] > 0
    assert all(rows[i]["cnnlab"] is None for i in (1, 3, 5))  # no NVML on the CPU
    assert rows[4]["cnnlab"] is None  # 91% is out of reach in one epoch of 40 images
    assert rows[6]["cnnlab"] > 0
    for training, whole in (rows[7], rows[8]), (rows[9], rows[10]):
        assert whole["cnnlab"] > training["cnnlab"] > 0
    assert all(r["reference"] > 0 and r["cnnlab"] > 0 for r in rows[11:])
    table = bench.format_table({"date": "today", "env": {"gpus": [], "cpu_model": "cpu",
                                                         "cpu_cores_logical": 2,
                                                         "torch": torch.__version__},
                                "rows": rows})
    assert "fastnet fast preset, seeds 0-4: training + final evaluation" in table
    assert "resnet18 first run: whole process minus training (s)" in table


def test_bench_ablation_rows(tiny_mnist, tmp_path, monkeypatch):
    from conftest import write_folder

    from cnnlab import bench

    folder = write_folder(tmp_path / "pets", size=16, n_train=12, n_test=3)
    monkeypatch.setattr(bench, "_ABLATION", [
        ("lenet5", "mnist", dict(batch_size=64), 3, 1, [("channels_last", False)]),
        ("resnet18", "folder", dict(batch_size=6, precision="bf16"), 2, 1,
         [("precision", "fp32"), ("fused", False)])])
    rows = bench.ablation(str(tiny_mnist), str(folder))
    assert [r["name"] for r in rows] == [
        "  lenet5 img/s: best CPU settings vs --no-channels-last",
        "  resnet18 img/s: best CPU settings vs --precision fp32",
        "  resnet18 img/s: best CPU settings vs --no-fused",
        "  LeNet-5 evaluation of 128 images (s): batch 1000 vs 64"]
    for r in rows:
        assert r["reference"] > 0 and r["cnnlab"] > 0
        better = {"s": r["reference"] / r["cnnlab"], "img/s": r["cnnlab"] / r["reference"]}
        assert r["ratio"] == pytest.approx(better[r["unit"]])  # > 1: cnnlab (the option) wins
    assert [r["unit"] for r in rows] == ["img/s"] * 3 + ["s"]


def test_bench_checks_its_inputs_before_timing_anything(tmp_path, capsys):
    from cnnlab.cli import main

    code = main(["bench", "--data-dir", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cnnlab: error: cnnlab bench --suite cpu needs MNIST's four "
                             f"official IDX files in {tmp_path / 'nothing' / 'MNIST' / 'raw'}")


def test_bench_refuses_gzipped_mnist_the_reference_cannot_read(tmp_path, capsys):
    from conftest import write_mnist

    from cnnlab.cli import main

    root = write_mnist(tmp_path / "data", 64, 32, gz=True)  # cnnlab reads these, torchvision not
    assert main(["bench", "--rows", "loop", "--data-dir", str(root)]) == 2
    assert "uncompressed as torchvision reads them" in capsys.readouterr().err


@pytest.mark.parametrize("argv,keys", [
    (["--rows", "loop,lop"], "'lop' in --suite cpu; its keys are "
                             "loop,process,fast,busy,help,decode,resnet18,ablation"),
    (["--suite", "gpu", "--rows", "loop"], "'loop' in --suite gpu; its keys are "
                                           "fastnet,resnet18-gpu,lenet5-gpu,steps")])
def test_bench_refuses_unknown_rows_in_one_line(tmp_path, capsys, argv, keys):
    from cnnlab.cli import main

    assert main(["bench", *argv, "--data-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cnnlab: error: --rows: no row group {keys}"]


def test_bench_runs_the_rows_asked_for_in_the_suites_order(tiny_mnist, monkeypatch, capsys):
    """--rows picks row groups by key; --suite all asks nothing of the gpu suite (a GPU, CIFAR-10)
    when none of its rows is picked."""
    from cnnlab import bench
    from cnnlab.cli import main

    ran = []
    for key in [*bench.CPU_ROWS, *bench.GPU_ROWS]:
        monkeypatch.setitem(bench.CPU_ROWS if key in bench.CPU_ROWS else bench.GPU_ROWS, key,
                            lambda b, key=key: ran.append(key))
    assert main(["bench", "--suite", "all", "--rows", "help,loop", "--data-dir",
                 str(tiny_mnist)]) == 0
    assert ran == ["loop", "help"]


def test_bench_loop_row_on_a_tiny_mnist(tiny_mnist, tmp_path):
    """The loop row for real: the reference (torchvision's MNIST reading the official IDX
    files) against cnnlab's loop, one epoch of each."""
    import json

    from cnnlab.bench import run_bench

    results = run_bench("cpu", str(tiny_mnist), str(tmp_path / "no-cifar"),
                        str(tmp_path / "b.json"), rows="loop")
    [row] = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row == results["rows"][0]
    assert row["name"] == "LeNet-5/MNIST seed recipe, one epoch of the loop (s)"
    assert row["reference"] > 0 and row["cnnlab"] > 0
    assert row["ratio"] == pytest.approx(row["reference"] / row["cnnlab"])


def test_bench_prints_and_saves_each_row_as_it_comes_and_skips_absent_data(
        tiny_mnist, tmp_path, monkeypatch, capsys):
    """Without the CIFAR-10 folder the cpu suite leaves the ResNet-18 rows out with a note;
    every row is printed and written to --out as soon as it is measured. (The timing itself
    is replaced: this checks the bench's plumbing, not the machine.)"""
    import json
    from pathlib import Path

    from cnnlab import bench, reference

    saved = []

    def fake_process(cmd, env=None):  # the whole-process runs: cnnlab's leave a summary
        saved.append(json.loads((tmp_path / "b.json").read_text())["rows"])
        if "--out" in cmd:
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "summary.json").write_text('{"final_test_acc": 99.1}')
        return 8.0, ""

    monkeypatch.setattr(reference, "lenet_mnist_epoch", lambda data_dir: {"seconds": 4.0})
    monkeypatch.setattr(bench, "cnnlab_epoch", lambda *a, **kw: {"seconds": 2.0})
    monkeypatch.setattr(bench, "_process", fake_process)
    monkeypatch.setattr(bench, "ablation", lambda data_dir, folder: [] if folder is None else 1)
    results = bench.run_bench("cpu", str(tiny_mnist), str(tmp_path / "no-cifar"),
                              str(tmp_path / "b.json"))
    out, err = capsys.readouterr()
    # the file grew row by row: the seed recipe, 5 seeds each after a reference, 5 more
    # seeds, 18 runs quiet and busy, 5 x --help
    assert [len(rows) for rows in saved] == [1, 1] + [2] * 15 + [5] * 18 + [9] * 5
    assert [r["name"][:20] for r in results["rows"]] == [
        "LeNet-5/MNIST seed r", "  same, whole proces", "LeNet-5/MNIST fast p",
        "  same, against one ", "  fast preset on see", *["LeNet-5 fast preset,"] * 4,
        "`cnnlab --help` (s, "]
    busy = results["rows"][5:9]
    assert [r["ratio"] for r in busy] == [1.0] * 4 and "quiet: default" in busy[0]["name"]
    fast, paired, seeds = results["rows"][2:5]
    assert results["rows"][0]["ratio"] == 2.0 and "recorded, not run" in fast["name"]
    assert fast["accuracy"] == [99.1] * 5 and "lowest accuracy 99.10%" in fast["name"]
    assert fast["cnnlab"] == 8.0 and fast["reference_epoch_process_seconds"] == [8.0] * 5
    assert (paired["reference"], paired["cnnlab"], paired["ratio"]) == (8.0, 8.0, 1.0)
    assert paired["paired_ratios"] == [1.0] * 5 and "ratios, 1.00-1.00)" in paired["name"]
    assert seeds["accuracy"] == [99.1] * 10 and seeds["cnnlab"] == 99.1
    assert json.loads((tmp_path / "b.json").read_text()) == results
    assert out.count("\n") == 3 + 10 and "ResNet-18" not in out
    assert "cnnlab bench: no CIFAR-10 image folder: the ResNet-18 rows are left out" in err
    assert err.count("cnnlab bench: next: ") == 6


def test_bench_times_a_first_decode_and_a_cached_read(tmp_path):
    from conftest import write_folder

    from cnnlab import bench

    folder = write_folder(tmp_path / "pets", n_train=4, n_test=2)
    first, cached = bench.decode_seconds(str(folder))
    assert 0 < first and 0 < cached
    # decoded through a folder of links, into a cache of the bench's own: the folder gets no
    # cache, so that the next bench (or a cache the folder keeps) cannot turn the first
    # decode into a read
    assert not (folder / ".cnnlab-cache").exists()


def test_freed_memory_is_kept_for_the_next_step():
    """After keep_freed_memory, LeNet-5's training steps on the CPU reuse the memory the step
    before freed instead of faulting it in anew, page by page."""
    import subprocess
    import sys

    if sys.platform != "linux":
        pytest.skip("glibc's allocator: Linux only")
    code = ("import resource, sys, torch\n"
            "from cnnlab.models import create_model\n"
            "from cnnlab.process import keep_freed_memory\n"
            "if sys.argv[1] == 'kept': keep_freed_memory()\n"
            "net = create_model('lenet5', in_channels=1, num_classes=10, image_size=(28, 28))\n"
            "opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)\n"
            "x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))\n"
            "def step():\n"
            "    opt.zero_grad(); torch.nn.functional.cross_entropy(net(x), y).backward()\n"
            "    opt.step()\n"
            "step()\n"
            "start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(60): step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n")
    kept = int(subprocess.run([sys.executable, "-c", code, "kept"], capture_output=True,
                              text=True, check=True).stdout)
    # glibc's own dynamic thresholds gave about 1,000 faults a step (62,019 in 60), or few,
    # depending on what the process had freed before; kept, a handful a step at most
    assert kept < 60 * 50, kept


def test_train_from_python_leaves_the_allocator_as_it_is(tiny_mnist, tmp_path, monkeypatch):
    """keep_freed_memory is the command's, for its own process: `cnnlab.train()` in a
    caller's process does not change how that process's memory is managed."""
    import ctypes

    looked_up = []

    class Recording(ctypes.CDLL):
        def __getattr__(self, name):
            looked_up.append(name)
            return super().__getattr__(name)

    monkeypatch.setattr(ctypes, "CDLL", Recording)
    cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "r", epochs=1,
                 batch_size=64, device="cpu", progress=False, telemetry=0)
    assert "mallopt" not in looked_up
