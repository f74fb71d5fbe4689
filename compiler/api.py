"""`fxcc.compile`: a function, decorator and torch.compile backend."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import types
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from fxcc.autotune.plan import plan_options
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils import _pytree as pytree

from . import ir, logs
from .options import MODES, CompileOptions, settings
from .pipeline import PASSES, parse_pipeline
from .runtime import CompiledModule
from .weights import Checkpoint

log = logging.getLogger(__name__)


class FunctionModule(nn.Module):
    """A plain function seen as a module, so functions and modules share one compile path."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def compile(model: Any = None, *, mode: str | None = None, fullgraph: bool = False, dynamic: bool | None = None,
            backend: str | None = None, target: str = "auto", passes: str | None = None, tune: str | None = None,
            plan: str | None = None, quality_budget: float | None = None, tune_budget: int | None = None,
            check_eager: bool | str | None = None, options: CompileOptions | dict | None = None,
            state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None, disable: bool = False) -> Any:
    """Compile an nn.Module (instance or class), a module's bound method (`model.forward`) or a function;
    also usable as `@compile` and `@compile(...)`.

    The result keeps the calling convention of `model`. Compilation happens at the first call, for that
    call's input shapes; a size that changes later recompiles once with that size symbolic (`dynamic`:
    see CompileOptions). A compiled transformers model's `generate` runs its forward calls compiled.

    As torch.compile's: `mode` sets tuning and CUDA graphs (fxcc.options.MODES: "default", "reduce-overhead",
    "max-autotune" = tune="search" with CUDA graphs, "max-autotune-no-cudagraphs"); `fullgraph=True` makes
    what would run eagerly an error; `dynamic` as CompileOptions.dynamic; `backend` can only be "fxcc".
    `check_eager` as CompileOptions.check_eager (True: the first call of each signature is compared with eager,
    "always": every call, False: none). `options` is a CompileOptions or a dict of its fields; the keywords
    override it.

    `state_dict` (a mapping of names to tensors, or the path of a .safetensors file) holds the weights of a model
    built on the meta device (`with torch.device("meta"): model = Model(config)`): the compile reads each weight
    in the form its graph keeps it (under tp-shard only this rank's shards: a file is read a slice at a time), so
    the compiled module holds each weight once and the model stays on meta. There is then no eager model:
    what would run eagerly is an error, as under fullgraph=True. A state dict is let go after the first compile
    (a recompile then needs a file). fxcc.weights has the details.

    `disable=True` (torch.compile's): nothing is compiled; `model` itself is returned (as a decorator, the function
    it decorates).
    """
    if disable:
        if state_dict is not None:
            raise ValueError("fxcc.compile(disable=True, state_dict=...): a model on the meta device cannot run "
                             "uncompiled; load the weights into it (model.load_state_dict(..., assign=True)) first")
        return (lambda m: m) if model is None else model
    if backend not in (None, "fxcc"):
        raise ValueError(f"fxcc.compile(backend={backend!r}): fxcc.compile always compiles with fxcc. For "
                         f"another compiler use torch.compile(model, backend={backend!r}); fxcc's kernel backends are "
                         "chosen in the pipeline, e.g. passes='canonicalize,raise,fuse,codegen{backend=tvm}'")
    if isinstance(options, dict):
        options = CompileOptions(**options)
    given = {k: v for k, v in dict(target=target, passes=passes, tune=tune, plan=plan, quality_budget=quality_budget,
                                   tune_budget=tune_budget, dynamic=dynamic, fullgraph=fullgraph,
                                   check_eager=check_eager).items()
             if v is not None and not (v is getattr(CompileOptions, k) or v == getattr(CompileOptions, k))}
    opts = (options or CompileOptions()).replace(**_with_mode(mode, given))
    if opts.plan is not None:  # a plan file from `fxcc search`: its pipeline and kernel choices, no search
        opts = plan_options(opts)
    # a bad pipeline, pass name, FXCC_* value or target fails here, not at the first call
    env = settings()
    logs.follow_env(env.logs)
    passes = parse_pipeline("default" if opts.passes is None else opts.passes)
    known = {p.name for p in passes} | set(PASSES) | {"all"}
    for where, names in (("print_ir_after", opts.print_ir_after), ("FXCC_PRINT_IR_AFTER", env.print_ir_after)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"fxcc: {where} names no pass: {', '.join(map(repr, unknown))}; "
                             f"passes: all, {', '.join(sorted(PASSES))}")
    if opts.target == "cuda" and not torch.cuda.is_available():
        raise ValueError("fxcc: target='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use target='cpu' or 'auto', or run where a GPU is visible")
    checkpoint = None
    if state_dict is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"fxcc.compile(state_dict=...) loads the weights of an nn.Module built on the meta device; "
                            f"got {type(model).__name__}")
        checkpoint = Checkpoint(state_dict)
    if model is None:
        return lambda m: compile(m, options=opts)
    if checkpoint is not None:
        if isinstance(model, CompiledModule):
            raise TypeError("fxcc.compile(state_dict=...) takes the uncompiled model on the meta device")
        _no_generate_compile(model)
        return CompiledModule(model, opts, checkpoint=checkpoint)
    return _wrap(model, opts)


