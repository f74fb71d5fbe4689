"""The IR is torch.fx: this module prints it as MLIR-like text and checks it with FakeTensors.

    %rms_norm = tx.rms_norm(%add, %weight) {eps = 1e-06} : (tensor<1x8x64xf32>, tensor<64xf32>) -> tensor<1x8x64xf32>
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import operator
import re
import weakref
from collections.abc import Iterator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true, statically_known_true

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch before 2.13 (the GPU machines' 2.11) names it hint_int
    from torch.fx.experimental.symbolic_shapes import hint_int as optimization_hint
from torch.utils import _pytree as pytree

from .dialects import KERNEL_OPS, kernel_body, op_name

_DTYPE = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "ui8",
    torch.bool: "i1", torch.complex64: "complex<f32>", torch.float8_e4m3fn: "f8E4M3FN",
    torch.float8_e5m2: "f8E5M2",
}


class VerificationError(RuntimeError):
    """A graph whose recorded shapes/dtypes disagree with what its ops compute."""


def dtype_str(dtype: torch.dtype) -> str:
    return _DTYPE.get(dtype, str(dtype).replace("torch.", ""))


def dim_str(d: Any) -> str:
    """One dimension: `128`, a symbol `s0`, or an expression of symbols in parentheses `(s0+1)`."""
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return str(expr) if expr.is_Symbol or expr.is_Integer else f"({str(expr).replace(' ', '')})"
    return str(d)


def canonical_symbols(text: str) -> str:
    """Symbols renamed in order of appearance (s0, s1, ...): export numbers them by where they come from,
    so two kernels that differ only in that print alike (and share one build)."""
    names: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        if m.group(0) not in names:
            names[m.group(0)] = f"{m.group(0)[0]}{len(names)}"
        return names[m.group(0)]

    return _TENSOR_TYPE.sub(lambda t: _SYMBOL.sub(rename, t.group(0)), text)


_TENSOR_TYPE = re.compile(r"(?:tensor|strides|offset)<[^>]*>")  # and kernel_text's layouts
_SYMBOL = re.compile(r"(?:(?<=x)|(?<![A-Za-z0-9_]))[su]\d+")  # dims are x-separated; dtypes never match


def is_symbolic(s: Any) -> bool:
    """Whether a size is a symbol (or an expression of symbols), not a number."""
    return isinstance(s, torch.SymInt) and bool(s.node.expr.free_symbols)


def hint(s: Any) -> int:
    """A number for a size: the example a symbol was created from. Reading it adds no guard (unlike int()),
    so code that only needs a representative size (timing, example inputs) keeps the graph symbolic."""
    return optimization_hint(s) if isinstance(s, torch.SymInt) else int(s)


def hints(sizes: Any) -> tuple[int, ...]:
    return tuple(hint(s) for s in sizes)


def same_shape(a: Any, b: Any) -> bool:
    """Whether two shapes are equal whatever values their symbols take. Asking adds no guard, where `a == b` on
    symbolic sizes guards the variant on the answer for the sizes it was compiled for (`s0 != 4`: a prompt as long
    as there are heads would compile again)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements of the flat buffer a tensor of `shape` and `stride` spans from its first element: 0 when it
    has none (a batch of 0 rows holds no storage, whatever its other sizes)."""
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride))


def type_str(val: Any) -> str:
    """MLIR-like type of a node value: tensor<2x8xf32> (tensor<s0x8xf32> with a symbolic size), a tuple of
    them, or the Python scalar type."""
    if isinstance(val, torch.Tensor):
        dims = "x".join(dim_str(d) for d in val.shape)
        return f"tensor<{dims + 'x' if dims else ''}{dtype_str(val.dtype)}>"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(type_str(v) for v in val) + ")"
    if isinstance(val, torch.SymInt) or isinstance(val, int):
        return "index"
    if isinstance(val, float):
        return "f64"
    if val is None:
        return "none"
    return type(val).__name__


def _attr_str(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_attr_str(x) for x in v) + "]"
    if isinstance(v, torch.dtype):
        return dtype_str(v)
    if isinstance(v, torch.device):
        return f'"{v}"'
    if isinstance(v, (torch.memory_format, torch.layout)):
        return str(v).replace("torch.", "")
    return str(v)


def _operand_str(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_operand_str(x) for x in a) + "]"
    return _attr_str(a)


def _has_node(a: Any) -> bool:
    if isinstance(a, fx.Node):
        return True
    if isinstance(a, (list, tuple)):
        return any(_has_node(x) for x in a)
    return False


def _split_args(node: fx.Node) -> tuple[list[Any], dict[str, Any]]:
    """Operands (anything holding a node) in order, and attributes named by the op's schema."""
    names: list[str] = []
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
    operands, attrs = [], {}
    for i, a in enumerate(node.args):
        if _has_node(a):
            operands.append(a)
        elif a is not None:
            attrs[names[i] if i < len(names) else f"arg{i}"] = a
    for k, a in node.kwargs.items():
        if _has_node(a):
            operands.append(a)
        elif a is not None:
            attrs[k] = a
    return operands, attrs


