"""torch.optim's optimisers without their start-up cost.

Every torch.optim optimiser guards its methods against torch.compile's tracer; the guard
imports `torch._dynamo` the first time one of them runs, which takes 1.3-2.4 s on a 2-core
CPU - a fifth of a whole LeNet-5 run. The classes here are the torch.optim classes
themselves (same update, same fused kernels, same state_dict, isinstance checks and
schedulers work) with those methods called undecorated: they compute exactly what
torch.optim computes (tests/test_optim.py), minus the import. They are for an optimiser
step that runs eagerly, as cnnlab's does (--compile compiles the model, not the step); a
step traced by torch.compile needs torch.optim's own classes."""

from __future__ import annotations

import inspect

import torch

_GUARDED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def without_dynamo_guards(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of the torch.optim optimiser `cls` whose methods run undecorated; `cls`
    itself should one of them not be a decorated plain function (a torch that guards them
    otherwise): slower to start, never wrong."""
    methods = {}
    for name in (*_GUARDED, "step"):
        method = getattr(cls, name)
        plain = inspect.unwrap(method)
        if plain is method or not inspect.isfunction(plain):
            return cls
        methods[name] = plain
    step = methods["step"]  # its guard also turns gradients off, as done here

    def unguarded_step(self, closure=None):
        with torch.no_grad():
            return step(self, closure)

    methods["step"] = unguarded_step
    return type(cls.__name__, (cls,), {**methods, "__module__": __name__,
                                       "__doc__": f"torch.optim.{cls.__name__}, unguarded."})


SGD = without_dynamo_guards(torch.optim.SGD)
Adam = without_dynamo_guards(torch.optim.Adam)
AdamW = without_dynamo_guards(torch.optim.AdamW)
Adamax = without_dynamo_guards(torch.optim.Adamax)
