"""`fxcc.compile`: a function, decorator and torch.compile backend."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from fxcc.autotune.plan import plan_options
from torch.utils import _pytree as pytree

from .options import CompileOptions
from .pipeline import PASSES, parse_pipeline
from .runtime import CompiledModule


class FunctionModule(nn.Module):
    """A plain function seen as a module, so functions and modules share one compile path."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def compile(model: Any = None, *, target: str = "auto", passes: str | None = None, tune: str = "cached",
            plan: str | None = None, quality_budget: float | None = None, tune_budget: int | None = None,
            options: CompileOptions | None = None) -> Any:
    """Compile an nn.Module (instance or class) or a function; also usable as `@compile` and `@compile(...)`.

    The result keeps the calling convention of `model`. Compilation happens at the first call, for that
    call's input shapes; later calls with other shapes/dtypes compile further variants.
    """
    opts = (options or CompileOptions()).replace(
        **{k: v for k, v in dict(target=target, passes=passes, tune=tune, plan=plan,
                                 quality_budget=quality_budget, tune_budget=tune_budget).items()
           if v != getattr(CompileOptions, k, None)})
    if opts.plan is not None:  # a plan file from `fxcc search`: its pipeline and kernel choices, no search
        opts = plan_options(opts)
    # a bad pipeline, pass name or target fails here, not at the first call
    passes = parse_pipeline("default" if opts.passes is None else opts.passes)
    known = {p.name for p in passes} | set(PASSES) | {"all"}
    unknown = [n for n in opts.print_ir_after if n not in known]
    if unknown:
        raise ValueError(f"fxcc: print_ir_after names no pass: {', '.join(map(repr, unknown))}; "
                         f"passes: all, {', '.join(sorted(PASSES))}")
    if opts.target == "cuda" and not torch.cuda.is_available():
        raise ValueError("fxcc: target='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use target='cpu' or 'auto', or run where a GPU is visible")
    if model is None:
        return lambda m: compile(m, options=opts)
    return _wrap(model, opts)


def _wrap(model: Any, opts: CompileOptions) -> Any:
    if isinstance(model, CompiledModule):
        return model
    if isinstance(model, nn.Module):
        return CompiledModule(model, opts)
    if inspect.isclass(model) and issubclass(model, nn.Module):
        return _compile_class(model, opts)
    if callable(model) and not inspect.isclass(model):
        cm = CompiledModule(FunctionModule(model), opts)

        @functools.wraps(model)
        def compiled_fn(*args, **kwargs):
            return cm(*args, **kwargs)

        compiled_fn.fxcc = cm
        return compiled_fn
    raise TypeError(f"fxcc.compile expects an nn.Module, an nn.Module class or a function; got "
                    f"{type(model).__name__} ({model!r:.60}). Pass the model object itself, e.g. "
                    "fxcc.compile(model) or @fxcc.compile on its class or function.")


def _compile_class(cls: type[nn.Module], opts: CompileOptions) -> type[nn.Module]:
    """A subclass whose instances run compiled; capture and eager fallback call the original class."""

    def __call__(self, *args, **kwargs):
        compiled = self.__dict__.get("_fxcc_compiled")
        if compiled is None:
            compiled = CompiledModule(self, opts, eager_call=functools.partial(nn.Module.__call__, self))
            self.__dict__["_fxcc_compiled"] = compiled
        if compiled.capturing or _tracing(args, kwargs):
            return nn.Module.__call__(self, *args, **kwargs)
        return compiled(*args, **kwargs)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return sub


def _tracing(args: tuple, kwargs: dict) -> bool:
    """Inside the capture of an enclosing model (export, dynamo, symbolic_trace): its graph takes our ops."""
    return torch.compiler.is_compiling() or any(isinstance(a, torch.fx.Proxy)
                                                for a in pytree.tree_leaves((args, kwargs)))


def explain(model: Any, *args: Any, passes: str | None = None, ir_after_each: bool = True, **kwargs: Any) -> str:
    """Compile `model` for these inputs and return the report `fxcc explain` prints."""
    return explained(model, *args, passes=passes, ir_after_each=ir_after_each, **kwargs).explain(
        ir_after_each=ir_after_each)


def explained(model: Any, *args: Any, passes: str | None = None, ir_after_each: bool = True,
              **kwargs: Any) -> CompiledModule:
    """`model` compiled for these inputs with the IR after each pass recorded (not printed): what `explain`
    reports on, and `fxcc explain --kernels/--source` reads the variant's kernels from."""
    opts = CompileOptions(passes=passes, print_ir_after=("all",) if ir_after_each else ())
    cm = CompiledModule(model if isinstance(model, nn.Module) else FunctionModule(model), opts)
    cm.echo_ir = False  # the IR goes into the returned report, not onto stdout as well
    cm(*args, **kwargs)
    return cm


def torch_compile_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """`torch.compile(m, backend="fxcc")`: dynamo hands over an FX graph; fxcc compiles it for these inputs."""
    options = kwargs.get("options") or {}
    cm = CompiledModule(gm, CompileOptions(**options) if isinstance(options, dict) else options)
    # with dynamic shapes dynamo passes sizes as SymInts; calls bring plain ints, so compile for the hint
    example = [x.node.hint if isinstance(x, torch.SymInt) and x.node.has_hint() else x for x in example_inputs]
    cm.warm(*example)  # compile now, so dynamo reports failures at compile time

    def run(*args):
        return cm(*args)

    return run


def register_torch_backend() -> None:
    from torch._dynamo import list_backends, register_backend

    if "fxcc" not in list_backends(exclude_tags=()):
        register_backend(name="fxcc")(torch_compile_backend)
