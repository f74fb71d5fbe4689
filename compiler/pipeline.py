"""Passes, their registry, the textual pipeline ("raise,layer-skip{speedup=1.5},fuse") and the PassManager.

The registry is one table, name -> "module:Class", loaded when a pipeline names the pass (xDSL's
`get_all_passes`): passes never import it to register themselves, and importing this module imports no pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import math
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from . import ir

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "decompose,canonicalize,raise,horizontal,merge-linears,gemv,layout,fuse,codegen"


@dataclass
class PassResult:
    """What a pass did: whether the graph changed and counts worth reporting (`raised.rms_norm: 4`)."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    # False: the change only wrote attributes no node's type depends on (a kernel op's choice: its outputs are what its
    # body computes, whatever runs it), so the values are not propagated again (FakeTensors through the whole graph:
    # half of a warm compile of a 54-kernel model)
    retyped: bool = True


@dataclass
class PassContext:
    """What passes may read besides the graph: options, the user's module and example inputs; and what this
    compile built so far (`kernels`: kernel key -> what the codegen decision built for its choice, taken by
    the executable builder; it lives as long as the compile). `pointwise_kernel`: where a generated backend serves
    the target, a pointwise body -> the kernel it generates for it (a function of the input list returning the
    outputs; None where it has none), so a pass that decides by timing (layout) times what the compile will run."""

    options: Any = None
    module: Any = None
    example_inputs: tuple = ()
    target: str = "cpu"
    kernels: dict[str, Any] = field(default_factory=dict)
    pointwise_kernel: Any = None


