"""DyCL: dynamic networks compile into a generated host program plus compiled condition-free segments."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from conftest import assert_outputs_close
from dynamic_nets import NETWORKS, EagerTry, MoE, TreeNet
from fxcc import dycl

D, B = 64, 8  # small sizes keep the suite fast; the benchmark uses hidden 512, batch 32
PASSES = "canonicalize,raise,fuse,codegen{backend=extern}"  # one candidate per kernel: no timing at compile


@pytest.fixture(autouse=True)
def _compile_small_segments(monkeypatch):
    """At the tests' small sizes most segments take a few microseconds: compile them anyway (the rule that
    leaves such segments as plain Python has its own test)."""
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)


def forward_lines(model: nn.Module) -> set[tuple[str, int]]:
    """Every statement line of the forwards of the model's own classes (tests/dynamic_nets.py)."""
    lines = set()
    for cls in {type(m) for m in model.modules()}:
        fn = cls.__dict__.get("forward")
        if fn is None or not fn.__code__.co_filename.endswith("dynamic_nets.py"):
            continue
        src, first = inspect.getsourcelines(fn)
        fdef = ast.parse(textwrap.dedent("".join(src)))
        for node in ast.walk(fdef.body[0]):
            if isinstance(node, ast.stmt) and node is not fdef.body[0]:
                lines.add((fn.__code__.co_filename, first + node.lineno - 1))
    return lines


def run_with_coverage(model: nn.Module, xs: list[torch.Tensor]) -> tuple[list, set]:
    """Eager outputs and the (file, line) pairs executed inside the model's forwards."""
    seen = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "forward" and frame.f_code.co_filename.endswith("dynamic_nets.py"):
            if event == "line":
                seen.add((frame.f_code.co_filename, frame.f_lineno))
            return tracer
        return None

    outs = []
    sys.settrace(tracer)
    try:
        with torch.no_grad():
            outs = [model(x) for x in xs]
    finally:
        sys.settrace(None)
    return outs, seen


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_compiles_and_equals_eager_on_every_branch(name):
    model, xs = NETWORKS[name](D, B)
    expected, covered = run_with_coverage(model, xs)
    missing = forward_lines(model) - covered
    assert not missing, f"{name}: the inputs leave lines {sorted(line for _, line in missing)} unexecuted"
    cm = fxcc.compile(model, passes=PASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no segment may fall back to eager
        for x, ref in zip(xs, expected):
            assert_outputs_close(cm(x), ref, atol=1e-4, rtol=1e-4)
    (variant,) = cm.variants
    assert isinstance(variant, dycl.DyclVariant)
    runs = [r for p in variant.program.all_programs() for s in p.segments for r in s.runs.values()]
    compiled = [r for r in runs if r.variant is not None]
    assert compiled and all(r.variant is not None or r.eager.startswith("plain Python") for r in runs)


def test_explain_shows_host_program_and_segment_ir():
    model, xs = NETWORKS["early_exit"](D, B)
    text = fxcc.explain(model, xs[0], passes=PASSES, ir_after_each=False)
    assert "DyCL host program + compiled segments" in text
    assert "== host program for EarlyExit" in text
    assert "def forward(self, x):" in text and ".item()" in text and "_seg0(" in text
    assert "if _s" in text and "return logits" in text  # the condition is evaluated by the host
    assert "def _seg0(self, stage, h, head):" in text
    assert "] compiled" in text and "== final IR" in text and "== where ops run" in text
    assert "statements that run eagerly: none" in text


def test_host_program_reuses_one_compiled_loop_body():
    model, xs = NETWORKS["item_loop"](D, B)
    cm = fxcc.compile(model, passes=PASSES)
    for x in xs:
        cm(x)
    prog = cm.variants[0].program
    assert "for _ in range(n):" in prog.host_source
    loop_seg = next(s for s in prog.segments if s.spec.inputs == ["h"] and s.spec.outputs == ["h"])
    assert len(loop_seg.runs) == 1  # one compiled body for every trip


def test_recursion_over_submodules_builds_one_program_per_node():
    torch.manual_seed(0)
    model = TreeNet(d=D, depth=2).eval()
    cm = fxcc.compile(model, passes=PASSES)
    x = torch.randn(B, D)
    assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    progs = cm.variants[0].program.all_programs()
    assert [p.name for p in progs].count("TreeNode.forward") == 7  # 1 + 2 + 4 nodes
    assert "_prog_TreeNode_0(h)" in progs[0].host_source


def test_data_dependent_shapes_compile_per_shape_and_overflow_warns(monkeypatch):
    torch.manual_seed(0)
    model = MoE(d=D, n_experts=2).eval()
    monkeypatch.setattr(dycl, "SEGMENT_MAX_VARIANTS", 1)
    cm = fxcc.compile(model, passes=PASSES)
    xs = [torch.randn(B, D) * s for s in (0.3, 3.0, 30.0)]
    with pytest.warns(UserWarning, match=r"segment MoE\.seg\d+ \(.*dynamic_nets\.py:\d+.*\).*runs eagerly"):
        for x in xs:
            assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)