def _with_mode(mode: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The options `mode` (torch.compile's) stands for, with those given explicitly, which must agree."""
    if mode is None:
        return given
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"fxcc: unknown mode {mode!r}; use one of {', '.join(map(repr, MODES))} (as "
                         "torch.compile's), or leave it out for fxcc's defaults")
    for k, v in MODES[mode].items():
        if k in given and given[k] != v:
            raise ValueError(f"fxcc: mode={mode!r} means {k}={v!r}, which {k}={given[k]!r} contradicts; "
                             "pass one of the two")
    return {**MODES[mode], **given}


def _wrap(model: Any, opts: CompileOptions) -> Any:
    if isinstance(model, CompiledModule):
        return model
    if isinstance(model, nn.Module):
        _no_generate_compile(model)
        return CompiledModule(model, opts)
    if inspect.isclass(model) and issubclass(model, nn.Module):
        return _compile_class(model, opts)
    if (inspect.ismethod(model) and isinstance(model.__self__, nn.Module)
            and getattr(type(model.__self__), model.__name__, None) is getattr(model, "__func__", None)):
        _no_generate_compile(model.__self__)
        # `model.forward = fxcc.compile(model.forward)`: the module's parameters and state are its own
        return CompiledMethod(model.__self__, model.__name__, opts,
                              CompiledModule(model.__self__, opts, method=model))
    if inspect.ismethod(model) and isinstance(model.__self__, nn.Module):
        _no_generate_compile(model.__self__)
        cm = CompiledModule(model.__self__, opts, method=model)
    elif callable(model) and not inspect.isclass(model):
        cm = CompiledModule(FunctionModule(model), opts)
    if callable(model) and not inspect.isclass(model):
        per_instance = _method_of_modules(model, opts)
        bind = _binder(model)

        @functools.wraps(model)
        def compiled_fn(*args, **kwargs):
            if per_instance is not None and args and isinstance(args[0], nn.Module):
                return per_instance(args[0])(*args[1:], **kwargs)
            if bind is not None:
                args, kwargs = bind(args, kwargs)
            return cm(*args, **kwargs)

        compiled_fn.fxcc = cm
        return compiled_fn
    raise TypeError(f"fxcc.compile expects an nn.Module, an nn.Module class or a function; got "
                    f"{type(model).__name__} ({model!r:.60}). Pass the model object itself, e.g. "
                    "fxcc.compile(model) or @fxcc.compile on its class or function.")


def _binder(fn: Any) -> Callable[[tuple, dict], tuple[tuple, dict]] | None:
    """For a plain Python function with default values, a call's arguments with the omitted defaults filled in, as
    torch.compile's trace binds them: `f(x)` and `f(x, alpha=0.5)` are then one input structure (a float that
    changed), where the omitted keyword made them two, each compiled static. The defaults are read at each call
    (`f.__defaults__` may be rebound); only immutable ones (None, numbers, strings, tuples of them) are filled in: a
    default tensor or list stays the function's own state, watched as such (fxcc.guards.Globals), which a write into it
    must not turn into an input. A call that does not bind is passed on as it is, to raise the function's own error.
    None for a function without defaults or whose signature Python cannot read."""
    if not inspect.isfunction(fn) or not (fn.__defaults__ or fn.__kwdefaults__):
        return None
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    total = sum(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)

    def bind(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) + len(kwargs) >= total:  # nothing left out (or surplus for *args): as given
            return args, kwargs
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs
        given = bound.arguments
        defaults = fn.__defaults__ or ()
        for name, value in [*zip(positional[len(positional) - len(defaults):], defaults),
                            *(fn.__kwdefaults__ or {}).items()]:
            if _constant(value):
                given.setdefault(name, value)
        return bound.args, bound.kwargs

    return bind


def _constant(v: Any) -> bool:
    if type(v) is tuple:
        return all(map(_constant, v))
    return v is None or type(v) in (bool, int, float, complex, str, torch.dtype, torch.device)


def _method_of_modules(fn: Any, opts: CompileOptions) -> Callable[[nn.Module], CompiledModule] | None:
    """For a function written as a method (defined in a class body, or its first parameter `self`: `@fxcc.compile`
    on `def forward(self, x)` in a module's class), the CompiledModule of each instance it is called on: that instance with `fn` bound as
    its method, so its parameters and state are guarded and read as the instance's (one compile serves instances
    of one architecture through the graph cache). None for other functions."""
    if not inspect.isfunction(fn):
        return None
    params = list(inspect.signature(fn).parameters)
    scope = fn.__qualname__.split(".")
    if not params or (params[0] != "self" and (len(scope) < 2 or scope[-2] == "<locals>")):
        return None  # not defined in a class body, nor with a `self` parameter
    compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def of(obj: nn.Module) -> CompiledModule:
        cm = compiled.get(obj)
        if cm is None:
            cm = compiled[obj] = CompiledModule(obj, opts, method=types.MethodType(fn, obj))
        return cm

    return of


class CompiledMethod:
    """What `fxcc.compile(module.method)` returns for a method of the module's class (`model.forward =
    fxcc.compile(model.forward)`): calls run compiled; `.fxcc` is the CompiledModule.

    Copied or pickled with its module (copy.deepcopy, pickle, torch.save of the model), the copy compiles the
    copy's method anew at its first call, never the original's: a plain function would be shared by the copies
    and compute with the first model's weights. Its CompiledModule is built at first use, since a copy is made
    while its module is still half built."""

    def __init__(self, owner: nn.Module, name: str, options: CompileOptions, cm: CompiledModule | None = None):
        self._owner, self._name, self._options, self._cm = owner, name, options, cm
        functools.update_wrapper(self, getattr(type(owner), name).__get__(owner))

    @property
    def fxcc(self) -> CompiledModule:
        if self._cm is None:
            self._cm = CompiledModule(self._owner, self._options, method=getattr(type(self._owner), self._name)
                                      .__get__(self._owner))
        return self._cm

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fxcc(*args, **kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self

    def __repr__(self) -> str:
        return f"<fxcc.compile of {type(self._owner).__name__}.{self._name}>"

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return (CompiledMethod, (self._owner, self._name, self._options))

    def __deepcopy__(self, memo: dict) -> CompiledMethod:
        return CompiledMethod(copy.deepcopy(self._owner, memo), self._name, self._options)


def _no_generate_compile(module: nn.Module) -> None:
    """transformers' `generate` wraps the forward in torch.compile itself when the cache is static on a GPU;
    around fxcc's compiled forward that adds only Dynamo's guards and a compile, so fxcc turns it off
    (`generation_config.disable_compile`, which the user can set back)."""
    config = getattr(module, "generation_config", None)
    if config is not None and hasattr(config, "disable_compile") and not config.disable_compile:
        config.disable_compile = True
        log.info("%s: generation_config.disable_compile set, so generate() does not torch.compile the forward "
                 "fxcc compiles", type(module).__name__)


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

    def __getstate__(self):  # copies and pickles leave what was compiled behind: a copy compiles anew
        state = cls.__getstate__(self) if "__getstate__" in vars(cls) else dict(self.__dict__)
        state.pop("_fxcc_compiled", None)
        return state

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__getstate__": __getstate__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return sub


def _tracing(args: tuple, kwargs: dict) -> bool:
    """Inside the capture of an enclosing model (export, symbolic_trace): its graph takes our ops. Inside code
    torch.compile traces, the compiled module is called (Dynamo breaks its graph there, fxcc runs its own)."""
    return torch.compiler.is_exporting() or any(isinstance(a, torch.fx.Proxy)
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
    if isinstance(model, CompiledModule):  # explain what it compiles, with this report's options
        model = model.module
    cm = CompiledModule(model if isinstance(model, nn.Module) else FunctionModule(model), opts)
    cm.echo_ir = False  # the IR goes into the returned report, not onto stdout as well
    with torch.no_grad():  # a model left in training mode is explained as compiled, not run eagerly for gradients
        cm(*args, **kwargs)
    return cm


def torch_compile_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """`torch.compile(m, backend="fxcc")`: dynamo hands over an FX graph; fxcc compiles it for these inputs.

    With dynamic shapes dynamo passes each size the graph uses as an argument of its own (a SymInt): fxcc
    compiles the graph as a function of its tensors, reading those sizes from them, with the dimensions
    dynamo made symbolic symbolic, so one build serves every size dynamo's guards let through. torch.compile's
    `options` (CompileOptions fields) and `mode` (as fxcc.compile's) are passed on. Where fxcc fails on the graph,
    dynamo's graph runs as it is, with a warning naming the failure: the user's program never fails for fxcc's sake.
    """
    options = kwargs.get("options") or {}
    opts = CompileOptions(**options) if isinstance(options, dict) else options
    opts = opts.replace(**_with_mode(kwargs.get("mode"), {}))  # torch.compile(..., mode=) passes it on
    try:
        return _compiled_graph(gm, example_inputs, opts)
    except Exception as e:  # noqa: BLE001 - any failure of fxcc's: dynamo's graph runs eagerly instead
        first = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"fxcc: torch.compile's graph runs eagerly (dynamo's graph, not compiled by fxcc): fxcc failed "
                      f"on it with {type(e).__name__}: {first}", stacklevel=2)
        log.debug("fxcc failed on dynamo's graph", exc_info=True)
        return gm.forward


def _compiled_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], opts: CompileOptions) -> Callable:
    """fxcc's build of dynamo's graph for `torch_compile_backend`, on a copy of it (`gm` stays what dynamo gave, for
    the eager fallback)."""
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    inference = torch.inference_mode if _inference_mode_taken_out(gm) else contextlib.nullcontext
    sizes = _sizes_read_from_tensors(gm, example_inputs)
    scalars = _scalars_read_once(gm)
    # export traces a GraphModule's own code, not a forward put over it: a scalar read as a symbolic float needs
    # the module around it
    module = SizesFromTensors(gm, sizes, len(example_inputs)) if sizes or scalars else gm
    cm = CompiledModule(module, opts)
    keep = [i for i in range(len(example_inputs)) if i not in sizes]
    example = [_hint(example_inputs[i].item() if i in scalars else example_inputs[i]) for i in keep]
    cm.dims_hint = {j: dims for j, i in enumerate(keep) if (dims := _symbolic_dims(gm, i))}
    # dynamo made them dynamic: a float read as a number, an int it passes as a SymInt of its own (a decode position,
    # a stride of a sliced input); symbolic from the first compile, as dynamo's graph serves every value of them
    values = _placeholder_values(gm)
    cm.dims_hint.update({j: {0} for j, i in enumerate(keep) if i in scalars or isinstance(values[i], torch.SymInt)})
    # compile now, so dynamo reports failures at compile time; outside dynamo's tracing context, whose
    # ShapeEnv would otherwise collect the guards of fxcc's own export as guards of the user's frame
    with torch._guards.tracing(None), unset_fake_temporarily(), inference():
        cm.warm(*example)

    def run(*args):
        if scalars:
            args = [a.item() if i in scalars else a for i, a in enumerate(args)]
        with inference():
            return cm(*[args[i] for i in keep]) if sizes else cm(*args)

    run.fxcc = cm
    return run


