"""DyCL keeps Python's semantics: each test runs a program eagerly and through fxcc on inputs that take
different paths and compares outputs, exceptions, inputs updated in place and module state."""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import dycl

D, B = 8, 2
PASSES = "fuse,codegen{backend=extern}"


@pytest.fixture(autouse=True)
def _compile_every_segment(monkeypatch):
    """Tiny segments are compiled too (not timed against their plain Python): the compiled path is tested."""
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)


def inputs(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-4, 5, (B, D), generator=g).float() * s for s in (0.25, 1.0, 3.0)[: n] * 2][:n]


def outcome(fn, *args, **kwargs):
    try:
        with torch.no_grad():
            return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exception is part of what is compared
        return "raised", f"{type(e).__name__}: {e}"


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def check(model, xs, *, state=(), warn: str | None = None, make=None):
    """`model` (a module, or with `make` a factory of functions over a module) compiled vs eager on `xs`:
    equal results, equal inputs afterwards, equal `state` attributes; DyCL warnings only `warn`."""
    model = model.eval()
    twin = copy.deepcopy(model)
    eager, target = (make(model), make(twin)) if make else (model, twin)
    compiled = fxcc.compile(target, passes=PASSES, options=fxcc.CompileOptions(graph_cache=False, passes=PASSES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in xs:
            xe, xc = x.clone(), x.clone()
            want, got = outcome(eager, xe), outcome(compiled, xc)
            assert want[0] == got[0] and (same(want[1], got[1]) if want[0] == "ok" else want[1] == got[1]), \
                f"eager {want}, compiled {got}"
            assert torch.equal(xe, xc), "the input after the call differs (in-place updates)"
            for name in state:
                assert same(getattr(model, name), getattr(twin, name)), f"attribute {name} differs"
    messages = [str(w.message) for w in caught if "DyCL" in str(w.message)]
    if warn is None:
        assert not messages, messages
    else:
        assert len(messages) == 1 and warn in messages[0], messages
    return compiled


def line_of(fn, text: str) -> str:
    lines, first = inspect.getsourcelines(fn)
    return f"{inspect.getsourcefile(fn)}:{first + next(i for i, t in enumerate(lines) if text in t)}"


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-1, 2, p.shape).float())


# ----------------------------------------------------------------- the three crashes of issue 16


class Patience(Lin):
    def forward(self, x):
        prev, same, h = None, 0, x
        for _ in range(6):
            h = self.a(h).clamp(-4, 4)
            pred = h.argmax(-1)
            same = same + 1 if prev is not None and torch.equal(pred, prev) else 0
            if same >= 2:
                break
            prev = pred
        return h, same


def test_short_circuit_and_is_not_evaluated_past_a_false_left_side():
    """`prev is not None and torch.equal(pred, prev)`: torch.equal never sees None (it raised TypeError)."""
    compiled = check(Patience(), inputs())
    host = compiled.variants[0].program.host_source
    assert host.index("prev is not None") < host.index("torch.equal(pred, prev)")
    assert "if _b" in host  # the right side sits behind the left side's truth test


class Child(Lin):
    def forward(self, x):
        if x.std() > 1.0:
            return self.a(x) * 0.5
        return self.b(x)


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.child = Lin(), Child()

    def forward(self, x):
        h = self.pre.a(x) + 1
        return self.child(h) * 2 + h  # a child's host program, inside an expression of plain code


def test_child_with_control_flow_inside_an_expression_of_plain_code():
    """The child's result is a host temporary that the next segment reads (it was a NameError: `_h2`)."""
    check(Parent(), inputs())


class Recursive(Lin):
    def leaf(self, x):
        return x + 1

    def forward(self, x, depth: int = 3):
        if depth == 0 or x.norm() < 8.0:
            return self.leaf(x)
        return self.forward(self.a(x).clamp(-4, 4), depth - 1) + self.forward(self.b(x).clamp(-4, 4), depth - 1)


def test_forward_calling_itself_on_two_branches():
    """Both recursive results are host temporaries read by one segment (it was a NameError: `_h5`)."""
    check(Recursive(), inputs())


# ----------------------------------------------------------------- expressions