class SignBranch(nn.Module):
    """Issue 19's program: a branch on a tensor's value, called with a new batch size at every call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:
            return h * 2
        return h - 1


BATCHES = (1, 2, 3, 5, 8, 13, 21, 34, 55, 4)


def _segment_compiles(cm) -> dict[str, list[str]]:
    return {s.name: s.stats.reasons for p in cm.variants[0].program.all_programs() for s in p.segments}


def _sizes(cm, model, call) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # nothing falls back to eager (max_variants) or warns
        for b in BATCHES:
            for sign in (1.0, -1.0):  # both branches at every size
                x = torch.randn(b, D).abs() * sign
                assert_outputs_close(call(cm, x), call(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["module", "function"])
def test_a_host_program_serves_new_sizes_and_its_segments_recompile_once_symbolic(kind):
    """A batch size that changes neither compiles the host program again nor runs eagerly past max_variants: each
    segment compiles static, then once with the batch symbolic, and says which size changed."""
    torch.manual_seed(0)
    model = SignBranch().eval()
    w = torch.randn(D, D)

    def branch(x, w):
        if x.sum() > 0:
            return x @ w
        return (x * 2) @ w - 1

    if kind == "module":
        fn, call = model, lambda f, x: f(x)
        compiled = cm = fxcc.compile(model, passes=PASSES)
    else:
        fn, call = branch, lambda f, x: f(x, w)
        compiled = fxcc.compile(branch, passes=PASSES)
        cm = compiled.fxcc
    _sizes(compiled, fn, call)
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0, cm.stats.reasons
    assert "a host program serves any sizes" in cm.stats.reasons[0]
    segments = _segment_compiles(cm)
    assert len(segments) == 3 and all(len(r) == 2 for r in segments.values()), segments
    for reasons in segments.values():
        assert reasons[0] == "first call; static shapes"
        assert re.search(r"`\w+` dim 0 is 2 where this variant has 1 .*: \w+ dim 0: 1 -> 2; symbolic: \w+ dim 0",
                         reasons[1]), reasons[1]
    text = cm.explain()
    assert "compiles: 2" in text and "other signatures by its symbolic sizes" in text


def test_dynamic_false_compiles_each_segment_size_static_without_recompiling_the_program():
    torch.manual_seed(0)
    model = SignBranch().eval()
    cm = fxcc.compile(model, options=fxcc.CompileOptions(passes=PASSES, dynamic=False))
    _sizes(cm, model, lambda f, x: f(x))
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0
    for reasons in _segment_compiles(cm).values():
        assert len(reasons) == len(BATCHES) and all(r.endswith("static shapes") for r in reasons)


def test_data_dependent_segment_shapes_compile_once_symbolic():
    """Segments after `nonzero` see a new number of rows at nearly every call: per expert (its module baked, its
    index an int export keeps constant), the second compiles them symbolic and later counts are served by that
    variant (a count of 1, which export specializes, compiles once more)."""
    torch.manual_seed(0)
    model, xs = NETWORKS["moe_top1"](D, B)
    cm = fxcc.compile(model, passes=PASSES)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        for x in xs:
            for b in (B, 2 * B, 3 * B):
                xb = x.repeat(b // B, 1)
                assert_outputs_close(cm(xb), model(xb), atol=1e-4, rtol=1e-4)
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0
    per_baked = {(s.name, k): m.stats.reasons for p in cm.variants[0].program.all_programs() for s in p.segments
                 for k, m in s.modules.items()}
    per_segment: dict[str, int] = {}
    for (name, _), reasons in per_baked.items():
        per_segment[name] = per_segment.get(name, 0) + len(reasons)
    assert max(per_segment.values()) <= 3 * model.n_experts, per_baked
    assert any(re.search(r"symbolic: .*\bidx dim 0", r) for rs in per_baked.values() for r in rs)


def test_unsupported_construct_runs_eagerly_with_its_line():
    torch.manual_seed(0)
    model = EagerTry(d=D).eval()
    line = next(i for i, t in enumerate(inspect.getsourcelines(EagerTry.forward)[0]) if "try:" in t)
    line += inspect.getsourcelines(EagerTry.forward)[1]
    cm = fxcc.compile(model, passes=PASSES)
    x = torch.randn(B, D)
    with pytest.warns(UserWarning, match=rf"exceptions used as control flow \(try/except\) at .*dynamic_nets\.py:"
                                         rf"{line} runs eagerly"):
        out = cm(x)
    assert_outputs_close(out, model(x), atol=1e-4, rtol=1e-4)
    for s in (1.0, -1.0, 5.0):  # both the raising and the normal path
        assert_outputs_close(cm(x * s), model(x * s), atol=1e-4, rtol=1e-4)
    segs = cm.variants[0].program.segments
    assert segs and all(r.variant is not None for s in segs for r in s.runs.values())
    assert f"dynamic_nets.py:{line} runs eagerly" in cm.explain()


COUNTER = 0


def test_function_with_tensor_condition_and_global_mutation():
    def gate(x):
        global COUNTER
        COUNTER += 1
        return x * 2 if x.max() > 0.5 else x - 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the global update is host bookkeeping, exact: nothing runs eagerly
        f = fxcc.compile(gate, passes=PASSES)
        a = torch.full((5,), 1.0)
        assert_outputs_close(f(a), a * 2)  # capture ran the function too (globals cannot be undone)
        before = COUNTER
        b = torch.zeros(5)
        assert_outputs_close(f(b), b - 1)
        assert_outputs_close(f(a), a * 2)
    assert COUNTER == before + 2  # the host program runs the global update once per call
    host = f.fxcc.variants[0].program.host_source
    assert "global COUNTER" in host and "COUNTER += 1" in host and "if _t" in host


def test_dycl_off_keeps_the_capture_error():
    model, xs = NETWORKS["stat_branch"](D, B)
    cm = fxcc.compile(model, options=fxcc.CompileOptions(dycl=False, passes=PASSES))
    with pytest.raises(fxcc.CaptureError, match="control flow depends on tensor values"):
        cm(xs[0])


def test_static_model_is_not_rewritten():
    m = nn.Sequential(nn.Linear(D, D), nn.ReLU()).eval()
    cm = fxcc.compile(m, passes=PASSES)
    cm(torch.randn(B, D))
    assert not isinstance(cm.variants[0], dycl.DyclVariant)


def test_replaced_parameter_rebuilds_the_segments(monkeypatch):
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)  # segments compiled, not chosen by timing: they bind weights
    model, xs = NETWORKS["stat_branch"](D, B)
    cm = fxcc.compile(model, passes=PASSES)
    cm(xs[0])
    model.post.weight = nn.Parameter(torch.randn_like(model.post.weight))
    for x in xs[:3]:
        assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    assert cm.stats.param_recompiles >= 1


def test_segment_runs_as_python_when_measured_faster(monkeypatch):
    model, xs = NETWORKS["moe_top1"](D, B)
    monkeypatch.setattr(dycl, "_median_us", lambda fn, args: 1.0 if inspect.ismethod(fn) else 2.0)
    cm = fxcc.compile(model, passes=PASSES)
    for x in xs[:4]:
        assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    runs = [r for s in cm.variants[0].program.segments for r in s.runs.values()]
    assert runs and all(r.variant is not None and r.eager.startswith("plain Python: measured faster") for r in runs)
    assert "compiled, but runs as plain Python" in cm.explain()


def test_segments_faster_than_a_compiled_call_are_not_compiled(monkeypatch):
    def floats(args) -> bool:
        return any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)

    model, xs = NETWORKS["moe_top1"](D, B)
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 10.0)
    # the routing segments (`route == e`, the squeeze after nonzero) see integer tensors only: "2 us"
    monkeypatch.setattr(dycl, "_median_us", lambda fn, args: 50.0 if floats(args) else 2.0)
    cm = fxcc.compile(model, passes=PASSES)
    for x in xs[:6]:
        assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    segs = cm.variants[0].program.segments
    small = [r for s in segs for k, r in s.runs.items() if "float" not in str(k)]
    big = [r for s in segs for k, r in s.runs.items() if "float" in str(k)]
    assert small and all(r.variant is None for r in small)
    assert all(r.eager.startswith("plain Python, not compiled") for r in small)
    assert big and all(r.variant is not None for r in big)
    assert "plain Python, not compiled: 2.0 us per call" in cm.explain()


class GrowingCache(nn.Module):
    """A KV cache held in a list and grown with torch.cat at each call (a store into the caller's list: a DyCL
    host program): the segment that grows it sees new sizes at every call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, cache: list):
        h = self.lin(x)
        cache[0] = torch.cat([cache[0], h], 0)
        return cache[0].sum(0)


