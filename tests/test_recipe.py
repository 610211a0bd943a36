"""The fast-recipe ingredients (fastnet's preset): each equals its plain definition -
translation with a mirrored border, alternating flips, the whitening stem, lookahead,
batch-norm learning-rate scaling, the triangle schedule, parameters trained for the first
epochs only, flip + translate test-time averaging - and a run with all of them resumes
bitwise."""

import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import write_folder
from torch import nn

import cnnlab
from cnnlab import checkpoint, trainer
from cnnlab.config import resolve
from cnnlab.data.loader import DeviceLoader, random_crop
from cnnlab.engine import Lookahead, Precision, evaluate, logits, make_train_step
from cnnlab.errors import Interrupted
from cnnlab.models import create_model
from cnnlab.runs import read_metrics


def _crops_by_hand(x, pad, seed, mode):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    p = F.pad(x.float(), (pad,) * 4, mode=mode)
    h, w = x.shape[2:]
    return torch.stack([p[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])


@pytest.mark.parametrize("pad,mirror", [(2, True), (4, False)])
def test_crop_and_translate_equal_padding_then_cropping(pad, mirror):
    x = torch.randint(0, 256, (50, 3, 12, 10), dtype=torch.uint8)
    out = random_crop(x, pad, torch.Generator().manual_seed(3), mirror=mirror)
    assert out.dtype == torch.uint8
    expected = _crops_by_hand(x, pad, 3, "reflect" if mirror else "constant")
    assert torch.equal(out.float(), expected)


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    n = 200
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 1, 2).clone()
    images[..., 1] = 255  # image i is [i, 255]; mirrored, [255, i]
    loader = DeviceLoader(images, torch.arange(n) % 10, batch_size=64, mean=(0.0,), std=(1.0,),
                          device=torch.device("cpu"), shuffle=True, augment=frozenset({"altflip"}),
                          generator=torch.Generator().manual_seed(0), normalize=False)

    def mirrored(epoch):
        flipped = torch.zeros(n, dtype=torch.bool)
        for x, _ in loader.batches(loader.new_order(), 0, epoch):
            x = (x * 255).round().to(torch.uint8)  # the loader gives pixels / 255
            flipped[torch.minimum(x[:, 0, 0, 0], x[:, 0, 0, 1]).long()] = x[:, 0, 0, 0] == 255
        return flipped

    odd, even, odd_again = mirrored(1), mirrored(2), mirrored(3)
    assert torch.equal(odd, ~even) and torch.equal(odd, odd_again)
    assert 60 < int(odd.sum()) < 140  # a random half


def test_whitening_stem_decorrelates_patches_and_stays_fixed():
    torch.manual_seed(0)
    mixing = torch.tensor([[1.0, 0.8, 0.5], [0.0, 0.6, 0.4], [0.0, 0.0, 0.3]])
    x = torch.einsum("dc,nchw->ndhw", mixing, torch.randn(400, 3, 12, 12))  # correlated
    model = create_model("fastnet", in_channels=3, num_classes=10, image_size=(12, 12))
    model.init_from_data(x)
    stem = model.stem[0]
    z = stem(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # bias 0: linear
    cov = z.T @ z / len(z)
    assert torch.allclose(cov, torch.eye(12), atol=0.01)
    assert torch.equal(stem.weight[12:], -stem.weight[:12])
    assert not stem.weight.requires_grad and stem.bias.requires_grad
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.weight.requires_grad for m in norms)
    assert model.early_parameters() == [(stem.bias, 3)]


def test_lookahead_moves_the_slow_weights_on_its_schedule():
    total = 12
    w = nn.Parameter(torch.zeros(3))
    model = nn.Module()
    model.w = w
    look = Lookahead(model, total)
    slow = torch.zeros(3)
    for step in range(1, total + 1):
        with torch.no_grad():
            w += 1.0  # the optimiser's step
        fast = w.detach().clone()
        look.update(step)
        if step == total:
            pass  # the last step: the model ends on the slow weights
        elif step % 5 == 0:
            decay = 0.95 ** 5 * (step / total) ** 3
            slow = decay * slow + (1 - decay) * fast
        else:
            continue
        assert torch.allclose(w.detach(), slow) and torch.allclose(look.module.w, slow)
    assert torch.allclose(w.detach(), slow) and not torch.allclose(slow, fast)


