"""DyCL sees through `functools.wraps` decorators: the wrapped function becomes the host program and the
wrapper's own code runs around it, as written (kwargs it changes, outputs it rewrites, hooks it installs).
A wrapper that cannot be re-applied keeps the function eager, with one warning naming it."""

from __future__ import annotations

import contextvars
import copy
import functools
import types
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import dycl

D = 8
PASSES = "fuse,codegen{backend=extern}"


@pytest.fixture(autouse=True)
def _compile_every_segment(monkeypatch):
    """Tiny segments are compiled too (not timed against their plain Python): the compiled path is tested."""
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)


def inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(-4, 5, (2, D), generator=g).float() * s for s in (0.25, 1.0, 3.0, -0.5)]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def compile_(model: nn.Module):
    return fxcc.compile(model, passes=PASSES, options=fxcc.CompileOptions(graph_cache=False, passes=PASSES))


def run_both(model: nn.Module, calls: list[tuple[tuple, dict]]) -> tuple[object, list[str]]:
    """Each call on `model` eagerly and on a compiled copy: equal outputs; returns the compiled module and the
    DyCL warnings."""
    model = model.eval()
    compiled = compile_(copy.deepcopy(model))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for args, kwargs in calls:
            want, got = model(*args, **kwargs), compiled(*args, **kwargs)
            assert same(want, got), f"eager {want}, compiled {got}"
    return compiled, [str(w.message) for w in caught if "DyCL" in str(w.message)]


def compiled_segments(compiled) -> int:
    """Segment signatures that run compiled code (not eager) in the DyCL programs of `compiled`."""
    return sum(1 for v in compiled.variants if v.gm is None for p in v.program.all_programs()
               for s in p.segments for r in s.runs.values() if r.variant is not None and r.eager is None)


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)


# ------------------------------------------------------------------------- (a) a pass-through decorator


def passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class Halving(Lin):
    @passthrough
    def forward(self, x):
        h = self.a(x)
        while h.abs().max() > 2.0:  # data-dependent loop in the wrapped forward
            h = h * 0.5
        if h.sum() > 0:
            return self.b(h)
        return -h


def test_a_passthrough_decorated_forward_is_rewritten_and_equal():
    compiled, warned = run_both(Halving(), [((x,), {}) for x in inputs()])
    assert not warned, warned
    program = compiled.variants[0].program
    assert program.rw is not None and program.rw.source.qualname == "Halving.forward"
    assert compiled_segments(compiled) > 0


# ----------------------------------------- (b) a wrapper that changes kwargs and outputs, and installs hooks

_collector: contextvars.ContextVar = contextvars.ContextVar("collector", default=None)


def _record(module, args, out):
    if _collector.get() is not None:
        _collector.get().append(out)


def capture_outputs(fn):
    """Like transformers' output-capturing wrapper: pops `return_dict`, reads defaults from `self.config`,
    records the submodules' outputs through forward hooks it installs on the first call that asks, and
    rewrites the output."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", self.config["return_dict"])
        record = kwargs.pop("output_hidden", self.config["output_hidden"])
        collected = [] if record else None
        if record and not getattr(self, "_hooked", False):
            for m in (self.a, self.b):
                m.register_forward_hook(_record)
            self._hooked = True
        token = _collector.set(collected)
        try:
            out = fn(self, *args, **kwargs)
        finally:
            _collector.reset(token)
        if collected is not None:
            out["hidden"] = tuple(collected)
        return out if return_dict else tuple(out.values())
    return wrapper


class Captured(Lin):
    def __init__(self):
        super().__init__()
        self.config = {"return_dict": True, "output_hidden": False}

    @capture_outputs
    def forward(self, x, scale: float = 1.0):
        h = self.a(x) * scale
        n = 0
        while h.norm() > 4.0 and n < 5:
            h = self.b(h) * 0.5
            n += 1
        return {"last": h, "steps": n}


def test_an_output_capturing_wrapper_is_kept_around_the_rewritten_forward():
    xs = inputs()
    calls = [((x,), {}) for x in xs] + [((xs[2],), {"return_dict": False}), ((xs[1],), {"scale": 3.0})]
    compiled, warned = run_both(Captured(), calls)
    assert not warned, warned
    assert compiled.variants[0].program.rw is not None and compiled_segments(compiled) > 0


def test_hooks_the_wrapper_installs_make_it_run_eagerly_with_one_warning():
    xs = inputs()
    calls = [((x,), {}) for x in xs[:2]] + [((x,), {"output_hidden": True}) for x in xs] + [((xs[3],), {})]
    _, warned = run_both(Captured(), calls)
    assert len(warned) == 1 and "Captured runs eagerly, as written, while forward hooks are registered" in warned[0], warned


# ----------------------------------------------------------- deprecation wrappers, stacked, reading func


def deprecate_kwarg(old: str, new: str):
    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if old in kwargs:
                warnings.warn(f"`{old}` is deprecated for `{fn.__name__}`: use `{new}`", FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return wrapped
    return deco


def scale_from_config(fn):
    """Reads the wrapped function's own code object, as transformers' merge_with_config_defaults does."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if "scale" in fn.__code__.co_varnames and kwargs.get("scale") is None:
            kwargs["scale"] = self.default_scale
        return fn(self, *args, **kwargs)
    return wrapper