def _operand_types(operands: list[Any]) -> list[str]:
    out = []
    for a in operands:
        if isinstance(a, fx.Node):
            out.append(type_str(a.meta.get("val")))
        else:
            out.append(type_str([x.meta.get("val") for x in a if isinstance(x, fx.Node)]))
    return out


def format_node(node: fx.Node) -> str:
    val = node.meta.get("val")
    if node.op == "get_attr":
        return f"%{node.name} = param \"{node.target}\" : {type_str(val)}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"%{node.name} = get %{node.args[0].name}[{node.args[1]}] : {type_str(val)}"
    if node.op in ("call_function", "call_method", "call_module"):
        operands, attrs = _split_args(node)
        if node.op == "call_function":
            name = op_name(node.target)
        else:
            name = f"py.{node.op.split('_')[1]}.{node.target}"
        if node.target in KERNEL_OPS:
            try:
                name = f"{name}[{kernel_body(attrs.get('kernel', '')).kind}]"
            except RuntimeError:  # a graph read back without its bodies: the key still names the kernel
                pass
            operands = list(operands[0]) if operands else []
        attr_txt = ""
        if attrs:
            attr_txt = " {" + ", ".join(f"{k} = {_attr_str(v)}" for k, v in attrs.items()) + "}"
        eager = node.meta.get("fxcc_eager")
        note = f"  // eager: {eager}" if eager else ""
        sig = f"({', '.join(_operand_types(operands))}) -> {type_str(val)}"
        ops_txt = ", ".join(_operand_str(a) for a in operands)
        return f"%{node.name} = {name}({ops_txt}){attr_txt} : {sig}{note}"
    raise ValueError(node.op)


def print_graph(gm: fx.GraphModule, name: str = "forward") -> str:
    """The whole graph as a function in MLIR-like text (size symbols named s0, s1, ... in order of use)."""
    return canonical_symbols(_graph_text(gm, name))


def _graph_text(gm: fx.GraphModule, name: str) -> str:
    """print_graph's text with export's own symbol names."""
    lines, params = [], []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            params.append(f"%{n.name}: {type_str(n.meta.get('val'))}")
        elif n.op == "output":
            outs = n.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            lines.append("  return " + ", ".join(_operand_str(o) for o in outs))
        else:
            lines.append("  " + format_node(n))
    return f"func @{name}({', '.join(params)}) {{\n" + "\n".join(lines) + "\n}"


def kernel_text(body: fx.GraphModule, kind: str) -> str:
    """A kernel body's text, the input of its key: the printed graph, then the strides of its values that are not
    row-major. The printed types carry shapes only: two bodies alike but for layout (NCHW and channels-last, a
    batch-symbolic input and its transpose) are two kernels, whose generated code and cached choices differ.
    Symbolic strides print as `strides<1, s0>`, their symbols named as the graph's (canonical_symbols)."""
    out = []
    for n in body.graph.nodes:
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        if not all(type(d) is int for d in (*v.shape, *v.stride(), v.storage_offset())):
            out += _symbolic_layout(n.name, v)
        elif v.storage_offset() or not row_major(tuple(v.shape), tuple(v.stride())):
            out.append(f"%{n.name} strides {tuple(v.stride())}" + (f" offset {v.storage_offset()}"
                                                                   if v.storage_offset() else ""))
    return canonical_symbols(_graph_text(body, kind) + ("\n// layouts: " + ", ".join(out) if out else ""))