def test_a_segment_too_small_to_compile_is_not_timed_again_at_each_new_size(monkeypatch):
    """The smallness of a segment is measured at its first signature and holds for its other sizes: measured
    again at each (a cache that grows at every token), a measurement past the threshold on a loaded machine
    compiled it at some later token, a compile per run no two runs agreed on."""
    measured: dict = {}

    def median_us(fn, args):  # each segment's first measurement is "5 us", any later one "50 us"
        f = getattr(fn, "__func__", fn)
        measured[f] = measured.get(f, 0) + 1
        return 5.0 if measured[f] == 1 else 50.0

    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 10.0)
    monkeypatch.setattr(dycl, "_median_us", median_us)
    model = GrowingCache().eval()
    cm = fxcc.compile(model, passes=PASSES)
    mine, eager = [torch.zeros(0, D)], [torch.zeros(0, D)]
    for _ in range(6):
        x = torch.randn(2, D)
        with torch.no_grad():
            assert_outputs_close(cm(x, mine), model(x, eager), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine[0], eager[0])
    segs = [s for v in cm.variants for s in v.program.segments]
    grow = next(s for s in segs if "cat" in s.source)
    assert sum(s.stats.compiles for s in segs) == 0
    assert [r.eager.startswith("plain Python, not compiled") for r in grow.runs.values()] == [True]
    assert "it serves 5 other signatures of other sizes" in cm.explain()


