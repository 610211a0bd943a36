"""Every precision and memory-format option trains correctly on CPU (no timing asserted)."""

import pytest
import torch

import cnnlab
from cnnlab.errors import CnnlabError
from cnnlab.models import count_parameters, create_model
from cnnlab.runs import load_checkpoint


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("fp32", True),
                                                     ("bf16", False), ("bf16", True)])
def test_precisions_and_memory_formats_learn(tiny_mnist, tmp_path, precision, channels_last):
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "r",
                           epochs=2, batch_size=32, lr=0.05, precision=precision,
                           channels_last=channels_last, progress=False, telemetry=0)
    assert summary["precision"] == precision and summary["channels_last"] == channels_last
    assert summary["best_test_acc"] > 50  # the synthetic classes are easy to learn
    weights = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["model"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_fp16_needs_a_gpu(tiny_mnist, tmp_path):
    with pytest.raises(CnnlabError, match="fp16 needs a GPU"):
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "r",
                     precision="fp16", progress=False)


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
                 log_every=8, telemetry=0.05, tensorboard=True, progress=False)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/test_acc"} <= set(acc.Tags()["scalars"])
    telemetry = [r for r in read_metrics(out) if r["type"] == "telemetry"]
    assert telemetry and all(r["rss_mb"] > 0 and r["gpu_util"] is None for r in telemetry)
    assert "no GPU" in telemetry[0]["notes"][0]
    assert (out / "utilization.png").is_file()