def _symbolic_layout(name: str, v: torch.Tensor) -> list[str]:
    """`%x strides<1, s0>` for a value of symbolic sizes whose strides are not row-major (compared as
    expressions: no guard), with its offset when that is not 0; nothing for a row-major one."""
    def expr(d: Any) -> Any:
        return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)

    shape, stride, offset = v.shape, v.stride(), expr(v.storage_offset())
    dense = all((type(shape[d]) is int and shape[d] == 1)
                or sympy.expand(expr(stride[d]) - sympy.Mul(*[expr(x) for x in shape[d + 1:]])) == 0
                for d in range(len(shape)))
    if dense and offset == 0:
        return []
    return [f"%{name} strides<{', '.join(dim_str(x) for x in stride)}>"
            + (f" offset<{dim_str(v.storage_offset())}>" if offset != 0 else "")]


def row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether static `stride` is the row-major layout of `shape` (a dimension of size 1 may have any stride)."""
    return all(shape[d] == 1 or stride[d] == math.prod(shape[d + 1:]) for d in range(len(shape)))


def flatten_inputs(args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec]:
    """A call's arguments as the graph's flat inputs (keyword order ignored): the IR's calling convention."""
    return pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))


def clone_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph sharing its parameters (no weight is copied): a pass may
    transform the copy and leave `gm` as it was."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- fake propagation


@contextlib.contextmanager
def running_fake(mode: FakeTensorMode) -> Iterator[None]:
    """Run ops on `mode`'s FakeTensors as export traced them: with the Python dispatcher, so an op that decomposes
    (upsample_nearest2d.vec's output size) takes its Python decomposition, which keeps symbolic sizes symbolic; its
    C++ one reads every size as an int and so specialized each symbol of its operand (a UNet's batch); and with a
    convolution's backend chosen without guards where it cannot change the output (`_select_conv_backend_unguarded`).
    Static sizes (no shape environment) need no symbols kept and run without either: they slow every op's dispatch."""
    if mode.shape_env is None:
        with mode:
            yield
        return
    with mode, enable_python_dispatcher(), conv_backends_unguarded():
        yield


_SELECT_CONV_BACKEND = torch._C._select_conv_backend
_CONV_BACKENDS = tuple(torch._C._ConvBackend.__members__.values())


@contextlib.contextmanager
def conv_backends_unguarded() -> Iterator[None]:
    """Within the block, FakeTensor convolutions choose their backend without guards where that cannot change
    their output (`_select_conv_backend_unguarded`); one another thread fakes meanwhile gets the same answer,
    which is torch's wherever the backend could matter."""
    before = torch._C._select_conv_backend
    torch._C._select_conv_backend = _select_conv_backend_unguarded
    try:
        yield
    finally:
        torch._C._select_conv_backend = before


def _select_conv_backend_unguarded(input: torch.Tensor, weight: torch.Tensor, **kwargs: Any) -> Any:
    """A convolution's FakeTensor kernel (torch's fake_impls.conv) asks `_select_conv_backend` which backend eager
    would take, only for the memory format of its output. That choice reads sizes against speed heuristics
    (oneDNN from batch 16 for weights that need no gradient, as the fakes propagated here), each comparison a
    guard: the variant of a conv net stopped at batch 15 and batch 16 compiled again. Where every backend gives the
    output the same memory format (contiguous operands), the backend is chosen without guards; else as torch does,
    guarded, since the layout then depends on it."""
    env = next((s.node.shape_env for s in (*input.shape, *weight.shape) if isinstance(s, torch.SymInt)), None)
    if env is None:  # static sizes: nothing to guard
        return _SELECT_CONV_BACKEND(input, weight, **kwargs)
    if weight.dim() == 3 and not input.is_mkldnn and not input.is_xpu:  # as fake_impls.conv asks for a conv1d
        operand, kernel = input.contiguous().unsqueeze(2), weight.unsqueeze(2)
    else:
        operand, kernel = input, weight
    try:
        formats = {torch._C._conv_determine_backend_memory_format(operand, kernel, b) for b in _CONV_BACKENDS}
    except RuntimeError:
        formats = set()
    if len(formats) != 1:
        return _SELECT_CONV_BACKEND(input, weight, **kwargs)
    with env.suppress_guards():  # its checks of the operands' shapes: export's trace of the model made them
        return _SELECT_CONV_BACKEND(input, weight, **kwargs)


