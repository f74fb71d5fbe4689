"""A control-flow fuzzer for DyCL: random programs, compiled with fxcc and compared with eager.

Each seed generates a module (or, one time in four, a closure function) whose forward mixes nested
`if`/`while`/`for` (with `else`), `break`/`continue`/early `return`, `and`/`or`/`not`, conditional
expressions and comparison chains over tensor predicates and `None` checks, `.item()` and `torch.equal`,
loops with data-dependent trip counts, comprehensions with tensor filters, calls into child modules that
have control flow of their own (directly and through a module list), a bounded recursive method, a plain
function, in-place updates of tensors (inputs included), stores into attributes, lists and subscripts,
`with torch.no_grad()`, the odd `try` and `raise`. Tensors hold small integers and the weights are -1/0/1,
so every value is exact and eager and compiled code must agree bit for bit, and take the same branches.

A program runs on several inputs (different paths, checked by line coverage of the eager run) through an
eager copy and through `fxcc.compile`; outputs, the exception raised (type and message), the inputs after
the call (in-place updates) and the module's attributes must be equal. Segments are compiled with a cheap
pipeline and always (no timing against plain Python), so the compiled path is what is checked.

    python tests/dycl_fuzz.py --seeds 0:5000 [--jobs 2]       # or FXCC_FUZZ_SEEDS=0:5000 pytest tests/test_dycl_fuzz.py
    python tests/dycl_fuzz.py --seed 17 --show                 # print one program, its host program and the result
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

D, B = 4, 2
PASSES = "fuse,codegen{backend=extern}"
N_INPUTS = 6
COMPILE_EVERY = 4


class Gen:
    """Writes one random program as source text (a module class or a closure maker)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        mode = self.r.random()
        self.function_mode = mode < 0.25  # a closure over the module
        self.bound_method = 0.25 <= mode < 0.4  # fxcc.compile(model.forward)
        self.s = "m" if self.function_mode else "self"
        self.tvars = ["h0", "h1", "h2"]
        self.ncounter = 0
        self.budget = self.r.randint(6, 14)
        self.features: set[str] = set()

    # ------------------------------------------------------------------------ expressions

    def t(self) -> str:
        return self.r.choice(self.tvars)

    def k(self, lo: int = -6, hi: int = 6) -> int:
        return self.r.randint(lo, hi)

    def texpr(self, depth: int = 0) -> str:
        """A tensor expression of shape (B, D) with small integer values."""
        s, a, b = self.s, self.t(), self.t()
        simple = [f"{s}.lin{self.r.randint(0, 2)}({a})", f"({a} + {b})", f"({a} - {b})", f"({a} * {self.k(-2, 2)})",
                  f"F.relu({a})", f"{a}.flip(0)", f"torch.where({a} > {self.k(-2, 2)}, {a}, {b})", f"(-{a})",
                  f"({a} + {s}.calls)"]
        if depth > 1:
            return self.r.choice(simple)
        return self.pick([
            (0.10, "child", lambda: f"{s}.child({a})"),
            (0.16, "recursion", lambda: f"{s}.rec({a}, {self.r.randint(0, 2)})"),
            (0.21, "function", lambda: f"helper({a})"),
            (0.26, "module_list", lambda: f"{s}.blocks[{self.r.randint(0, 1)}]({a})"),
            (0.34, "ternary", lambda: f"({self.texpr(depth + 1)} if {self.pred(depth + 1)} else {self.texpr(depth + 1)})"),
            (0.38, "comprehension", lambda: f"sum([v * 2 for v in ({a}, {b}) if {self.tpred('v')}], {self.t()})"),
            (0.42, "method", lambda: f"{s}.step({a})"),
            # two effects in one expression: Python's evaluation order decides the values
            (0.44, "order", lambda: f"({s}.step({a}) - {s}.step({b}))"),
            (1.00, None, lambda: self.r.choice(simple)),
        ])

    def pick(self, table: list[tuple[float, str | None, Any]]) -> str:
        """One row of (cumulative probability, feature, maker) by a random roll; its feature is recorded."""
        roll = self.r.random()
        limit, feature, make = next(row for row in table if roll < row[0])
        if feature:
            self.features.add(feature)
        return make()

    def tpred(self, a: str) -> str:
        k = self.k()
        return self.r.choice([f"{a}.sum() > {k}", f"{a}.max() < {self.k(-3, 3)}", f"{a}.mean() >= {k / 4}",
                              f"{a}.sum().item() > {k}", f"({a} > 0).sum().item() >= {self.r.randint(0, 8)}",
                              f"{a}.abs().sum().item() % 3 == {self.r.randint(0, 2)}", f"{a}.norm() < {abs(k) + 2}",
                              f"bool({a}.min() < {self.k(-3, 3)})"])

    def pred(self, depth: int = 0) -> str:
        """A condition that depends on tensor values (sometimes on None checks and Python counters)."""
        a, b = self.t(), self.t()
        if depth > 1:
            self.r.random()  # the roll every condition draws
            return self.tpred(a)

        def window(lo: int, hi: int, width: int, fmt: str) -> str:  # k in [lo, hi], k2 = k + 2..width
            k = self.k(lo, hi)
            return fmt.format(a=a, k=k, k2=k + self.r.randint(2, width))

        return self.pick([
            (0.45, None, lambda: self.tpred(a)),
            (0.55, "boolop", lambda: f"{self.tpred(a)} and {self.tpred(b)}"),
            (0.63, "boolop", lambda: f"{self.tpred(a)} or {self.tpred(b)}"),
            (0.68, "boolop", lambda: f"not {self.tpred(a)}"),
            (0.74, "none_check", lambda: f"prev is not None and torch.equal({a}, prev)"),
            (0.78, "none_check", lambda: f"prev is None or {a}.sum() > prev.sum()"),
            (0.83, "boolop", lambda: f"n > {self.r.randint(0, 3)} or {self.tpred(a)}"),
            (0.88, "chain", lambda: window(-8, 2, 12, "{k} < {a}.sum() < {k2}")),
            (0.91, "boolop", lambda: f"torch.equal({a}, {b})"),
            (0.95, "walrus", lambda: window(-8, 4, 10, "(t := {a}.sum().item()) > {k} and t < {k2}")),
            (1.00, "boolop", lambda: f"({self.tpred(a)} if n % 2 == 0 else {self.tpred(b)})"),
        ])

    # ------------------------------------------------------------------------- statements

    def block(self, indent: int, depth: int, loop: bool) -> list[str]:
        out: list[str] = []
        for _ in range(self.r.randint(1, 3)):
            if self.budget <= 0:
                break
            out += self.stmt(indent, depth, loop)
        return out or [" " * indent + "pass"]

    def stmt(self, indent: int, depth: int, loop: bool) -> list[str]:
        self.budget -= 1
        p, s = " " * indent, self.s
        v = self.t()
        roll = self.r.random()
        compound = depth < 3
        if compound and roll < 0.14:
            self.features.add("if")
            lines = [f"{p}if {self.pred()}:", *self.block(indent + 4, depth + 1, loop)]
            if self.r.random() < 0.3:
                lines += [f"{p}elif {self.pred()}:", *self.block(indent + 4, depth + 1, loop)]
            if self.r.random() < 0.5:
                lines += [f"{p}else:", *self.block(indent + 4, depth + 1, loop)]
            return lines
        if compound and roll < 0.22:
            self.features.add("while")
            c = f"k{self.ncounter}"
            self.ncounter += 1
            lines = [f"{p}{c} = 0", f"{p}while {c} < {self.r.randint(1, 4)} and ({self.pred()}):",
                     f"{p}    {c} += 1", *self.block(indent + 4, depth + 1, True)]
            if self.r.random() < 0.3:
                self.features.add("loop_else")
                lines += [f"{p}else:", *self.block(indent + 4, depth + 1, loop)]
            return lines
        if compound and roll < 0.30:
            self.features.add("for")
            i = f"i{self.ncounter}"
            self.ncounter += 1
            trip = self.r.choice([f"range({self.r.randint(0, 3)})",
                                  f"range(int({self.t()}.abs().sum().item()) % 3)",
                                  f"range({self.t()}.sum().item() > 0, 3)"])
            if "item" in trip:
                self.features.add("data_trip_count")
            lines = [f"{p}for {i} in {trip}:", *self.block(indent + 4, depth + 1, True)]
            if self.r.random() < 0.25:
                self.features.add("loop_else")
                lines += [f"{p}else:", *self.block(indent + 4, depth + 1, loop)]
            return lines
        if compound and roll < 0.33:
            self.features.add("module_list")
            return [f"{p}for blk in {s}.blocks:", f"{p}    {v} = blk({v}).clamp(-8, 8)"]
        if loop and roll < 0.38:
            self.features.add("break" if roll < 0.355 else "continue")
            return [f"{p}if {self.pred()}:", f"{p}    {'break' if roll < 0.355 else 'continue'}"]
        if roll < 0.42:
            self.features.add("early_return")
            return [f"{p}if {self.pred()}:", f"{p}    return {self.result()}"]
        if roll < 0.46:
            self.features.add("inplace")
            return self.r.choice([[f"{p}{v} += {self.texpr()}", f"{p}{v}.clamp_(-8, 8)"],
                                  [f"{p}{v}.mul_({self.k(-1, 1)})"],
                                  [f"{p}{v}[0] = {self.t()}[{B - 1}]"]])
        if roll < 0.50:
            self.features.add("none_check")
            return [f"{p}prev = {self.r.choice([v, 'None', v])}"]
        if roll < 0.53:
            self.features.add("patience")
            return [f"{p}same = same + 1 if prev is not None and torch.equal({v}, prev) else 0"]
        if roll < 0.56:
            return [f"{p}outs.append({v})"]
        if roll < 0.60:
            return [f"{p}n = n + {self.r.randint(1, 2)} if {self.pred()} else n"]
        if roll < 0.62:
            self.features.add("attribute")
            return [f"{p}{s}.calls += 1"]
        if compound and roll < 0.64:
            self.features.add("with")
            return [f"{p}with torch.no_grad():", *self.block(indent + 4, depth + 1, loop)]
        if compound and roll < 0.65:
            self.features.add("try")
            return [f"{p}try:", *self.block(indent + 4, depth + 1, loop), f"{p}except ZeroDivisionError:",
                    f"{p}    n = -1"]
        if roll < 0.66:
            self.features.add("raise")
            return [f"{p}if {self.pred()} and n > 2:", f"{p}    raise ValueError('fuzz: n = ' + str(n))"]
        if self.function_mode and roll < 0.68:
            self.features.add("nonlocal")
            return [f"{p}nonlocal total", f"{p}total += 1"]
        return [f"{p}{v} = ({self.texpr()}).clamp(-8, 8)"]

    def result(self) -> str:
        return f"({self.t()}, n, same, len(outs))"

    def child_body(self) -> list[str]:
        k1, k2 = self.k(-4, 4), self.k(-4, 4)
        return self.r.choice([
            [f"        if h.sum() > {k1}:", "            return (self.lin(h) * 2).clamp(-8, 8)", "        return -h"],
            ["        g = self.lin(h).clamp(-8, 8)", f"        if g.max() < {k1 + 3} or h.sum().item() > {k2}:",
             "            g = g.flip(0)", "        return g"],
            ["        n = 0", f"        while n < 3 and h.abs().sum() > {abs(k1) + 4}:",
             "            h = (h - 1).clamp(-8, 8)", "            n += 1", "        return h * n"],
            ["        g = self.inner(h)", f"        if g.sum() > {k1}:", "            return self.lin(g).clamp(-8, 8)",
             "        return g"],
        ])

    def program(self) -> str:
        groups: list[list[str]] = []
        while self.budget > 0 or not groups:
            groups.append(self.stmt(8, 0, False))
        # one branch on tensor values at the top, so that every program is a DyCL program
        groups.insert(self.r.randint(0, len(groups)), [f"        if {self.pred()}:",
                                                       f"            {self.t()} = ({self.texpr()}).clamp(-8, 8)"])
        body = [line for g in groups for line in g]
        fn_head = ["    def forward(self, x, y=None):"] if not self.function_mode else \
            ["def make(m, scale):", "    total = 0", "", "    def forward(x, y=None):"]
        pre = ["        h0 = x", f"        h1 = {self.s}.lin0(x).clamp(-8, 8)", "        h2 = (x * 2 - 1).clamp(-8, 8)",
               "        if y is not None:", "            h1 = (h1 + y).clamp(-8, 8)",
               "        n, same, prev, outs = 0, 0, None, []"]
        if self.function_mode:
            if any("nonlocal" in line for line in body):  # `nonlocal` must come first in the function
                body = [line for line in body if "nonlocal total" not in line]
                pre = ["        nonlocal total", *pre]
        end = [f"        return ({self.t()} + sum(outs, torch.zeros(1))).clamp(-8, 8), n, same, len(outs)"]
        rec_k = self.k(2, 20)
        helper_k = self.k(-4, 4)
        lines = [
            "import torch", "import torch.nn as nn", "import torch.nn.functional as F", "", "",
            "def helper(h):", f"    if h.sum() > {helper_k}:", "        return (h * 2 - 1).clamp(-8, 8)", "    return -h",
            "", "",
            "class GrandChild(nn.Module):", "    def forward(self, h):", f"        if h.max() > {self.k(-2, 6)}:",
            "            return (h - 2).clamp(-8, 8)", "        return -h", "", "",
            "class Child(nn.Module):", "    def __init__(self):", "        super().__init__()",
            f"        self.lin = nn.Linear({D}, {D})", "        self.inner = GrandChild()", "",
            "    def forward(self, h):", *self.child_body(), "", "",
            "class Prog(nn.Module):", "    def __init__(self):", "        super().__init__()",
            *[f"        self.lin{i} = nn.Linear({D}, {D})" for i in range(3)],
            "        self.child = Child()", "        self.blocks = nn.ModuleList([Child(), Child()])",
            "        self.calls = 0", "",
            "    def leaf(self, h):", "        return (self.lin2(h) + 1).clamp(-8, 8)", "",
            "    def step(self, h):", "        self.calls += 1", "        return (self.lin1(h) - self.calls).clamp(-8, 8)", "",
            "    def rec(self, h, depth):",
            f"        if depth == 0 or h.abs().sum() < {rec_k}:", "            return self.leaf(h)",
            "        return (self.rec(self.lin1(h), depth - 1) - self.rec(h.flip(0), depth - 1)).clamp(-8, 8)", "",
        ]
        if self.function_mode:
            lines += ["", "", *fn_head, *pre, *body, *end, "", "    return forward"]
        else:
            lines += [*fn_head, *pre, *body, *end]
        return "\n".join(lines) + "\n"


