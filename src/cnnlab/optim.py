"""torch.optim's optimisers without their start-up cost.

Every torch.optim optimiser guards its methods against torch.compile's tracer; the guard
imports `torch._dynamo` the first time one of them runs, which takes 1.3-2.4 s on a 2-core
CPU - a fifth of a whole LeNet-5 run. The classes here are the torch.optim classes
themselves (same update, same fused kernels, same state_dict, isinstance checks and
schedulers work) with those methods called undecorated: they compute exactly what
torch.optim computes (tests/test_optim.py), minus the import. They are for an optimiser
step that runs eagerly, as cnnlab's does (--compile compiles the model, not the step); a
step traced by torch.compile needs torch.optim's own classes.

`MuonSGD` (--optimizer muon) is torch.optim.Muon for weight matrices and SGD for the
rest, as one optimiser."""

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
# torch >= 2.9; None in older ones (checks.validate refuses --optimizer muon there)
Muon = without_dynamo_guards(torch.optim.Muon) if hasattr(torch.optim, "Muon") else None


def _unguarded(name: str):
    """torch.optim.Optimizer's method `name` without its guard (see without_dynamo_guards)."""
    return inspect.unwrap(getattr(torch.optim.Optimizer, name))


def _memory_order(p: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of `p` after the first, outermost in memory first: (1, 2, 3) for a
    contiguous filter, (2, 3, 1) for a channels-last one."""
    return tuple(sorted(range(1, p.dim()), key=lambda d: -p.stride(d)))


def _rows(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """`t` (a filter, its gradient or its momentum) as a matrix: out-channels x the rest, the
    rest in `order` - a view of t wherever its layout is the filter's, else a copy. The order
    of the columns changes nothing: Newton-Schulz of the columns permuted is its result with
    the columns permuted alike."""
    return t.permute(0, *order).reshape(t.shape[0], -1)


class MuonSGD(torch.optim.Optimizer):
    """--optimizer muon: torch.optim.Muon updates the weight matrices `matrices` (default:
    every 4-D parameter, the convolution filters) through a 2-D view of each (out-channels x
    the rest, sharing its storage); SGD (`sgd`: its lr, momentum, nesterov, fused) every
    other parameter. One optimiser for the
    rest of the code: `param_groups` are SGD's groups then the filters' group, all of the
    model's own parameters (so the schedulers scale both parts, GradScaler unscales every
    gradient and the checkpoint checks see each state in its parameter's shape), and `state`
    holds both parts' state, Muon's momentum in the filter's shape. Muon's weight decay is
    decoupled, as torch's Muon has it (each step the filter shrinks by lr x weight_decay);
    SGD's adds weight_decay x the weight to the gradient, as with --optimizer sgd."""

    add_param_group = _unguarded("add_param_group")
    zero_grad = _unguarded("zero_grad")
    state_dict = _unguarded("state_dict")

    def __init__(self, params, *, muon_lr: float, muon_momentum: float,
                 weight_decay: float, matrices=None, **sgd) -> None:
        groups = list(params)  # parameters, or groups of them (dicts), as torch.optim takes
        if not groups or not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [dict(g, params=list(g["params"])) for g in groups]  # the filters move out
        chosen = ({id(p) for p in matrices} if matrices is not None else
                  {id(p) for g in groups for p in g["params"] if p.dim() == 4})
        self.filters = [p for g in groups for p in g["params"] if id(p) in chosen]
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in chosen]
        self._sgd = SGD(groups, weight_decay=weight_decay, **sgd)
        self._orders = [_memory_order(p) for p in self.filters]
        self._views = [_rows(p.detach(), order) for p, order in zip(self.filters, self._orders)]
        if any(v.data_ptr() != p.data_ptr() for v, p in zip(self._views, self.filters)):
            raise ValueError("a 4-D parameter's layout has no 2-D view for Muon")
        self._muon = Muon(self._views, lr=muon_lr, momentum=muon_momentum, nesterov=True,
                          weight_decay=weight_decay)
        super().__init__([*self._sgd.param_groups,
                          dict(self._muon.param_groups[0], params=self.filters)], {})
        self.defaults = self._sgd.defaults  # what schedulers ask of an optimiser (a momentum)
        self._link()

    def _link(self) -> None:
        """Let both parts work on this optimiser's groups and state (load_state_dict
        replaces them): SGD's groups and state are its own, Muon's group is the last one's
        settings (copied at each step) and its momentum a view of the filter's."""
        self._sgd.param_groups, self._sgd.state = self.param_groups[:-1], self.state
        self._muon.state.clear()
        for p, view, order in zip(self.filters, self._views, self._orders):
            buffer = self.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                self._keep_momentum(p, view, order, buffer)

    def _keep_momentum(self, p: torch.Tensor, view: torch.Tensor, order: tuple[int, ...],
                       buffer: torch.Tensor) -> None:
        if buffer.stride() != p.stride():  # a loaded one: into the filter's layout
            buffer = torch.empty_like(p.detach()).copy_(buffer)
        self.state[p]["momentum_buffer"] = buffer
        self._muon.state[view]["momentum_buffer"] = buffer.permute(0, *order).view(view.shape)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sgd.step()
        self._muon.param_groups[0].update(
            (k, v) for k, v in self.param_groups[-1].items() if k != "params")
        for p, view, order in zip(self.filters, self._views, self._orders):
            view.grad = None if p.grad is None else _rows(p.grad, order)  # None: held
            if p.grad is not None and "momentum_buffer" not in self.state[p]:
                self._keep_momentum(p, view, order,
                                    torch.zeros_like(p, memory_format=torch.preserve_format))
        self._muon.step()
        for view in self._views:
            view.grad = None
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        _unguarded("load_state_dict")(self, state_dict)
        self._link()