def _fake_of(mode: FakeTensorMode, t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        with mode:
            return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
    return t


def propagate(gm: fx.GraphModule, *, check: bool = False, who: str = "") -> None:
    """Recompute meta['val'] of every node with FakeTensors; with check, compare with what is recorded.

    Placeholders keep their recorded values (the graph's signature). A node whose op cannot run on
    FakeTensors keeps its recorded value and is marked eager. Raises VerificationError naming `who`.
    """
    with _fake_errors_quiet():
        _propagate(gm, check, who)


@contextlib.contextmanager
def _fake_errors_quiet() -> Iterator[None]:
    """FakeTensorMode logs every op whose meta function raises, traceback and all, before the exception reaches
    the caller; here the caller handles it (the node keeps its recorded value), so the log is noise on stderr (a
    bilinear upsample's `_unsafe_index` on symbolic sizes printed 80 lines per compile)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _propagate(gm: fx.GraphModule, check: bool, who: str) -> None:
    mode = symbolic_mode(gm) or FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, Any] = {}

    def load(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in gm.graph.nodes:
        old = node.meta.get("val")
        if node.op == "placeholder":
            if old is None and not _none_input(node):
                raise VerificationError(f"{who}: input %{node.name} has no recorded type")
            env[node] = old if getattr(old, "fake_mode", None) is mode else _fake_of(mode, old)
            continue
        if node.op == "output":
            continue
        if node.op == "get_attr":
            new = _fake_of(mode, peek_attr(gm, node.target))  # a pending weight's placeholder will do
        else:
            fn = node.target
            if node.op == "call_module":
                fn = gm.get_submodule(node.target)
            elif node.op == "call_method":
                def fn(self, *args, _name=node.target, **kwargs):
                    return getattr(self, _name)(*args, **kwargs)
            try:
                with running_fake(mode):
                    new = fn(*load(node.args), **load(node.kwargs))
            except Exception as e:  # noqa: BLE001
                if check and not node.meta.get("fxcc_eager") and _has_shape_function(node.target, e):
                    raise VerificationError(f"{who}: %{node.name} = {op_name(node.target)} fails on its "
                                            f"operands: {type(e).__name__}: {e}") from e
                _mark_opaque(node, e)
                env[node] = _refake(mode, old)
                continue
        env[node] = new
        _record(node, old, new, check, who)
    if check:
        gm.graph.lint()


def _none_input(node: fx.Node) -> bool:
    """An input the call passes as None (export records its value as None): only None flows from it."""
    return "val" in node.meta and all(u.op == "output" for u in node.users)


def symbolic_mode(gm: fx.GraphModule) -> FakeTensorMode | None:
    """The FakeTensorMode of a graph with symbolic input sizes (its symbols live in that mode's ShapeEnv),
    so values propagated through it stay in terms of the same symbols; None for a static graph."""
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and any(is_symbolic(d) for d in v.shape):
            return v.fake_mode
    return None


def _has_shape_function(target: Any, e: Exception) -> bool:
    """Whether a FakeTensor failure of `target` is a shape error, not a missing fake kernel.

    aten/prims ops and fxcc's dialects always have one; a user's op or Python call may have none.
    """
    if isinstance(e, (UnsupportedOperatorException, DynamicOutputShapeException, DataDependentOutputException)):
        return False
    return isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims", "fxcc_tx",
                                                                               "fxcc_kernel")


def _refake(mode: FakeTensorMode, old: Any) -> Any:
    if isinstance(old, (list, tuple)):
        return type(old)(_refake(mode, o) for o in old)
    return _fake_of(mode, old)


def _mark_opaque(node: fx.Node, e: Exception) -> None:
    node.meta.setdefault("fxcc_eager", f"no shape function ({type(e).__name__})")


def _same_type(a: Any, b: Any) -> bool:
    """Same shapes, dtypes and devices; a data-dependent size counts as equal to any it cannot be told apart
    from (re-running the op that makes it gives a fresh symbol)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dim() == b.dim() and all(guard_or_true(m == n) for m, n in zip(a.shape, b.shape))
                and a.dtype == b.dtype and a.device == b.device)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_type(x, y) for x, y in zip(a, b))
    return type(a) is type(b) or not isinstance(a, torch.Tensor)