class Expressions(Lin):
    def forward(self, x):
        h = self.a(x)
        t = h.sum().item() > 0 or self.b(h).sum() > 0  # short-circuit `or` with a sync on the left
        u = -1 < h.mean() < 1  # a chain: `h.mean()` evaluated once, the second test only if the first holds
        v = not (h.max() > 3)
        w = [g * 2 for g in (h, x) if g.sum() > 0]  # a comprehension filtering on tensor values
        y = self.a(h) if t and u else self.b(h)
        return y + sum(w, torch.zeros(D)), bool(v), bool(u)


def test_boolean_operators_chains_ternaries_and_comprehensions():
    check(Expressions(), inputs())


class Order(Lin):
    def __init__(self):
        super().__init__()
        self.log: list[str] = []

    def note(self, tag: str, h: torch.Tensor) -> torch.Tensor:
        self.log.append(tag)  # an effect: this method gets a host program of its own
        return h + len(self.log)

    def forward(self, x):
        # Python evaluates left to right: note("a") runs before the sync, note("b") after it
        return self.note("a", x) * (x.sum().item() > 0) + self.note("b", x)


def test_evaluation_order_around_host_operations():
    model = Order()
    check(model, inputs(), state=("log",))
    assert model.log[:2] == ["a", "b"]


# ----------------------------------------------------------------- statements


class Loops(Lin):
    def forward(self, x):
        h, n = x, 0
        while h.abs().sum() > 4:
            h = self.a(h).clamp(-4, 4) * 0.5
            n += 1
            if n > 3:
                break
        else:
            h = h + 100  # only when the test failed, not after the break
        for i in range(int(x.abs().sum().item()) % 4):  # a data-dependent trip count
            if h.sum() > 0:
                continue
            h = h - i
        else:
            n += 10
        for g in (x, h):
            if g.max() > 2:
                return g, n  # an early return inside a loop
        return h, n


def test_while_else_for_else_break_continue_and_early_return():
    check(Loops(), inputs())


class Contexts(Lin):
    def forward(self, x):
        with torch.no_grad():  # no_grad: its body is split and compiled as any other
            h = self.a(x)
            if h.sum() > 0:
                h = self.b(h)
        try:
            if h.mean() > 1:
                raise KeyError("big")
            h = h * 2
        except KeyError:
            h = -h
        return h


def test_with_no_grad_is_compiled_and_try_runs_eagerly_with_one_warning():
    where = line_of(Contexts.forward, "try:")
    compiled = check(Contexts(), inputs(), warn=f"exceptions used as control flow (try/except) at {where}")
    assert "with torch.no_grad():" in compiled.variants[0].program.host_source


class Raising(Lin):
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 4:
            raise ValueError(f"too large: {h.sum().item():.0f}")
        return h


def test_exceptions_eager_raises_are_raised_the_same():
    check(Raising(), inputs())


# ----------------------------------------------------------------- calls


class Grandchild(Lin):
    def forward(self, h):
        if h.max() > 2:
            return self.a(h).clamp(-4, 4)
        return h


class Middle(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Grandchild()

    def forward(self, h):
        return self.inner(h) * 2  # no control flow of its own: the grandchild's makes it a program


def gate(h):
    """A plain function with control flow, called from forward."""
    return h * 2 if h.sum() > 0 else -h


class Calls(Lin):
    def __init__(self):
        super().__init__()
        self.mid = Middle()
        self.blocks = nn.ModuleList([Grandchild(), Grandchild()])

    def refine(self, h):  # a method other than forward
        while h.abs().max() > 3:
            h = h * 0.5
        return h

    def forward(self, x):
        h = self.mid(x)
        for blk in self.blocks:  # calls chosen at run time: each block's own program
            h = blk(h)
        first = self.blocks[0]
        h = first(h)
        return gate(self.refine(h))


def test_children_grandchildren_methods_module_lists_and_functions():
    compiled = check(Calls(), inputs())
    names = {p.name for p in compiled.variants[0].program.all_programs()}
    assert {"Middle.forward", "Grandchild.forward", "Calls.refine", "gate"} <= names


def make_closure(model: nn.Module):
    scale = [1.0]
    calls = 0

    def f(x):
        nonlocal calls
        calls += 1
        h = model.a(x) * scale[0]
        if h.sum() > 0:
            scale[0] += 1  # the closure's own list: later calls see it
        return h, calls

    return f


def test_closures_share_their_cells_with_eager():
    check(Lin(), inputs(), make=make_closure)


def test_bound_method_compiles_as_a_method():
    model = Recursive().eval()
    compiled = fxcc.compile(model.forward, passes=PASSES)
    for x in inputs():
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))