class PositionedCache(GrowingCache):
    def forward(self, x, cache: list, pos: int):
        h = self.lin(x) + pos
        cache[0] = torch.cat([cache[0], h], 0)
        return cache[0].sum(0)


def test_a_host_program_serves_any_int_value_and_tensor_layout():
    """A host program is Python over the call's own values: a position that changes, or a cache that is a
    transposed view at the prefill and contiguous after it, compiles no other host program (each segment guards
    its own inputs)."""
    model = PositionedCache().eval()
    cm = fxcc.compile(model, passes=PASSES)
    for pos, steps in ((0, 3), (2, 2)):  # two loops, each from a prefilled cache that is a transposed view
        mine = [torch.randn(D, 3).t()]
        eager = [mine[0].clone()]
        for p in range(pos, pos + steps):
            x = torch.randn(2, D)
            with torch.no_grad():
                assert_outputs_close(cm(x, mine, p), model(x, eager, p), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine[0], eager[0])
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0


class Halving(nn.Module):
    """`while` on `.item()`, a counter, keyword arguments with None, and an early return inside a for loop."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, scale: float = 1.0, *, extra=None):
        h = self.lin(x) * scale
        n = 0
        while h.norm().item() > 4.0:
            h = h * 0.5
            n += 1
        if extra is not None:
            h = h + extra
        for t in [1, 2, 3]:
            if (h.sum() > t).item():
                return h, n
        return h * 2, -1


def test_while_on_item_keywords_and_none_inputs():
    torch.manual_seed(0)
    model = Halving().eval()
    cm = fxcc.compile(model, passes=PASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the None input is baked into the segment, not an eager fallback
        for k in (0.1, 1.0, 30.0):
            x = torch.randn(B, D) * k
            for kw in ({}, {"extra": torch.ones(B, D)}):
                got, want = cm(x, 2.0, **kw), model(x, 2.0, **kw)
                assert_outputs_close(got[0], want[0], atol=1e-4, rtol=1e-4)
                assert got[1] == want[1]
    host = cm.variants[0].program.host_source
    assert "while True:" in host and ".item()" in host and "break" in host


class ScaledBranches(nn.Module):
    """A tensor-dependent branch whose segments read an attribute the user may add: `getattr` with a default."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:
            h = h * getattr(self, "scale", 1.0)
        else:
            h = h - getattr(self, "scale", 1.0)
        return torch.relu(h)