def _dialect_op(node: fx.Node) -> bool:
    """tx and kernel ops: their recorded layout is a contract (a kernel's outputs have the strides its
    body computes, which backends keep); aten ops may change layouts freely as passes rewrite them."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace in ("fxcc_tx", "fxcc_kernel")


def _strides(val: Any) -> Any:
    """Strides where they matter (dimensions of size above 1, or that may be: a data-dependent size), for
    comparing layouts."""
    if isinstance(val, torch.Tensor):
        return tuple(s if guard_or_true(n > 1) else None for n, s in zip(val.shape, val.stride()))
    if isinstance(val, (list, tuple)):
        return tuple(_strides(v) for v in val)
    return None


def _same_strides(a: Any, b: Any, unknown: bool) -> bool:
    """Whether the layouts `_strides` gave are equal; `unknown` where that depends on a data-dependent size
    (guarding on one fails: its value is known only when the graph runs)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_strides(x, y, unknown) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    guard = guard_or_true if unknown else guard_or_false
    return guard(a == b)


def _record(node: fx.Node, old: Any, new: Any, check: bool, who: str) -> None:
    if check and old is not None and not _same_type(old, new):
        raise VerificationError(f"{who}: %{node.name} = {op_name(node.target)} is recorded as {type_str(old)} "
                                f"but computes {type_str(new)}")
    if check and old is not None and _dialect_op(node) and not _same_strides(_strides(old), _strides(new), True):
        raise VerificationError(f"{who}: %{node.name} = {op_name(node.target)} is recorded with strides "
                                f"{_strides(old)} but computes {_strides(new)}: the views after it were "
                                "checked against a layout it does not produce")
    node.meta["val"] = new


def layout_breaks(node: fx.Node, new: Any) -> str | None:
    """Why `node` computing `new` (its recorded shape, another layout) would break a node after it: a `view`
    that cannot view the new strides, or an op that reads strides; None when every node it reaches computes.
    Nodes whose layout does not change end the walk: what follows them sees what it was traced with."""
    graph = node.graph
    mode = symbolic_mode(node.graph.owning_module) or FakeTensorMode(allow_non_fake_inputs=True)
    order = {n: i for i, n in enumerate(graph.nodes)}
    env: dict[fx.Node, Any] = {node: _refake(mode, new)}
    todo = dict.fromkeys(node.users)

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n] if n in env else _refake(mode, n.meta.get("val")))

    while todo:
        n = min(todo, key=order.__getitem__)
        del todo[n]
        if n.op != "call_function":
            continue
        if n.target in (torch.ops.aten.as_strided.default, torch.ops.aten.sym_stride.int):
            return f"%{n.name} = {op_name(n.target)} reads its operand's strides"
        try:
            with running_fake(mode):
                out = n.target(*load(n.args), **load(n.kwargs))
        except Exception as e:  # noqa: BLE001 - any failure is a break
            return f"%{n.name} = {op_name(n.target)} fails on the new layout: {type(e).__name__}: {e}"
        if not _same_strides(_strides(out), _strides(n.meta.get("val")), False):  # may differ: walk on
            env[n] = out
            todo.update(dict.fromkeys(n.users))
    return None


_data_address = torch._C._data_address  # the storage's data pointer, read without asking for write access
_SOURCES = "_fxcc_sources"  # on a constant a pass computed: weak references to the tensors it was computed from