# ----------------------------------------------------------------- state


class Stateful(Lin):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.last = None

    def forward(self, x):
        self.calls += 1
        h = self.a(x)
        if self.last is not None and self.last.shape == h.shape:
            h = h + self.last
        self.last = h.detach()
        x += 1  # in place, on the caller's tensor
        if h.sum() > 0:
            x[0] = h[1]
        return h * self.calls, x[1:]  # a view of the input


def test_attribute_state_and_in_place_updates_of_inputs_match_eager():
    check(Stateful(), inputs(), state=("calls", "last"))


class SliceStores(Lin):
    def forward(self, x):
        h = self.a(x).clone()
        h[:, 0] = h[:, 0] * 2  # stores through multi-dimensional slices stay slices in the host program
        h[1:, ::2] = -h[1:, ::2]
        h[..., 1:3] += 1
        if h.sum() > 0:
            return self.b(h)
        return h


def test_stores_through_tuple_slices():
    check(SliceStores(), inputs())


class SliceValues(Lin):
    def forward(self, x):
        h = self.a(x)
        keep = slice(0, 2 + int(h.sum() > 0))
        if h.mean() > 0:
            keep = slice(1, None, 2)
        return self.b(h)[:, keep] * 2  # a segment whose inputs include a slice object


def test_slice_objects_as_segment_inputs():
    check(SliceValues(), inputs())


class DeviceOutputs(Lin):
    def forward(self, x, y=None):
        if x is not None:  # static, with an else: the segment keeps it, and returns `device` and `dtype`
            h = self.a(x)
            device, dtype = x.device, x.dtype
        else:
            h, device, dtype = y, y.device, y.dtype
        h = torch.cat([h[i:i + 1] for i in range(h.shape[0])])  # no symbolic_trace fallback either
        if h.sum() > 0:
            h = self.b(h)
        return h + torch.ones(h.shape, device=device, dtype=dtype)


def test_device_and_dtype_outputs_of_a_segment_pass_around_its_graph():
    """torch.export returns no torch.device or dtype: the segment that makes them still compiles (SAM-3)."""
    compiled = check(DeviceOutputs(), inputs())
    runs = [r for p in compiled.variants[0].program.all_programs() for s in p.segments for r in s.runs.values()]
    assert runs and all(r.variant is not None and r.variant.captured.method == "export" for r in runs)


class Counter(Lin):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # no control flow: a traced graph would count once, at capture
        return self.a(x) * self.calls


def test_static_forward_with_attribute_stores_runs_as_a_host_program():
    compiled = check(Counter(), inputs(), state=("calls",))
    assert "stores attribute `calls`" in compiled.variants[0].reason


class Collect(Lin):
    def forward(self, x):
        feats = []  # a list of its own: appending to it is no effect anyone else sees
        for layer in (self.a, self.b):
            x = layer(x)
            feats.append(x)
        return torch.cat(feats)


def test_static_forward_with_its_own_list_stays_one_graph():
    compiled = check(Collect(), inputs())
    assert not isinstance(compiled.variants[0], dycl.DyclVariant)


# ----------------------------------------------------------------- what stays eager


class Frame(Lin):
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            return locals()["h"]
        return x


def test_a_function_that_cannot_be_rewritten_runs_eagerly_with_one_warning():
    where = line_of(Frame.forward, "locals()")
    check(Frame(), inputs(), warn=f"runs eagerly, as written: Frame.forward reads its own frame with "
                                  f"locals() (at {where})")


def doubled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) * 2
    return wrapper


class Decorated(Lin):
    @doubled
    def scaled(self, h):
        return h if h.sum() > 0 else -h

    def forward(self, x):
        return self.scaled(self.a(x)) + 1


def test_decorated_methods_keep_their_decorator():
    compiled = check(Decorated(), inputs())  # the wrapped method is rewritten; its wrapper doubles the result
    names = [p.name for v in compiled.variants for p in v.program.all_programs() if p.rw is not None]
    assert "Decorated.scaled" in names