@dataclass(frozen=True)
class Pass:
    """A pass: a kebab-case `name`, typed options as dataclass fields, and `apply`.

    `reads`/`writes` name the IR levels (aten, tx, kernel) the pass works on; `measures`: the pass chooses by
    timing, so its output depends on the machine (the graph cache's key then names the machine).
    """

    name: ClassVar[str] = ""
    reads: ClassVar[str] = "aten"
    writes: ClassVar[str] = "aten"
    exact: ClassVar[bool] = True
    measures: ClassVar[bool] = False

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def backoff(self, result: PassResult) -> Pass | None:
        """Approximate passes: a weaker instance, given what this one did (`result`); None when none is left.

        `compile(quality_budget=...)` calls it while the measured quality loss exceeds the budget.
        """
        return None

    def check_split(self, module: Any) -> None:
        """Called when `module` cannot be captured as one graph and is about to become a DyCL host program whose
        segments this pass will see one at a time; a pass that cannot then do what it was asked raises here,
        saying what to change."""

    def spec(self) -> str:
        opts = [f"{f.name.replace('_', '-')}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# every pass by name: "module:Class" until first use, then the class (`pass_class`)
PASSES: dict[str, str | type[Pass]] = {
    "decompose": "fxcc.passes.decompose:Decompose",
    "canonicalize": "fxcc.passes.canonicalize:Canonicalize",
    "raise": "fxcc.passes.raising:Raise",
    "horizontal": "fxcc.passes.horizontal:Horizontal",
    "merge-linears": "fxcc.passes.merge_linears:MergeLinears",
    "gemv": "fxcc.passes.gemv:Gemv",
    "layout": "fxcc.passes.layout:Layout",
    "fuse": "fxcc.passes.fuse:Fuse",
    "layer-skip": "fxcc.passes.layer_skip:LayerSkip",
    "token-merge": "fxcc.passes.token_merge:TokenMerge",
    "tp-shard": "fxcc.passes.tp_shard:TPShard",
    "fuse-allreduce-rmsnorm": "fxcc.passes.fuse_allreduce_rmsnorm:FuseAllReduceRMSNorm",
    # decisions made by measurement: they live with the autotuner
    "mixed-precision": "fxcc.autotune.mixed_precision:MixedPrecision",
    "codegen": "fxcc.autotune.select:Codegen",
}


def pass_class(name: str) -> type[Pass] | None:
    """The pass class registered as `name` (imported now if it was not yet), or None."""
    entry = PASSES.get(name)
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = PASSES[name] = getattr(importlib.import_module(module), cls)
    return entry


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, all imported (`fxcc passes`, the plan search's knobs)."""
    return {name: pass_class(name) for name in list(PASSES)}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator for passes defined outside fxcc (a user's, a test's): usable by name in pipelines."""
    if not cls.name or not re.fullmatch(r"[a-z][a-z0-9-]*", cls.name):
        raise ValueError(f"pass {cls.__qualname__} needs a kebab-case name, got {cls.name!r}")
    known = pass_class(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"two passes are named {cls.name!r}: {known.__qualname__} and {cls.__qualname__}")
    PASSES[cls.name] = cls
    return cls


# ---------------------------------------------------------------------------------------- parser


class PipelineError(ValueError):
    """A malformed pipeline string; the message shows the text with a caret under the offending column."""

    def __init__(self, message: str, text: str, col: int):
        self.text, self.col, self.reason = text, col, message
        super().__init__(f"{message}\n  {text}\n  {' ' * col}^")


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse 'name{opt=value,...},name,...' into pass instances; `default` expands to the default pipeline."""
    if not isinstance(text, str):
        raise TypeError(f"fxcc: passes must be a pipeline string like {DEFAULT_PIPELINE!r}, got {type(text).__name__}")
    passes: list[Pass] = []
    i, n = 0, len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j].isspace():
            j += 1
        return j

    while True:
        i = skip_ws(i)
        m = _NAME.match(text, i)
        if not m:
            what = "end of text" if i >= n else repr(text[i])
            raise PipelineError(f"expected a pass name, found {what}", text, i)
        name, name_col = m.group(), i
        i = skip_ws(m.end())
        raw: list[tuple[str, str, int, int]] = []
        if i < n and text[i] == "{":
            close = text.find("}", i)
            nxt = text.find("{", i + 1)
            if close < 0 or (0 <= nxt < close):
                raise PipelineError(f"unbalanced braces: '{{' after {name!r} is never closed", text, i)
            raw = _parse_options(text, i + 1, close)
            i = skip_ws(close + 1)
        if name == "default":
            if raw:
                raise PipelineError("'default' takes no options", text, name_col)
            passes.extend(parse_pipeline(DEFAULT_PIPELINE))
        else:
            passes.append(_instantiate(name, name_col, raw, text))
        if i >= n:
            return passes
        if text[i] == "}":
            raise PipelineError("unbalanced braces: '}' without a matching '{'", text, i)
        if text[i] != ",":
            raise PipelineError(f"expected ',' between passes, found {text[i]!r}", text, i)
        i += 1


def _parse_options(text: str, start: int, end: int) -> list[tuple[str, str, int, int]]:
    out = []
    pos = start
    if not text[start:end].strip():
        return out  # `name{}`: no options
    for part in text[start:end].split(","):
        col = pos + len(part) - len(part.lstrip())
        if "=" not in part:
            raise PipelineError(f"option {part.strip()!r} needs a value: write key=value", text, col)
        key, value = part.split("=", 1)
        out.append((key.strip(), value.strip(), col, pos + len(key) + 1 + len(value) - len(value.lstrip())))
        pos += len(part) + 1
    return out


def _instantiate(name: str, col: int, raw: list[tuple[str, str, int, int]], text: str) -> Pass:
    cls = pass_class(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(PASSES) + ["default"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known passes: {', '.join(sorted(PASSES))}"
        raise PipelineError(f"unknown pass {name!r}{hint}", text, col)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value, kcol, vcol in raw:
        fname = key.replace("-", "_")
        if fname in kwargs:
            raise PipelineError(f"pass {name!r} is given option {key!r} twice", text, kcol)
        if fname not in fields:
            known = ", ".join(f.replace("_", "-") for f in fields) or "none"
            raise PipelineError(f"pass {name!r} has no option {key!r} (options: {known})", text, kcol)
        try:
            kwargs[fname] = _convert(value, hints[fname])
        except ValueError as e:
            raise PipelineError(f"option {key!r} of pass {name!r}: {e}", text, vcol) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"pass {name!r}: {e}", text, col) from None


def _convert(value: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value.lower() == "none":
            return None
        for a in args:
            try:
                return _convert(value, a)
            except ValueError:
                pass
        raise ValueError(f"expected {' or '.join(a.__name__ for a in args)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if hint is bool:
        low = value.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if hint is float:
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(x):
            raise ValueError(f"expected a finite number, got {value!r}")
        return x
    if hint is str:
        return value.strip("'\"")
    raise ValueError(f"unsupported option type {hint}")


# ----------------------------------------------------------------------------------- pass manager


@dataclass
class PassRecord:
    """One pass run: its spec, time, result, the IR after it when requested, and the guards it added on the graph's
    symbolic sizes (a pass that compares a symbol with a number, `s0 == 4`, keeps the variant to the sizes that give
    the same answer: fxcc.ir.same_shape asks without guarding)."""

    spec: str
    seconds: float
    result: PassResult
    ir_after: str | None = None
    guards: tuple[str, ...] = ()


class PassManager:
    """Runs passes in order with timing, optional verification after each, and optional IR dumps."""

    def __init__(self, passes: list[Pass], *, verify_each: bool = False,
                 print_ir_after: frozenset[str] | set[str] = frozenset(), echo: bool = False):
        self.passes = passes
        self.verify_each = verify_each
        self.print_ir_after = set(print_ir_after)
        self.echo = echo
        self.records: list[PassRecord] = []

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        signature = ir.output_types(gm)
        mode = ir.symbolic_mode(gm)
        shape_env = mode.shape_env if mode is not None else None
        for p in self.passes:
            t0 = time.perf_counter()
            guarded = len(shape_env.guards) if shape_env is not None else 0
            result = p.apply(gm, ctx)
            if result.changed:
                gm.graph.eliminate_dead_code(is_impure_node=_impure)
                gm.recompile()
                who = f"after pass {p.name!r}"
                if self.verify_each:
                    ir.verify(gm, signature, who=who)
                elif result.retyped:
                    ir.propagate(gm, who=who)
            seconds = time.perf_counter() - t0
            text = None
            if "all" in self.print_ir_after or p.name in self.print_ir_after:
                text = ir.print_graph(gm)
                if self.echo:
                    print(f"// -----// IR after {p.spec()} //----- //\n{text}", file=sys.stderr)
            guards = tuple(str(g.expr) for g in shape_env.guards[guarded:]) if shape_env is not None else ()
            if guards:
                log.info("pass %s guarded the variant's symbolic sizes: %s", p.spec(), ", ".join(guards))
            self.records.append(PassRecord(p.spec(), seconds, result, text, guards))
            stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
            log.debug("pass %-14s %7.1f ms  %s", p.spec(), seconds * 1e3, stats)
        return gm


def _impure(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output") or (node.op != "get_attr" and node.is_impure())
