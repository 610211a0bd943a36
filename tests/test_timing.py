"""Timed spans are synchronised at their edges and never inside a step: what train_seconds
says is what a stopwatch around the device's work would show."""

import pytest
import torch

import cnnlab
from cnnlab import engine, trainer
from cnnlab.runs import read_metrics


def _events(monkeypatch) -> list[str]:
    """Record, in order, every device synchronisation and every training step."""
    events: list[str] = []
    real_sync, make = engine.synchronize, trainer.make_train_step

    def sync(device):
        events.append("sync")
        real_sync(device)

    def recording_make(*args, **kwargs):
        step = make(*args, **kwargs)

        def recorded(batch):
            events.append("step")
            return step(batch)
        return recorded

    monkeypatch.setattr(engine, "synchronize", sync)
    monkeypatch.setattr(trainer, "make_train_step", recording_make)
    return events


def _runs_between_syncs(events: list[str]) -> list[int]:
    """The number of steps between one synchronisation and the next (0s left out)."""
    runs, n = [], 0
    for event in events:
        if event == "sync":
            if n:
                runs.append(n)
            n = 0
        else:
            n += 1
    return runs + ([n] if n else [])


def test_the_clock_synchronises_at_the_edges_of_each_span_only(tiny_mnist, tmp_path,
                                                                monkeypatch):
    events = _events(monkeypatch)  # 512 images, batch 16: 32 steps an epoch
    cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=tmp_path / "run", epochs=2,
                 batch_size=16, log_every=10**6, telemetry=0, progress=False)
    assert events.count("step") == 64
    # each epoch one span: a synchronisation before its first step and after its last
    assert _runs_between_syncs(events) == [32, 32]
    assert events[0] == "sync" and events[events.index("step") - 1] == "sync"


def test_a_checkpoint_within_an_epoch_ends_one_span_and_starts_the_next(tiny_mnist, tmp_path,
                                                                       monkeypatch):
    events = _events(monkeypatch)
    cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=tmp_path / "run", epochs=1,
                 batch_size=16, log_every=10**6, telemetry=0, checkpoint_every="10",
                 progress=False)
    # the checkpoint's writing is outside the timed spans: lap before it, start after it
    assert _runs_between_syncs(events) == [10, 10, 10, 2]
    pairs = sum(a == b == "sync" for a, b in zip(events, events[1:]))
    assert pairs == 3  # at each checkpoint: the lap's synchronisation, then the start's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_seconds_match_a_cuda_event_timed_span(tiny_mnist, tmp_path, monkeypatch):
    """On a GPU the host runs ahead: unsynchronised, train_seconds would be the time to queue
    the work. Here CUDA events around each epoch's steps time the device itself."""
    spans = []
    run_epoch = trainer.train_epoch

    def timed(t, *args, **kwargs):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        run_epoch(t, *args, **kwargs)
        end.record()
        spans.append((start, end))

    monkeypatch.setattr(trainer, "train_epoch", timed)
    summary = cnnlab.train("lenet5", "mnist", data_dir=tiny_mnist, out=tmp_path / "run",
                           epochs=2, batch_size=16, log_every=10**6, telemetry=0,
                           device="cuda", progress=False)
    torch.cuda.synchronize()
    events_seconds = sum(start.elapsed_time(end) for start, end in spans) / 1000
    train_seconds = [r for r in read_metrics(tmp_path / "run") if r["type"] == "eval"][-1][
        "train_seconds"]
    assert summary["train_seconds"] == pytest.approx(train_seconds, abs=1e-3)
    assert train_seconds == pytest.approx(events_seconds, rel=0.1, abs=0.005)