class Private(Lin):
    def __init__(self):
        super().__init__()
        self.__scale = 3.0

    def __pick(self, h):
        return h * self.__scale if h.sum() > 0 else h

    def forward(self, x):
        h = super().__call__ is not None and self.__pick(self.a(x))
        return h


def test_private_names_and_super():
    check(Private(), inputs())


def make_with_default(model: nn.Module):
    def f(x, seen=[]):  # noqa: B006 - the shared default list is what is tested
        seen.append(x.sum().item())
        h = model.a(x)
        return h * len(seen) if h.sum() > 0 else h

    return f


def test_defaults_are_the_original_objects():
    check(Lin(), inputs(), make=make_with_default)


def test_dycl_off_and_on_for_the_same_model():
    with pytest.raises(fxcc.CaptureError, match="control flow depends on tensor values"):
        fxcc.compile(Child().eval(), options=fxcc.CompileOptions(dycl=False, passes=PASSES))(inputs()[0])
    check(Child(), inputs())


class ViewUpdate(Lin):
    def forward(self, x):
        v = x[1:]  # a view of the input, computed by a segment
        w = self.a(x)
        if w.sum() > 0:
            v += 1  # in eager this changes x through the view
        return x * 2, v


def test_updates_through_views_reach_the_viewed_tensor():
    compiled = check(ViewUpdate(), inputs())
    runs = [r for s in compiled.variants[0].program.segments for r in s.runs.values()]
    assert runs and all(r.variant is not None for r in runs)


class Config:
    def __init__(self, scale: float):
        self.scale = scale


class Configured(Lin):
    def forward(self, x, cfg):
        h = self.a(x) * cfg.scale
        if h.sum() > 0:
            return h
        return -h


def test_mutable_inputs_are_never_baked_into_a_segment():
    model = Configured().eval()
    compiled = fxcc.compile(copy.deepcopy(model), passes=PASSES)
    cfg = Config(1.0)
    for x, scale in zip(inputs(), (1.0, 2.0, -3.0, 0.5, 4.0, -1.0)):
        cfg.scale = scale  # the same object, changed between calls
        with torch.no_grad():
            assert torch.equal(compiled(x, cfg), model(x, cfg))
    runs = [r for s in compiled.variants[0].program.segments for r in s.runs.values()]
    assert any("cannot be guarded" in (r.eager or "") for r in runs)


class _Running:
    """A state object of the user's own (registered as a cache is): a running total rebound at each call."""

    def __init__(self, n):
        self.total = torch.zeros(n)
        self.seen = []


def test_a_host_program_updates_the_callers_own_state_object_and_list():
    """The host program runs on the caller's objects: an attribute rebound on a registered state object and an
    item appended to a list argument reach them, call after call, as in eager (rebuilt from their tensors they
    were copies, and the caller's total stayed at zero)."""
    from fxcc.state import register_state_class
    register_state_class(_Running)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, state, log):
            state.total = state.total + x
            log.append(x.sum())
            return self.lin(x) + state.total

    m = M().eval()
    cm = fxcc.compile(m)
    se, sc, le, lc = _Running(4), _Running(4), [], []
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4)
            torch.testing.assert_close(cm(x, sc, lc), m(x, se, le))
            torch.testing.assert_close(sc.total, se.total)
    assert len(lc) == len(le) == 3
    torch.testing.assert_close(torch.stack(lc), torch.stack(le))


class _Extras(Lin):
    def forward(self, x, extras, feats):
        h = self.a(x)
        extras["hidden"] = h  # the caller reads extras["hidden"] afterwards
        feats.append(h.relu())
        return h.sum(-1)


def _fill(d, h):
    d["h"] = h


class _FillChild(nn.Module):
    def forward(self, x, feats):
        feats += [x * 2]  # a list updated in place
        return x


class _Fill(Lin):
    def __init__(self):
        super().__init__()
        self.c = _FillChild()

    def forward(self, x, extras, feats):
        h = self.a(x)
        _fill(extras, h)  # the write is in a callee: the source scan of forward does not see it
        return self.c(h, feats) + 1