def integer_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=g).float())


def inputs(seed: int) -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(N_INPUTS):
        x = torch.randint(-4, 5, (B, D), generator=g).float() * (1 + i % 3)
        kw = {"y": torch.randint(-2, 3, (B, D), generator=g).float()} if i % 3 == 2 else {}
        out.append(((x.clamp(-8, 8),), kw))
    return out


@dataclass
class Outcome:
    """What one program did: whether compiled equals eager, and what was exercised."""

    seed: int
    ok: bool
    detail: str = ""
    paths: int = 0
    features: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def load(source: str, directory: str, seed: int) -> Any:
    path = os.path.join(directory, f"dycl_fuzz_{seed}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"dycl_fuzz_{seed}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _call(fn: Any, args: tuple, kwargs: dict) -> tuple[str, Any]:
    try:
        with torch.no_grad():
            return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exception is part of the behaviour compared
        return "raised", f"{type(e).__name__}: {e}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _paths(fn: Any, filename: str, calls: list[tuple[tuple, dict]]) -> int:
    """How many distinct sets of program lines the eager runs execute (different paths taken)."""
    seen = set()
    for args, kwargs in calls:
        lines: set[int] = set()

        def tracer(frame, event, arg, lines=lines):
            if frame.f_code.co_filename == filename:
                if event == "line":
                    lines.add(frame.f_lineno)
                return tracer
            return None

        sys.settrace(tracer)
        try:
            _call(fn, copy.deepcopy(args), copy.deepcopy(kwargs))
        finally:
            sys.settrace(None)
        seen.add(frozenset(lines))
    return len(seen)


def compiles_segments(seed: int) -> bool:
    """Whether the fuzzer compiles this seed's segments (one seed in COMPILE_EVERY) or runs them as their
    plain Python: the host program, the split and every guard are the same either way, and captures are
    what a program's run costs."""
    return seed % COMPILE_EVERY == 0


def run_one(seed: int, directory: str, show: bool = False) -> Outcome:
    """Generate program `seed`, run it eagerly and compiled on the same inputs, compare everything."""
    import fxcc
    from fxcc import dycl

    t0 = time.perf_counter()
    gen = Gen(seed)
    source = gen.program()
    out = Outcome(seed, True, features=gen.features)
    try:
        mod = load(source, directory, seed)
        torch.manual_seed(seed)
        model_e = mod.Prog().eval()
        integer_weights(model_e, seed)
        model_c = copy.deepcopy(model_e)
        if gen.function_mode:
            eager, compiled_target = mod.make(model_e, 2), mod.make(model_c, 2)
        elif gen.bound_method:
            eager, compiled_target = model_e, model_c.forward
        else:
            eager, compiled_target = model_e, model_c
        calls = inputs(seed)
        probe = mod.make(copy.deepcopy(model_e), 2) if gen.function_mode else copy.deepcopy(model_e)
        out.paths = _paths(probe, mod.__file__, calls)
        saved = (dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US, dycl._median_us)
        if compiles_segments(seed):
            dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US = False, 0.0  # every segment compiled, not timed
        else:
            dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US = True, 1.0  # "0 us": every segment plain Python
            dycl._median_us = lambda fn, args, reps=5: 0.0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compiled = fxcc.compile(compiled_target, passes=PASSES,
                                        options=fxcc.CompileOptions(graph_cache=False, passes=PASSES))
                for i, (args, kwargs) in enumerate(calls):
                    args_e, kwargs_e = copy.deepcopy((args, kwargs))
                    args_c, kwargs_c = copy.deepcopy((args, kwargs))
                    want = _call(eager, args_e, kwargs_e)
                    got = _call(compiled, args_c, kwargs_c)
                    problems = []
                    if want[0] != got[0] or (want[0] == "raised" and want[1] != got[1]) or \
                            (want[0] == "ok" and not _same(want[1], got[1])):
                        problems.append(f"eager {want[0]} {_short(want[1])}, compiled {got[0]} {_short(got[1])}")
                    if not _same((args_e, kwargs_e), (args_c, kwargs_c)):
                        problems.append("the inputs after the call differ (in-place updates)")
                    if model_e.calls != model_c.calls:
                        problems.append(f"module attribute `calls`: eager {model_e.calls}, compiled {model_c.calls}")
                    if problems:
                        out.ok, out.detail = False, f"input {i}: " + "; ".join(problems)
                        break
        finally:
            dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US, dycl._median_us = saved
        out.warnings = [str(w.message).splitlines()[0] for w in caught if "DyCL" in str(w.message)
                        or "fxcc" in str(w.message)]
    except Exception:  # noqa: BLE001 - a crash of the harness itself is a failure with its traceback
        out.ok, out.detail = False, traceback.format_exc(limit=8)
    out.seconds = time.perf_counter() - t0
    if show or not out.ok:
        out.detail += f"\n--- program (seed {seed})\n{source}"
    if show:
        try:
            v = compiled.fxcc.variants if hasattr(compiled, "fxcc") else compiled.variants
            out.detail += "\n--- host programs\n" + "\n".join(p.host_source + "\n".join(s.source for s in p.segments)
                                                              for p in v[0].program.all_programs())
        except Exception as e:  # noqa: BLE001
            out.detail += f"\n(no host program: {e})"
    return out


def _short(x: Any) -> str:
    text = repr(x).replace("\n", " ")
    return text[:300]


def parse_seeds(text: str) -> range:
    """'0:5000' -> range(0, 5000); '17' -> range(17, 18)."""
    if ":" in text:
        a, b = text.split(":")
        return range(int(a), int(b))
    return range(int(text), int(text) + 1)


def summary(outcomes: list[Outcome]) -> str:
    n = len(outcomes)
    failed = [o for o in outcomes if not o.ok]
    multi = sum(1 for o in outcomes if o.paths >= 2)
    feats: dict[str, int] = {}
    for o in outcomes:
        for f in o.features:
            feats[f] = feats.get(f, 0) + 1
    warned = sum(1 for o in outcomes if o.warnings)
    lines = [f"{n} programs: {n - len(failed)} equal to eager, {len(failed)} failed; "
             f"{multi} took 2+ distinct paths over their {N_INPUTS} inputs; {warned} warned (eager parts)",
             "features: " + ", ".join(f"{k} {v}" for k, v in sorted(feats.items()))]
    lines += [f"seed {o.seed}: {o.detail.splitlines()[0] if o.detail else ''}" for o in failed[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0:200", help="a range START:STOP or one seed")
    p.add_argument("--seed", type=int, help="one seed (with --show: print the program and its host program)")
    p.add_argument("--show", action="store_true")
    p.add_argument("--log", help="append one line per program to this file")
    args = p.parse_args(argv)
    seeds = range(args.seed, args.seed + 1) if args.seed is not None else parse_seeds(args.seeds)
    os.environ.setdefault("FXCC_CACHE_DIR", tempfile.mkdtemp(prefix="fxcc-fuzz-cache-"))
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="dycl-fuzz-") as d:
        sys.path.insert(0, d)
        for seed in seeds:
            o = run_one(seed, d, show=args.show)
            outcomes.append(o)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(f"{seed} {'ok' if o.ok else 'FAIL'} paths={o.paths} {o.seconds:.2f}s "
                            f"{o.detail.splitlines()[0] if not o.ok else ''} {'; '.join(o.warnings)[:300]}\n")
            if not o.ok or args.show:
                print(o.detail)
    print(summary(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