def test_an_attribute_added_after_a_dycl_compile_is_read_by_its_program(caplog):
    """A DyCL program reads attributes as it runs and its segments were captured with what they read then:
    which names it looks up is not recorded, so an attribute added recompiles it, and the result is eager's."""
    torch.manual_seed(0)
    model = ScaledBranches().eval()
    xs = [torch.randn(B, D), -torch.randn(B, D).abs() * 10]
    cm = fxcc.compile(model, passes=PASSES)
    for x in xs:
        assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    assert isinstance(cm.variants[0], dycl.DyclVariant)
    model.scale = 3.0
    with caplog.at_level("INFO", logger="fxcc.recompiles"):
        for x in xs:
            assert_outputs_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    assert "attribute scale was added" in caplog.text and cm.stats.param_recompiles == 1


class StepCounter(nn.Module):
    """A forward that counts its calls in a buffer (a Python effect: a DyCL host program), then two linears of
    one input (merged into one constant by merge-linears)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        self.steps += 1
        return self.a(x) * self.b(x)


def _step_counters():
    torch.manual_seed(0)
    model, eager = StepCounter().eval(), StepCounter().eval()
    eager.load_state_dict(model.state_dict())
    return model, eager, torch.randn(B, D)


def test_a_buffer_the_host_program_writes_at_every_call_compiles_once(monkeypatch):
    """The host program's own write is no change of what the segments hold: one compile serves every call, and the
    buffer counts as eager's does."""
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)
    model, eager, x = _step_counters()
    cm = fxcc.compile(model, passes=PASSES)
    for _ in range(5):
        assert_outputs_close(cm(x), eager(x), atol=1e-5, rtol=1e-5)
    assert cm.stats.compiles == 1 and cm.stats.param_recompiles == 0
    assert model.steps.item() == eager.steps.item() == 5


def test_a_segment_sees_a_change_of_the_weights_its_constants_hold(monkeypatch, caplog):
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)
    model, eager, x = _step_counters()
    cm = fxcc.compile(model, passes="canonicalize,raise,merge-linears,fuse,codegen{backend=extern}")
    for _ in range(2):
        assert_outputs_close(cm(x), eager(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.a.weight.data.mul_(3)
        eager.a.weight.data.mul_(3)
    with caplog.at_level("INFO", logger="fxcc.recompiles"):
        for _ in range(2):
            assert_outputs_close(cm(x), eager(x), atol=1e-5, rtol=1e-5)
    assert "recompiling DyCL segment" in caplog.text and "the contents of owner.a.weight changed" in caplog.text
    assert model.steps.item() == eager.steps.item() == 4


class SaysWhenTraced(nn.Module):
    """A branch on a tensor's value (export fails there, DyCL splits), and a line on stderr while exported."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        if torch.compiler.is_exporting():
            sys.stderr.write("SaysWhenTraced is being traced\n")
        h = self.a(x)
        return h * 2 if h.sum() > 0 else h - 1


def test_a_failed_export_prints_no_partial_graph_and_keeps_the_models_output(capfd):
    model = SaysWhenTraced().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(fxcc.compile(model)(x), model(x))
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err
    assert "SaysWhenTraced is being traced" in err  # what the forward printed while traced is written out after