def computed_from(value: torch.Tensor, *sources: Any) -> torch.Tensor:
    """Mark `value`, a constant a pass computes from other tensors (a folded subgraph, merged or quantized
    weights, a shard), with the model tensors it was computed from, and return it. A source that was itself
    computed passes on its own sources. The runtime watches them (fxcc.watch): a change to any of them,
    through `.data` too, makes the constant stale and the model is compiled again."""
    if any(s is value for s in sources):
        return value  # not computed: the tensor itself
    refs: dict[int, weakref.ref] = {}
    for s in sources:
        if not isinstance(s, torch.Tensor):
            continue
        inner = sources_of(s)
        for r in ([weakref.ref(s)] if inner is None else inner):
            if r() is not None:
                refs[id(r())] = r
    setattr(value, _SOURCES, tuple(refs.values()))
    return value


_PARTS = "_fxcc_parts"  # on a constant that is the rows of other tensors in one storage: those tensors (weakly)
_IN = "_fxcc_in_storage"  # on a tensor concat_rows made a view: the storage it put it in


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The 2-D (or 1-D) tensors `parts` concatenated along dim 0, held once: one storage that `parts` become
    views into (their `.data` rebound to rows of it), so the model's tensors and the concatenation a pass
    made of them (merged Q/K/V) are the same memory, and an in-place write to a part shows in the whole.

    Parts already adjacent in one storage (concatenated by an earlier compile) give a view of it, no copy.
    A part that cannot be rebound safely (its storage is shared with other tensors, an inference tensor,
    a tensor subclass) leaves a plain copy, as `torch.cat` would make. The result is marked
    `computed_from(parts)`, so the runtime still watches the parts for writes and swapped storage."""
    # not an inference tensor even when compiled under inference_mode: the parts' `.data` become views of it,
    # and the caller may update its weights outside inference_mode later
    with torch.no_grad(), torch.inference_mode(False):
        whole = _adjacent(parts)
        if whole is None:
            whole = torch.cat([p.detach() for p in parts])
            if all(map(_rebindable, parts)):
                start = 0
                for p in parts:
                    p.data = whole[start:start + p.shape[0]]
                    start += p.shape[0]
                    setattr(p, _IN, whole.untyped_storage()._cdata)
                setattr(whole, _PARTS, tuple(weakref.ref(p) for p in parts))
        else:
            setattr(whole, _PARTS, tuple(weakref.ref(p) for p in parts))
    return computed_from(whole, *parts)


def parts_of(value: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors `value` is the concatenation of, sharing its memory (concat_rows); None if it is not one."""
    refs = getattr(value, _PARTS, None)
    if refs is None:
        return None
    parts = [r() for r in refs]
    return parts if all(p is not None for p in parts) and _adjacent(parts) is not None else None


def _adjacent(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """A view over the storage of `parts` that is their concatenation along dim 0, when they lie in it that way."""
    first = parts[0]
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) or not p.is_contiguous() or p.dtype != first.dtype
           or p.device != first.device or p.shape[1:] != first.shape[1:] or p.is_inference() for p in parts):
        return None
    storage, at = first.untyped_storage(), first.storage_offset()
    for p in parts:
        if p.untyped_storage()._cdata != storage._cdata or p.storage_offset() != at:
            return None
        at += p.numel()
    rows = sum(p.shape[0] for p in parts)
    whole = torch.empty(0, dtype=first.dtype, device=first.device)
    whole.set_(storage, first.storage_offset(), (rows, *first.shape[1:]), first.stride())
    return whole