def test_norm_parameters_learn_faster_with_the_same_decay_per_step():
    cfg = resolve("fastnet", "cifar10", overrides={"norm_lr_scale": 64.0, "lr": 1.5,
                                                   "weight_decay": 0.001, "schedule": "onecycle"})
    model = create_model("fastnet", in_channels=3, num_classes=10, image_size=(32, 32))
    opt = trainer.build_optimizer(cfg, model)
    plain, norm = opt.param_groups
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in norm["params"]} == norm_ids
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    assert norm["lr"] == 64 * plain["lr"]
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(plain["lr"] * plain["weight_decay"])
    sched = trainer.build_scheduler(cfg, opt, 20)
    for _ in range(19):  # each group follows the schedule from its own peak
        opt.step()
        sched.step()
        assert norm["lr"] == pytest.approx(64 * plain["lr"])
    one = resolve("lenet5", "mnist")
    assert len(trainer.build_optimizer(one, create_model(
        "lenet5", in_channels=1, num_classes=10, image_size=(28, 28))).param_groups) == 1


def test_triangle_schedule():
    factors = [trainer.triangle(s, 100) for s in range(101)]
    assert factors[0] == pytest.approx(0.2) and factors[23] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.07) and max(factors) == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:23], factors[1:24]))
    assert all(a > b for a, b in zip(factors[23:], factors[24:]))


def test_held_parameters_keep_their_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    held = []
    step = make_train_step(net, nn.CrossEntropyLoss(), opt, sched,
                           Precision("fp32", torch.device("cpu")), held)
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    step(batch)  # momentum for every parameter
    held[:] = [net[0].bias]
    frozen, before = net[0].bias.detach().clone(), net[0].weight.detach().clone()
    for _ in range(3):
        step(batch)
    assert torch.equal(net[0].bias, frozen) and not torch.equal(net[0].weight, before)


def test_flip_translate_averaging_weighs_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(6, 3, 8, 8)
    model(x)
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, p[:, :, :8, :8], p[:, :, 2:, 2:]]
    pairs = [(model(v) + model(v.flip(3))) / 2 for v in views]
    expected = pairs[0] / 2 + (pairs[1] + pairs[2]) / 4
    assert torch.allclose(logits(model, x, "flip,translate"), expected, atol=1e-6)
    y = expected.argmax(1)
    assert evaluate(model, [(x, y)], tta="flip,translate")["accuracy"] == 100.0


RECIPE = dict(epochs=4, batch_size=16, log_every=3, progress=False, telemetry=0,
              augment="translate,altflip", eval_every=2)


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("recipe") / "pets", n_train=16, n_test=4)


def test_the_fast_recipe_trains_evaluates_when_asked_and_resumes_bitwise(pets, tmp_path,
                                                                          monkeypatch):
    ref = tmp_path / "ref"
    summary = cnnlab.train("fastnet", f"folder:{pets}", out=ref, **RECIPE)
    cfg = checkpoint.load(ref / "checkpoint.pt")["config"]
    assert (cfg["lookahead"], cfg["norm_lr_scale"], cfg["schedule"], cfg["tta"]) == \
        (True, 64.0, "triangle", "flip,translate")
    evals = [r["epoch"] for r in read_metrics(ref) if r["type"] == "eval"]
    assert evals == [2, 4] and summary["best_epoch"] in (2, 4)
    ckpt = checkpoint.load(ref / "checkpoint.pt")
    assert "lookahead" in ckpt
    assert all(torch.equal(v, ckpt["lookahead"][k]) for k, v in ckpt["model"].items()
               if v.is_floating_point())  # the run ends on the slow weights

    real = trainer.StopSignals.requested
    steps = {"n": 0}

    def stop_at_step_5(self, dist, collective):  # as if SIGTERM came during step 5
        steps["n"] += 1
        if steps["n"] == 5:
            self.signum = signal.SIGTERM
        return real(self, dist, collective)

    out = tmp_path / "cut"
    monkeypatch.setattr(trainer.StopSignals, "requested", stop_at_step_5)
    with pytest.raises(Interrupted):
        cnnlab.train("fastnet", f"folder:{pets}", out=out, **RECIPE)
    monkeypatch.setattr(trainer.StopSignals, "requested", real)
    cnnlab.train(resume=out, progress=False)
    a, b = checkpoint.load(ref / "checkpoint.pt"), checkpoint.load(out / "checkpoint.pt")
    for key in ("model", "lookahead"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
