"""cnnlab's optimisers compute exactly what torch.optim's do - every update, the state_dict,
resuming from either - without importing torch._dynamo (a second or two of start-up)."""

import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from cnnlab import optim

CASES = [
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                      fused=True)),
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),  # foreach
    (optim.SGD, torch.optim.SGD, dict(lr=0.05)),  # no momentum
    (optim.Adam, torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-4, fused=True)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05)),
    (optim.Adamax, torch.optim.Adamax, dict(lr=2e-3)),
]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _train(net, opt, steps, start=0):
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=20)
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("ours,theirs,kwargs", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_same_updates_and_state_as_torch_optim(ours, theirs, kwargs):
    a, b = _net(), _net()
    oa, ob = ours(a.parameters(), **kwargs), theirs(b.parameters(), **kwargs)
    assert isinstance(oa, theirs)
    _train(a, oa, 6)
    _train(b, ob, 6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sb["state"]:
        assert all(torch.equal(sa["state"][k][n], v) if isinstance(v, torch.Tensor)
                   else sa["state"][k][n] == v for n, v in sb["state"][k].items())
    # a state saved by either resumes in the other
    c = _net()
    c.load_state_dict(a.state_dict())
    oc = theirs(c.parameters(), **kwargs)
    oc.load_state_dict(sa)
    oa.load_state_dict(sb)
    _train(a, oa, 3, start=6)
    _train(c, oc, 3, start=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_the_torch_class_itself_where_a_method_is_not_decorated():
    class Undecorated(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none)

    assert optim.without_dynamo_guards(Undecorated) is Undecorated
    assert optim.without_dynamo_guards(torch.optim.SGD) is not torch.optim.SGD


def test_no_dynamo_import():
    code = ("import sys, torch\n"
            "from cnnlab.optim import SGD\n"
            "net = torch.nn.Linear(3, 2)\n"
            "opt = SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)\n"
            "net(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "opt.load_state_dict(opt.state_dict())\n"
            "if hasattr(torch.optim, 'Muon'):\n"
            "    from cnnlab.optim import MuonSGD\n"
            "    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())\n"
            "    opt = MuonSGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0,\n"
            "                  muon_lr=0.1, muon_momentum=0.6)\n"
            "    net(torch.randn(4, 1, 5, 5)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "    opt.load_state_dict(opt.state_dict())\n"
            "assert 'torch._dynamo' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


muon_only = pytest.mark.skipif(optim.Muon is None, reason="this torch has no torch.optim.Muon")
MUON = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3, fused=True,
            muon_lr=0.05, muon_momentum=0.6)


def _muon_steps(net, step, steps, start=0, hold=()):
    """`steps` training steps of `net`, `step()` the optimiser's and schedule's; on the
    steps in `hold` the convolution filter has no gradient (held)."""
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        for p in net.parameters():
            p.grad = None
        nn.functional.cross_entropy(net(x), y).backward()
        if i in hold:
            net[0].weight.grad = None
        step()


@muon_only
def test_muon_updates_the_filters_as_torch_muon_and_the_rest_as_torch_sgd():
    """Each filter moves as torch.optim.Muon moves a 2-D copy of it given the same gradients,
    every other parameter as torch.optim.SGD moves it, under one schedule; a filter without a
    gradient (held) stays as it is."""
    a, b = _net(), _net()
    ours = optim.MuonSGD([{"params": list(a.parameters())}], **MUON)
    assert isinstance(ours, torch.optim.Optimizer)
    assert [len(g["params"]) for g in ours.param_groups] == [5, 1]  # the conv weight: Muon's
    rest = [p for p in b.parameters() if p.dim() != 4]
    sgd = torch.optim.SGD(rest, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3,
                          fused=True)
    matrix = nn.Parameter(b[0].weight.detach().reshape(4, -1).clone())
    muon = torch.optim.Muon([matrix], lr=0.05, momentum=0.6, nesterov=True, weight_decay=5e-3)
    factor = lambda step: 1 - step / 10  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (ours, sgd, muon)]

    def reference_step():
        grad = b[0].weight.grad
        matrix.grad = None if grad is None else grad.reshape(4, -1)
        sgd.step()
        muon.step()
        with torch.no_grad():
            b[0].weight.copy_(matrix.view_as(b[0].weight))
        for s in scheds[1:]:
            s.step()

    before = a[0].weight.detach().clone()
    _muon_steps(a, lambda: (ours.step(), scheds[0].step()), 6, hold={0})
    _muon_steps(b, reference_step, 6, hold={0})
    assert not torch.equal(a[0].weight, before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ours.param_groups[1]["lr"] == muon.param_groups[0]["lr"] == pytest.approx(0.05 * 0.4)


def test_muon_takes_the_hidden_layers_weights_and_leaves_the_head_to_sgd():
    from cnnlab.models.lenet import LeNet5
    from cnnlab.trainer import hidden_weights

    lenet = LeNet5()
    f, c = lenet.features, lenet.classifier
    assert [id(p) for p in hidden_weights(lenet)] == \
        [id(p) for p in (f[0].weight, f[3].weight, c[1].weight, c[3].weight)]  # not c[5]
    hidden = hidden_weights(_net())
    assert len(hidden) == 1 and hidden[0].dim() == 4  # one convolution, a linear head


@muon_only
def test_a_hidden_linear_weight_moves_as_torch_muon_moves_it():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    b = copy.deepcopy(a)
    ours = optim.MuonSGD(a.parameters(), matrices=[a[1].weight], **MUON)
    muon = torch.optim.Muon([b[1].weight], lr=0.05, momentum=0.6, nesterov=True,
                            weight_decay=5e-3)
    sgd = torch.optim.SGD([p for n, p in b.named_parameters() if n != "1.weight"], lr=0.1,
                          momentum=0.9, nesterov=True, weight_decay=5e-3, fused=True)
    _muon_steps(a, ours.step, 4)
    _muon_steps(b, lambda: (sgd.step(), muon.step()), 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@muon_only
def test_a_held_filter_keeps_its_value_and_gets_no_momentum():
    net = _net()
    opt = optim.MuonSGD([{"params": list(net.parameters())}], **MUON)
    before = net[0].weight.detach().clone()
    _muon_steps(net, opt.step, 3, hold={0, 1, 2})
    assert torch.equal(net[0].weight, before) and net[0].weight not in opt.state


@muon_only
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_muon_resumes_from_its_state_dict_bitwise(layout):
    """Saved (through torch.save, as a checkpoint is) and loaded into a new optimiser of a
    copy of the model, the state continues exactly; Muon's momentum is kept in the filter's
    own shape, and a channels-last filter is updated in place."""
    a = _net().to(memory_format=layout)
    oa = optim.MuonSGD([{"params": list(a.parameters())}], **MUON)
    sa = torch.optim.lr_scheduler.OneCycleLR(oa, max_lr=[g["lr"] for g in oa.param_groups],
                                             total_steps=20, cycle_momentum=False)
    _muon_steps(a, lambda: (oa.step(), sa.step()), 6)
    saved = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict(), "sched": sa.state_dict()}, saved)
    saved.seek(0)
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["opt"]["state"][5]["momentum_buffer"].shape == a[0].weight.shape
    c = _net().to(memory_format=layout)
    c.load_state_dict(ckpt["model"])
    oc = optim.MuonSGD([{"params": list(c.parameters())}], **MUON)
    sc = torch.optim.lr_scheduler.OneCycleLR(oc, max_lr=[g["lr"] for g in oc.param_groups],
                                             total_steps=20, cycle_momentum=False)
    oc.load_state_dict(ckpt["opt"])
    sc.load_state_dict(ckpt["sched"])
    pointer = c[0].weight.data_ptr()
    _muon_steps(a, lambda: (oa.step(), sa.step()), 4, start=6)
    _muon_steps(c, lambda: (oc.step(), sc.step()), 4, start=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert c[0].weight.data_ptr() == pointer
    assert torch.equal(oa.state[a[0].weight]["momentum_buffer"],
                       oc.state[c[0].weight]["momentum_buffer"])


@muon_only
@pytest.mark.parametrize("schedule", ["onecycle", "triangle"])
def test_the_schedule_scales_the_muon_group_as_the_sgd_groups(schedule):
    from cnnlab import trainer
    from cnnlab.config import resolve
    from cnnlab.models import create_model

    cfg = resolve("fastnet", "cifar10", overrides={"optimizer": "muon", "schedule": schedule,
                                                   "muon_lr": 0.3})
    model = create_model("fastnet", in_channels=3, num_classes=10, image_size=(32, 32))
    opt = trainer.build_optimizer(cfg, model)
    plain, norm, filters = opt.param_groups
    assert {p.dim() for p in filters["params"]} == {4} and 4 not in {
        p.dim() for g in (plain, norm) for p in g["params"]}
    assert (plain["lr"], norm["lr"], filters["lr"]) == (1.5, 96.0, 0.3)
    assert (filters["momentum"], filters["nesterov"], filters["weight_decay"]) == (
        0.6, True, cfg.weight_decay)
    sched = trainer.build_scheduler(cfg, opt, 20)
    for _ in range(19):
        opt.step()  # no gradients: nothing moves
        assert opt._muon.param_groups[0]["lr"] == filters["lr"]  # what Muon stepped with
        sched.step()
        assert filters["lr"] == pytest.approx(0.2 * plain["lr"])


@muon_only
def test_an_sgd_state_does_not_fit_muon_nor_a_muon_state_sgd():
    """What --resume's checks (checkpoint.check_fits) say of an optimiser state of the other
    kind; the parameter shapes are the model's, in the optimiser's order, as the trainer
    gives them."""
    from cnnlab.checkpoint import _optimizer_misfit

    net = _net()
    sgd = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    muon = optim.MuonSGD(net.parameters(), **MUON)
    _muon_steps(net, lambda: (sgd.step(), muon.step()), 1)
    shapes = {o: [p.shape for g in o.param_groups for p in g["params"]] for o in (sgd, muon)}
    assert _optimizer_misfit(muon.state_dict(), muon.state_dict(), shapes[muon]) is None
    assert _optimizer_misfit(sgd.state_dict(), muon.state_dict(), shapes[muon]) == \
        "optimizer.param_groups holds 1 items, not 2"
    assert _optimizer_misfit(muon.state_dict(), sgd.state_dict(), shapes[sgd]) == \
        "optimizer.param_groups holds 2 items, not 1"


@muon_only
def test_muon_steps_through_a_loss_scaler_as_without_one():
    """fp16's GradScaler unscales every gradient in param_groups - the filters' too - before
    the step; a scale of a power of two changes nothing."""
    a, b = _net(), _net()
    oa, ob = (optim.MuonSGD(n.parameters(), **MUON) for n in (a, b))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        oa.zero_grad()
        nn.functional.cross_entropy(a(x), y).backward()
        oa.step()
        ob.zero_grad()
        scaler.scale(nn.functional.cross_entropy(b(x), y)).backward()
        scaler.step(ob)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