_ENTER_INFERENCE = torch.autograd.grad_mode._enter_inference_mode
_EXIT_INFERENCE = torch.autograd.grad_mode._exit_inference_mode


def _inference_mode_taken_out(gm: torch.fx.GraphModule) -> bool:
    """A graph of a forward decorated `@torch.inference_mode()` enters inference mode at its first op and leaves
    it after its last: those two nodes are taken out and the whole graph runs in inference mode instead. Inside an
    export they would run for real: inference mode entered in the trace (which then fails) and never left when
    the trace fails before its end, whose guard, freed later, sets the trace's dispatch keys again in the user's
    program ("PythonDispatcherTLS was not set"). Inference mode over part of a graph only is not compiled."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    marks = [n for n in nodes if n.op == "call_function" and n.target in (_ENTER_INFERENCE, _EXIT_INFERENCE)]
    if not marks:
        return False
    enter, leave = nodes[0], nodes[-1]
    if (marks != [enter, leave] or enter.target is not _ENTER_INFERENCE or enter.args != (True,) or enter.kwargs
            or leave.target is not _EXIT_INFERENCE or leave.args != (enter,) or len(enter.users) != 1 or leave.users):
        raise NotImplementedError("the graph enters or leaves torch.inference_mode inside it (fxcc compiles a "
                                  "graph run in inference mode as a whole only)")
    gm.graph.erase_node(leave)
    gm.graph.erase_node(enter)
    gm.recompile()
    return True


def _placeholder_values(gm: torch.fx.GraphModule) -> list[Any]:
    return [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]


def _symbolic_dims(gm: torch.fx.GraphModule, i: int) -> set[int]:
    v = _placeholder_values(gm)[i]
    return {d for d, s in enumerate(v.shape) if ir.is_symbolic(s)} if isinstance(v, torch.Tensor) else set()


def _sizes_read_from_tensors(gm: torch.fx.GraphModule, example: list[Any]) -> dict[int, tuple[int, int]]:
    """Size arguments (SymInt inputs that are a tensor input's dimension): input -> (tensor input, dim)."""
    vals = _placeholder_values(gm)
    if len(vals) != len(example):
        return {}
    where = {}
    for i, v in enumerate(vals):
        if isinstance(v, torch.Tensor):
            for d, s in enumerate(v.shape):
                if ir.is_symbolic(s) and s.node.expr.is_Symbol:
                    where.setdefault(s.node.expr, (i, d))
    return {i: where[x.node.expr] for i, x in enumerate(example)
            if isinstance(x, torch.SymInt) and x.node.expr in where}


def _scalars_read_once(gm: torch.fx.GraphModule) -> set[int]:
    """0-d tensor inputs the graph only reads as a number (dynamo passes a float argument or a model's float
    attribute so, under automatic dynamic or dynamic=True). The graph is changed to take the number itself, which
    fxcc captures as a symbolic float (fxcc.capture), or, where the program needs its value (a value test on one
    `.item()`), as a constant its guard checks."""
    out = set()
    for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        v = p.meta.get("example_value", p.meta.get("val"))
        reads = [u for u in p.users if (u.op == "call_method" and u.target == "item")
                 or (u.op == "call_function" and u.target is torch.ops.aten.item.default)]
        if isinstance(v, torch.Tensor) and v.dim() == 0 and reads and len(reads) == len(p.users):
            for u in reads:
                u.replace_all_uses_with(p)
                gm.graph.erase_node(u)
            out.add(i)
    if out:
        gm.recompile()
    return out


class SizesFromTensors(nn.Module):
    """Dynamo's graph as a function of its tensors: each size argument is read from the tensor it is a
    dimension of, so an export of it has symbolic sizes instead of one constant per size argument (and a
    module, whose forward export calls, around a graph taking a symbolic float)."""

    def __init__(self, gm: torch.fx.GraphModule, sizes: dict[int, tuple[int, int]], n: int):
        super().__init__()
        self.gm, self.sizes, self.n = gm, sizes, n
        self.keep = [i for i in range(n) if i not in sizes]

    def forward(self, *tensors: Any) -> Any:
        args: list[Any] = [None] * self.n
        for i, t in zip(self.keep, tensors):
            args[i] = t
        for i, (j, d) in self.sizes.items():
            args[i] = args[j].shape[d]
        return self.gm(*args)


def _hint(x: Any) -> Any:
    """A plain number for a symbolic scalar dynamo passes (its example value)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) and x.node.has_hint():
        return x.node.hint
    return x


def register_torch_backend() -> None:
    from torch._dynamo import list_backends, register_backend

    if "fxcc" not in list_backends(exclude_tags=()):
        register_backend(name="fxcc")(torch_compile_backend)
