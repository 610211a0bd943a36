"""--cuda-graph: the captured step's bookkeeping on the CPU (with an eager stand-in for the
recording), its refusals, and - where there is a GPU - real captures against eager steps."""

import copy

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab import checkpoint, engine, optim
from cnnlab.cli import main
from cnnlab.engine import Precision, make_train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Recorder:
    """An eager stand-in for cuda_graph: 'replaying' calls the recorded function again and
    copies its output where the graph's output would be, so a step sees exactly the inputs,
    learning rates and state that a replay would."""

    def __init__(self) -> None:
        self.captures = self.replays = 0

    def __call__(self, fn):
        self.captures += 1
        out = torch.zeros(())

        def replay():
            self.replays += 1
            out.copy_(fn())

        return replay, out


def _training(optimizer: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    norms = list(model[1].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in norms)]
    groups = [{"params": rest}, {"params": norms, "lr": 0.4}]  # two lrs, as --norm-lr-scale
    if optimizer == "sgd":
        opt = optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                        fused=True)
    else:
        opt = optim.AdamW(groups, lr=0.01, weight_decay=5e-4, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.4], total_steps=16,
                                                cycle_momentum=False)
    return model, opt, sched


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_captured_step_trains_as_the_eager_step(optimizer, monkeypatch):
    """Warm-up steps, the copy of each batch into the graph's inputs, learning rates read
    from device tensors refilled every step, and a new graph when the held parameters
    change: the same training as eager steps, bit for bit (on a GPU the lr is a float32)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(16)]
    results = []
    recorder = Recorder()
    monkeypatch.setattr(engine, "cuda_graph", recorder)  # the stand-in for a CUDA graph
    for graphed in (False, True):
        model, opt, sched = _training(optimizer)
        held: list[nn.Parameter] = []
        step = make_train_step(model, nn.CrossEntropyLoss(label_smoothing=0.1), opt, sched,
                               Precision("fp32", torch.device("cpu")), held, graph=graphed)
        losses = []
        for i, batch in enumerate(batches):
            if i == 8:  # e.g. fastnet's stem bias, trained in the first epochs only
                held[:] = [model[0].bias]
            losses.append(step(batch).item())
            assert all(isinstance(group["lr"], float) for group in opt.param_groups)
        results.append((losses, copy.deepcopy(model.state_dict())))
    (eager_losses, eager_state), (losses, state) = results
    # captured at the 4th step and again at the 4th after the change: 5 + 5 replays
    assert (recorder.captures, recorder.replays) == (2, 10)
    assert losses == eager_losses
    assert all(torch.equal(state[name], tensor) for name, tensor in eager_state.items())


def test_a_captured_step_refuses_a_batch_of_another_shape(monkeypatch):
    monkeypatch.setattr(engine, "cuda_graph", Recorder())
    model, opt, sched = _training("sgd")
    step = make_train_step(model, nn.CrossEntropyLoss(), opt, sched,
                           Precision("fp32", torch.device("cpu")), graph=True)
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    for _ in range(engine.CapturedStep.WARMUP + 1):
        step(batch)
    with pytest.raises(RuntimeError, match=r"batches of \(8, 1, 8, 8\), not \(1, 1, 8, 8\)"):
        step((batch[0][:1], batch[1][:1]))  # copy_ would have broadcast it


@pytest.mark.parametrize("options,message", [
    ({"compile": True}, "does not work with --compile"),
    ({"precision": "fp16"}, "does not work with --precision fp16"),
    ({"detect_anomaly": True}, "does not work with --detect-anomaly"),
    ({"optimizer": "adamax"}, "not --optimizer adamax"),
    ({"fused": False}, "--no-fused"),
    ({"device": "cpu"}, "needs a GPU and one process: this run trains on cpu"),
])
def test_what_cannot_be_captured_is_one_clear_error(tiny_mnist, tmp_path, capsys, options,
                                                    message):
    argv = ["train", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--out",
            str(tmp_path / "r"), "--cuda-graph"]
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        argv += [name] if value is True else ["--no-fused"] if value is False else [name, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_cuda_graph_refuses_several_processes_before_launching(tiny_mnist, capsys):
    assert main(["train", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--cuda-graph",
                 "--nproc", "2", "--device", "cuda"]) == 2
    assert "--cuda-graph trains in one process" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_onecycle_keeps_the_momentum_it_is_given(tiny_mnist):
    from cnnlab.config import resolve
    from cnnlab.devices import resolve_device
    from cnnlab.trainer import build

    cfg = resolve("lenet5", "mnist", overrides={"data_dir": str(tiny_mnist), "momentum": 0.8,
                                                 "device": "cpu"})
    t = build(cfg, resolve_device("cpu"))
    for _ in range(5):
        t.state.scheduler.step()
    assert cfg.schedule == "onecycle"
    assert all(group["momentum"] == 0.8 for group in t.state.optimizer.param_groups)


@needs_cuda
@pytest.mark.parametrize("model,optimizer", [("lenet5", "sgd"), ("lenet5", "adamw"),
                                             ("fastnet", "sgd")])
def test_cuda_graph_training_matches_eager_training_on_a_gpu(tiny_mnist, tmp_path,
                                                             monkeypatch, model, optimizer):
    """Real captures: the same weights as eager steps (deterministic kernels, both). fastnet
    trains its stem bias in the first epochs only: a second graph takes over after them."""
    from conftest import write_folder

    from cnnlab.models.fastnet import STEM_BIAS_EPOCHS

    captures, real = [], engine.cuda_graph

    def counted(fn):
        captures.append(fn)
        return real(fn)

    monkeypatch.setattr(engine, "cuda_graph", counted)
    if model == "fastnet":
        data = dict(dataset=f"folder:{write_folder(tmp_path / 'pets', n_train=16, n_test=4)}",
                    epochs=STEM_BIAS_EPOCHS + 2, augment="translate,altflip")
    else:
        data = dict(dataset="mnist", data_dir=str(tiny_mnist), epochs=3)
    dataset = data.pop("dataset")  # 512 and 48 training images: no partial batch to drop
    summaries, weights = [], []
    for graphed in (False, True):
        captures.clear()
        out = tmp_path / f"r{int(graphed)}"
        summaries.append(cnnlab.train(
            model, dataset, out=out, device="cuda", batch_size=16, optimizer=optimizer,
            lr=0.05 if optimizer == "sgd" else 0.003, cuda_graph=graphed, deterministic=True,
            precision="fp32", progress=False, telemetry=0, **data))
        weights.append(checkpoint.load(out / "checkpoint.pt")["model"])
    assert len(captures) == (2 if model == "fastnet" else 1)
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-3, atol=1e-5, msg=name)
    one_image = 100 / (12 if model == "fastnet" else 128)  # at most one test image differs
    assert abs(summaries[0]["final_test_acc"] - summaries[1]["final_test_acc"]) <= one_image + 1e-9
