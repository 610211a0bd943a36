"""cnnlab's optimisers compute exactly what torch.optim's do - every update, the state_dict,
resuming from either - without importing torch._dynamo (a second or two of start-up)."""

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
            "assert 'torch._dynamo' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