def _calls_match(model, make_args, calls: int = 3):
    """`model` compiled vs eager, each call given fresh containers: equal outputs, and the containers end as eager
    leaves them, holding real tensors (no fake tensor from capture)."""
    from torch._subclasses.fake_tensor import FakeTensor
    compiled = fxcc.compile(copy.deepcopy(model), passes=PASSES, options=fxcc.CompileOptions(graph_cache=False))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in inputs(calls):
            ae, ac = make_args(), make_args()
            assert same(compiled(x, *ac), model(x, *ae))
            assert all(map(same_containers, ac, ae)), (ac, ae)
            leaves = [v for c in ac for v in (c.values() if isinstance(c, dict) else c)]
            assert leaves and not any(isinstance(v, FakeTensor) for v in leaves)
    assert not [w for w in caught if "eager" in str(w.message)], [str(w.message) for w in caught]
    return compiled


def same_containers(a, b) -> bool:
    """Equal lists, or dicts with the same keys (in order) and equal values."""
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and same(list(a.values()), list(b.values()))
    return same(a, b)


def test_writes_into_dict_and_list_arguments_reach_the_callers_objects():
    """A forward storing into a dict argument and appending to a list argument (no control flow) runs as a host
    program on the caller's own objects: at every call they end as eager leaves them (traced, the writes went
    into capture's copies and the caller's dict and list stayed empty)."""
    compiled = _calls_match(_Extras().eval(), lambda: ({}, []))
    variant = compiled.variants[0]
    assert isinstance(variant, dycl.DyclVariant)
    assert "stores into a container it was given" in variant.reason


def test_writes_into_argument_containers_by_a_callee_are_caught_at_capture():
    """A write into an argument container made by a callee (a helper function, a child's `+=` on a list) is seen
    while capture traces forward: the forward runs as a host program, never as a graph that drops the write."""
    compiled = _calls_match(_Fill().eval(), lambda: ({}, []))
    assert isinstance(compiled.variants[0], dycl.DyclVariant)
    assert "wrote into the dict argument `extras`" in compiled.variants[0].reason


class _Written(Lin):
    def forward(self, x, extras=None, **kwargs):
        kwargs.pop("unused", None)  # the call's own dict
        x = x.clone()
        x[0] = 0  # a tensor written in place: the graph does it
        if extras is not None:
            extras["hidden"] = x
        return self.a(x)


def test_tensor_writes_kwargs_and_an_absent_container_stay_one_graph():
    m = _Written().eval()
    compiled = fxcc.compile(copy.deepcopy(m), passes=PASSES, options=fxcc.CompileOptions(graph_cache=False))
    x = inputs(1)[0]
    with torch.no_grad():
        assert same(compiled(x, unused=1), m(x, unused=1))
        assert not isinstance(compiled.variants[0], dycl.DyclVariant)
        de, dc = {}, {}
        assert same(compiled(x, dc), m(x, de))
        assert same(dc["hidden"], de["hidden"])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)


class _TwoAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Attention(), _Attention()

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x) * 2


def test_a_segment_merging_weights_at_its_first_call_does_not_recompile_the_program():
    """A segment compiled during a call merges its Q/K/V weights (their `.data` moved into one buffer, same
    values) after the program's weights were snapshotted: the next call sees the same weights, not a change."""
    torch.manual_seed(0)
    m = _TwoAttentions().eval()
    cm = fxcc.compile(m)  # the default pipeline: merge-linears runs
    xs = [torch.randn(2, 5, D) + (1 if i % 2 else -1) for i in range(4)]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(cm(x), m(x))
    assert m.a.k.weight.storage_offset() != 0  # the weights were merged (moved) by the first compile of a.*
    assert cm.stats.compiles == 1 and cm.stats.param_recompiles == 0, cm.stats.reasons


def test_host_loops_over_zip_and_enumerate_of_tensors_stay_compiled():
    """`for i, row in enumerate(h)` and `zip(a, b)` over tensors a segment computes, in statements and
    comprehensions: the segment returns the tensors and the host makes the iterator (a segment returning the
    `enumerate` object could not be captured and ran eagerly)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            h = self.lin(x)
            acc = []
            for i, row in enumerate(h * 2):
                if row.sum() > 0:
                    acc.append(row * i)
            for a, b in zip(h + 1, x - 1):
                if (a * b).sum() > 1:
                    break
                acc.append(a - b)
            picked = [r * i for i, r in enumerate(h.relu(), start=1) if r.max() > 1]
            return acc, picked, [r.sum() for r in reversed(h.abs())]

    check(M(), inputs())