class Stacked(Lin):
    default_scale = 2.0

    @deprecate_kwarg("factor", "scale")
    @scale_from_config
    def forward(self, x, scale=None):
        h = self.a(x) * scale
        return h.relu() if h.mean() > 0 else self.b(h)


def test_stacked_wrappers_rename_kwargs_warn_and_read_the_wrapped_function():
    xs = inputs()
    calls = [((x,), {}) for x in xs] + [((xs[1],), {"factor": 0.5}), ((xs[3],), {"scale": -1.0})]
    compiled, warned = run_both(Stacked(), calls)
    assert not warned and compiled_segments(compiled) > 0, warned
    with pytest.warns(FutureWarning, match="`factor` is deprecated for `forward`"), torch.no_grad():
        compiled(xs[0], factor=3.0)


class Outer(Lin):
    def __init__(self):
        super().__init__()
        self.inner = Halving()

    def forward(self, x):
        return self.inner(self.a(x)) + 1


def test_a_child_module_with_a_decorated_forward_gets_a_program():
    compiled, warned = run_both(Outer(), [((x,), {}) for x in inputs()])
    assert not warned, warned
    names = [p.name for p in compiled.variants[0].program.all_programs()]
    assert "Halving.forward" in names and all(p.rw is not None for p in compiled.variants[0].program.all_programs())


# ------------------------------------------------------------------ wrappers that cannot be re-applied


class Registry:
    """A decorator that is an object: `functools.update_wrapper` on an instance, not a function."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __get__(self, obj, objtype=None):
        return self if obj is None else types.MethodType(self, obj)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class ObjectDecorated(Lin):
    @Registry
    def forward(self, x):
        h = self.a(x)
        return h if h.sum() > 0 else -h


_REGISTERED = {}


def by_name(fn):
    _REGISTERED[fn.__name__] = fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _REGISTERED[wrapper.__name__](*args, **kwargs)  # the wrapped function is reached by name
    return wrapper


class NamedDecorated(Lin):
    @by_name
    def forward(self, x):
        h = self.a(x)
        return h if h.sum() > 0 else -h


def test_a_decorator_without_a_closure_over_the_function_runs_eagerly_with_one_warning():
    _, warned = run_both(NamedDecorated(), [((x,), {}) for x in inputs()])
    assert len(warned) == 1, warned
    assert "NamedDecorated.forward is wrapped by a decorator (`wrapper` at" in warned[0]
    assert "does not hold the function it wraps in a closure variable" in warned[0]


def test_a_decorator_object_runs_eagerly_with_one_warning():
    _, warned = run_both(ObjectDecorated(), [((x,), {}) for x in inputs()])
    assert len(warned) == 1 and "ObjectDecorated.forward is wrapped by a decorator" in warned[0] and \
        "is not a Python function" in warned[0], warned
