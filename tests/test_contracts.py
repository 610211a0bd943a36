"""Each contract has one owner: the checkpoint format, atomic files, the training step, the
exit statuses."""

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab import checkpoint
from cnnlab.checkpoint import ModelMeta
from cnnlab.engine import LoopState, Precision, make_train_step
from cnnlab.errors import CnnlabError, Exit, TrainingDiverged, one_line
from cnnlab.files import atomic_write, safe_name

SRC = Path(__file__).resolve().parents[1] / "src" / "cnnlab"
META = ModelMeta(name="lenet5", in_channels=1, num_classes=3, image_size=(28, 28),
                 classes=("a", "b", "c"), mean=(0.5,), std=(0.25,), normalize=False,
                 options={"pool": "avg"})


def test_model_meta_round_trips_and_rebuilds_the_model():
    stored = META.to_dict()
    assert stored["image_size"] == [28, 28] and stored["classes"] == ["a", "b", "c"]
    assert ModelMeta.from_dict(stored, "x.pt") == META
    model = META.build()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    assert isinstance(model.features[2], nn.AvgPool2d)  # the option travelled
    with pytest.raises(CnnlabError, match="x.pt has inconsistent model_meta"):
        ModelMeta.from_dict(stored | {"mean": [0.1, 0.2]}, "x.pt")
    with pytest.raises(CnnlabError, match="model_meta lacks std"):
        ModelMeta.from_dict({k: v for k, v in stored.items() if k != "std"}, "x.pt")


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path):
    model = META.build()
    checkpoint.save({"format": checkpoint.FORMAT, "model": model.state_dict(),
                     "model_meta": META.to_dict()}, tmp_path / "ok.pt")
    loaded = checkpoint.load_model(tmp_path / "ok.pt")
    assert loaded.meta == META and loaded.config == {} and loaded.epochs_done is None
    checkpoint.save({"format": checkpoint.FORMAT + 1, "model": model.state_dict()},
                    tmp_path / "new.pt")
    with pytest.raises(CnnlabError, match="newer than this cnnlab reads"):
        checkpoint.load(tmp_path / "new.pt")


def test_a_checkpoint_saved_to_two_files_is_the_same_in_both(tmp_path):
    weights = META.build().state_dict()
    checkpoint.save({"model": weights, "model_meta": META.to_dict()}, tmp_path / "best.pt",
                    tmp_path / "checkpoint.pt")
    assert (tmp_path / "best.pt").read_bytes() == (tmp_path / "checkpoint.pt").read_bytes()
    assert all(torch.equal(checkpoint.load(tmp_path / "best.pt")["model"][k], v)
               for k, v in weights.items())


def test_only_the_checkpoint_module_saves_or_loads_with_torch():
    offenders = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                 if p.name != "checkpoint.py"
                 and re.search(r"torch\.(save|load)\(", p.read_text())]
    assert offenders == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, b"old")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_names_and_messages_helpers():
    assert safe_name("folder:my photos/train") == "folder-my-photos-train"
    assert safe_name("lr=0.1,pool=max") == "lr=0.1,pool=max" and safe_name("///", "x") == "x"
    assert one_line(RuntimeError("  first   line \nsecond")) == "first line second"
    assert one_line(RuntimeError("x" * 500), limit=10) == "x" * 10
    assert one_line(ValueError()) == "ValueError"
    assert Exit.for_signal(signal.SIGINT) == 130 and Exit.for_signal(signal.SIGTERM) == 143


def test_train_step_is_forward_backward_and_step():
    """One call of train_step does what the textbook loop does, and reads nothing back."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda step: 0.5 ** step)
    correct, right = torch.zeros((), dtype=torch.int64), 0
    step = make_train_step(a, nn.CrossEntropyLoss(), opt_a, sched,
                           Precision("fp32", torch.device("cpu")), correct=correct)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        loss = step((x, y))
        expected = nn.functional.cross_entropy(b(x), y)
        # the images the step's own logits got right (before its update), added up
        right += (b(x).argmax(1) == y).sum().item()
        assert correct.item() == right
        opt_b.zero_grad()
        expected.backward()
        opt_b.step()
        for group in opt_b.param_groups:
            group["lr"] = 0.1 * 0.5 ** (i + 1)
        assert not loss.requires_grad and torch.equal(loss, expected.detach())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_loop_state_counts_on_the_device_and_stops_on_nan():
    state = LoopState()
    for loss in (1.0, 3.0):
        state.count(torch.tensor(loss), images=4)
    assert (state.step, state.batch, state.images) == (2, 2, 8)
    assert state.take_window() == (2.0, None) and state.window_steps == 0
    state.window_correct = torch.zeros((), dtype=torch.float64)
    for loss, right in ((1.0, 3), (3.0, 2)):  # 5 of 8 images right: 62.5%
        state.count(torch.tensor(loss), images=4)
        state.window_correct += right  # as the training step does
    assert state.take_window() == (2.0, 62.5) and state.window_images == 0
    assert state.window_correct.item() == 0
    state.count(torch.tensor(float("nan")), images=4)
    with pytest.raises(TrainingDiverged, match="by step 5"):
        state.take_window()