def _rebindable(t: torch.Tensor) -> bool:
    """Whether `t.data` may move to another storage: a plain, contiguous tensor alone in its storage (no view of
    it elsewhere would lose its aliasing), or still in the storage an earlier concat_rows put it in (the
    aliasing there is fxcc's own, as when one of its neighbours was given other memory since)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_inference() or not t.is_contiguous():
        return False
    storage = t.untyped_storage()
    return getattr(t, _IN, None) == storage._cdata or (
        t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        and torch._C._storage_Use_Count(storage._cdata) <= 2)


def sources_of(value: torch.Tensor) -> tuple[weakref.ref, ...] | None:
    """What `computed_from` recorded for `value` (weak references), or None when it was not computed by a pass
    (a tensor of the model, or a constant of unknown origin)."""
    return getattr(value, _SOURCES, None)


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    """The value a get_attr node names ("layers.0.weight"): what the graph holds as a parameter or constant.
    A weight still in its checkpoint (`pending`) is loaded whole now, and the graph holds it from then on."""
    value = peek_attr(gm, target)
    if isinstance(value, torch.Tensor) and hasattr(value, _PENDING):
        stub = value
        value = getattr(stub, _LOADED, None)  # a tied weight another target loaded already
        if value is None:
            source, name = getattr(stub, _PENDING)
            value = computed_from(_like(source.full(name), stub))  # read from the checkpoint: nothing the user
            # can change
            setattr(stub, _LOADED, value)
        set_attr(gm, target, value)
    return value


def peek_attr(gm: fx.GraphModule, target: str) -> Any:
    """What the graph holds at `target`, a weight still in its checkpoint (`pending`) left there unread."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Bind `value` at `target` (a dotted attribute path of `gm`) as a non-persistent buffer, replacing what was
    there."""
    owner, _, name = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    mod._parameters.pop(name, None)
    mod._buffers.pop(name, None)
    mod.register_buffer(name, value, persistent=False)


# ------------------------------------------------------------------------------ weights loaded on first read

_PENDING = "_fxcc_pending"  # on a placeholder weight: (source, checkpoint name) of the values it stands for
_LOADED = "_fxcc_loaded"  # on a placeholder weight: what it was loaded as (tied weights are loaded once)


def pending(stub: torch.Tensor, source: Any, name: str) -> torch.Tensor:
    """Mark `stub` (a tensor of the weight's shape, dtype and device whose values are not read yet) as tensor
    `name` of checkpoint `source`, read when a pass first asks for it: `fetch_attr` loads it whole,
    `fetch_rows` only the rows a shard needs. `source` has `full(name)` and `rows(name, dim, spans)`."""
    setattr(stub, _PENDING, (source, name))
    return stub


def _like(t: torch.Tensor, stub: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor in the dtype and on the device of the model's (as load_state_dict copies it)."""
    with torch.no_grad():
        return t.to(device=stub.device, dtype=stub.dtype)


def is_pending(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, _PENDING)


def fetch_rows(gm: fx.GraphModule, target: str, dim: int, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, list]:
    """The pieces `narrow(dim, start, length)` for each (start, length) of `spans` of the constant at `target`,
    concatenated along `dim` in a tensor of its own, and the tensors it was computed from (for `computed_from`).
    A weight still in its checkpoint (`pending`) is read piece by piece: the whole is never in memory."""
    value = peek_attr(gm, target)
    if is_pending(value):
        source, name = getattr(value, _PENDING)
        return _like(source.rows(name, dim, spans), value), []
    return torch.cat([value.detach().narrow(dim, s, n) for s, n in spans], dim).contiguous(), [value]


def load_pending(gm: fx.GraphModule) -> int:
    """Load every weight the graph reads and has not loaded yet (norms, embeddings: replicated under tp-shard);
    returns how many. Weights no node reads any more (the full weights of shards) are never loaded."""
    done = 0
    for n in gm.graph.nodes:
        if n.op == "get_attr" and is_pending(peek_attr(gm, n.target)):
            fetch_attr(gm, n.target)
            done += 1
    return done


def constant_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the tensors the graph reads as constants, each storage once; a weight still in its checkpoint
    counts what loading it would take (it is not loaded to count it)."""
    seen: dict[Any, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = peek_attr(gm, str(n.target))
            if is_pending(t):
                seen[("pending", id(t))] = t.numel() * t.element_size()
            elif isinstance(t, torch.Tensor) and t.device.type != "meta":
                seen[_data_address(t) - t.storage_offset() * t.element_size()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Remove the get_attrs no node reads any more and every tensor attribute no get_attr names (weights a pass
    replaced by merged, quantized or sharded ones, whose nodes dead-code elimination may have removed already),
    so the graph keeps no reference to the weights they came from."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(node)
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for path, mod in list(gm.named_modules()):
        at = f"{path}." if path else ""
        for name in [k for k, v in {**mod._parameters, **mod._buffers, **vars(mod)}.items()
                     if isinstance(v, torch.Tensor) and at + k not in read]:
            delattr(mod, name)


def output_types(gm: fx.GraphModule) -> list[str]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    vals = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    return [type_str(v.meta.get("val")) if isinstance(v, fx.Node) else type_str(v) for v in vals]


def verify(gm: fx.GraphModule, expected_outputs: list[str] | None = None, who: str = "verify") -> None:
    """Re-propagate shapes/dtypes with FakeTensors, check them against node metadata and the signature."""
    propagate(gm, check=True, who=who)
    if expected_outputs is not None:
        got = output_types(gm)
        if got != expected_outputs:
            raise VerificationError(f"{who}: graph outputs changed from {expected_outputs} to {got}")


def is_view(node: fx.Node) -> bool:
    """Whether a node's value may share memory with its first input (a view, `to` of the same type)."""
    t = node.target
    return (t is operator.getitem or
            (isinstance(t, torch._ops.OpOverload) and (torch.Tag.view_copy in t.tags or
                                                      any(a.alias_info for a in t._schema.returns))))


# why fuse keeps an op eager when its memory is written: a device op like any kernel (a CUDA graph may hold it)
EAGER_WRITTEN = "its memory is written in place (a kernel output may be a copy)"


def written_in_place(gm: fx.GraphModule) -> set[fx.Node]:
    """Values some op of the graph writes to in place (its schema marks the argument written), and the
    values those are views of. Such a value is a buffer of its own: not merged with an equal one (a KV
    cache's keys and values start as two equal `zeros`), not folded, not recomputed into a kernel's copy."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            for i, a in enumerate(n.target._schema.arguments):
                if a.alias_info is None or not a.alias_info.is_write:
                    continue
                given = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                for v in given if isinstance(given, (list, tuple)) else (given,):  # a foreach op writes a list
                    while isinstance(v, fx.Node) and v not in out:
                        out.add(v)
                        v = v.args[0] if v.op == "call_function" and is_view(v) and v.args else None
    return out


def written_sharing(flat: list[Any], written: tuple[int, ...]) -> tuple[int, int] | None:
    """(i, j) where flat input i, which a graph writes in place, shares memory with tensor input j (the same tensor
    passed twice, overlapping views of one); None where each written input's memory is its own. The passes take
    distinct graph inputs as distinct memory (CSE merges two reads of one input around a write of another; the
    horizontal pass moves a write past reads of other inputs), so a call where they are not runs eagerly. Views of
    one storage whose spans do not meet (a cache per layer sliced from one tensor) are distinct."""
    # the address of each tensor's storage (another number for anything else), read without asking for a writable
    # pointer (that gives a copy-on-write snapshot's tensor a copy of itself): most calls have no two alike
    at = [_data_address(x) if isinstance(x, torch.Tensor) else -1 - j for j, x in enumerate(flat)]
    if len(set(at)) == len(at):
        return None
    mine = set(written)
    for a in {at[i] for i in written}:
        # the spans (first byte, byte after the last, input) over this storage, in order: a run of spans that meet
        # holding a written input and another is the answer
        spans = []
        for j in (j for j, b in enumerate(at) if b == a):
            t = flat[j]
            lo = a + t.storage_offset() * t.element_size()
            spans.append((lo, lo + extent(t.shape, t.stride()) * t.element_size(), j))
        spans.sort()
        run, end = [], 0
        for lo, hi, j in spans:
            if hi == lo:  # no elements: no memory
                continue
            if run and lo >= end:
                run = []
            run.append((lo, hi, j))
            end = max(end, hi)
            if len(run) > 1 and (j in mine or mine.intersection(k for _, _, k in run)):
                i = j if j in mine else next(k for _, _, k in run if k in mine)
                a_lo, a_hi = next((lo_, hi_) for lo_, hi_, k in run if k == i)
                return i, next(k for lo_, hi_, k in run if k != i and lo_ < a_hi and a_lo < hi_)
    return None
