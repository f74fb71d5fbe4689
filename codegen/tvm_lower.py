"""Lowering of a kernel body (aten/tx ops) to TVM tensor expressions, and its parameterised schedule.

Values are lazy: a `Val` is a shape plus a function from an index to a TIR expression, so pointwise
chains, broadcasts and views compose into one expression and cost no memory. Only what needs a
buffer becomes a stage: reductions (norm statistics, softmax max/sum, sums), GEMMs and the outputs.
Inputs are read through their strides from a flat buffer over their storage (views cost no copy);
outputs are written in the physical order of the strides the graph expects. A linear's weight is the
exception: the kernel reads it packed into panels of `tn` output columns ([N/tn, K, tn], made once per
weight by the caller, again when it changes), so the GEMM's vector loads along n are contiguous. With `lanes`, the
kernel instead reads the weight as it is and packs the activation, in a stage of its own at every call, into panels
of `lanes` rows ([M/lanes, K, lanes]): the GEMM's vectors then run along the rows and each weight element is
broadcast, the panel GEMM with its operands' roles swapped, and no copy of the weight is kept.

Sizes may be symbolic (a variant compiled with dynamic shapes): each symbol of the body is an int64 argument of
the PrimFunc (`sym0`, `sym1`, ...: the size arguments of fxcc.codegen.triton_gen, read by the caller from its
inputs' sizes at each call), and shapes, strides and flat extents are expressions of them. Ops whose handler is
marked `symbolic` take such sizes where they are outer (rows); a reduced, rotated, sliced or selected dim must
be static, and everything else raises Unsupported for a symbolic node (the kernel stays with another backend).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
import tvm
import tvm_ffi
from fxcc import gather, ir
from fxcc.codegen import triton_gen as tg
from fxcc.codegen import tvm as tvm_codegen
from fxcc.codegen.tvm import packable, split_bias, weight_first_strides
from fxcc.dialects import classify, dense_order
from tvm import s_tir, te, tirx
from tvm.tirx import stmt as S

aten = torch.ops.aten
tx = torch.ops.fxcc_tx

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
          torch.int32: "int32", torch.bool: "bool", torch.float64: "float64"}


# ops (views free) in an expression read more than once above which the value is stored, not rebuilt (Lowering._bound)
REUSE_SIZE = 8


class Unsupported(Exception):
    """The body holds something this lowering does not handle; the kernel stays with another backend."""


Size = int | tvm.ir.expr.Expr  # static, or an expression of the kernel's size arguments (int64 TIR variables)
SymSize = int | sympy.Expr  # the same as sympy expressions of the size arguments, as specs record them


@dataclass
class Val:
    shape: tuple[Size, ...]
    dtype: str
    at: Callable[[Sequence], tirx.PrimExpr]


@dataclass
class Stage:
    tensor: te.Tensor
    role: str  # reduction | gemm | rowpack | ...
    lanes: int = 0  # a GEMM reading its activation from row panels of this many rows (its vector lanes)


@dataclass
class InputSpec:
    shape: tuple[SymSize, ...]
    stride: tuple[SymSize, ...]
    extent: SymSize  # elements of the flat buffer the kernel reads (storage offset excluded)
    dtype: torch.dtype
    pack: int = 0  # > 0: a [N, K] weight the caller passes packed as [N/pack, K, pack] (see the module doc)


@dataclass
class OutputSpec:
    shape: tuple[SymSize, ...]
    stride: tuple[SymSize, ...]  # the strides the graph expects; the kernel writes in this physical order
    order: tuple[int, ...]  # logical dims, outermost first in memory
    dtype: torch.dtype


@dataclass
class Lowered:
    args: list[te.Tensor]
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    stages: list[Stage] = field(default_factory=list)
    out_tensors: list[te.Tensor] = field(default_factory=list)
    sizes: list[tuple[str, int, int]] = field(default_factory=list)  # size arguments: (name, input, dim)
    vars: list[tirx.Var] = field(default_factory=list)  # their TIR variables, the PrimFunc's last arguments


def const(v, dtype: str) -> tirx.PrimExpr:
    return tirx.const(v, dtype)


def dt(e) -> str:
    """The element type of a TIR expression (or of a TE tensor)."""
    return str(e.dtype) if isinstance(e, te.Tensor) else str(e.ty.dtype)


def cast(e: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    return e if dt(e) == dtype else e.astype(dtype)


# --- max and min as torch's: NaN wins ------------------------------------------------------------------------
# tirx.max/min of floats become a compare and select that returns the other operand for a NaN (relu(NaN) = 0,
# clamp(NaN) = a bound, amax over a NaN = the largest number); torch gives NaN.
def _floating(e) -> bool:
    return "float" in dt(e)


def _select_nan(a, b, a_wins: Callable):
    """`a` where `a_wins(a, b)` or `a` is NaN, else `b` (also where `b` is NaN); `b` may be a constant."""
    if isinstance(b, tirx.FloatImm) and not math.isnan(b.value):
        return let(a, lambda a: tirx.Select(a_wins(b, a), b, a))  # a NaN `a`: the compare is false, `a` stays
    return let(a, lambda a: let(b, lambda b: tirx.Select(tirx.Or(a_wins(b, a), tirx.isnan(b)), b, a)))


def nan_max(a, b):
    if isinstance(a, tirx.FloatImm):
        a, b = b, a
    return _select_nan(a, b, operator.gt) if _floating(a) else tirx.max(a, b)


def nan_min(a, b):
    if isinstance(a, tirx.FloatImm):
        a, b = b, a
    return _select_nan(a, b, operator.lt) if _floating(a) else tirx.min(a, b)


def _reducer(plain: Callable, start: float, integer: Callable) -> Callable:
    """A max/min reduction that keeps NaN, starting from -inf/inf (a float reduction of -inf values gives -inf,
    not the lowest finite number); integer reductions start from the type's own bound. The combiner reads the
    new value `y` once (TVM substitutes the reduced expression, Lets and all, for it): a NaN accumulator stays,
    and max/min (a compare and select) takes a NaN `y`."""
    def combine(x, y):
        return tirx.Select(tirx.isnan(x), x, plain(x, y)) if _floating(x) else plain(x, y)
    return te.comm_reducer(combine, lambda t: const(start, t) if "float" in str(t) else integer(t))


NAN_MAX = _reducer(tirx.max, float("-inf"), tirx.min_value)
NAN_MIN = _reducer(tirx.min, float("inf"), tirx.max_value)


# --- fast, vectorisable transcendental functions (fp32-accurate) --------------------------------------------
# erf: the rational approximation Eigen and XLA use (|x| clamped to 4, where erf(x) is +-1 in fp32)
_ERF_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)
# exp: Cephes' expf polynomial after reduction x = n ln2 + r
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def let(value, body: Callable):
    """`body(v)` with `v` bound once to `value`, so an expression used several times is computed once."""
    if isinstance(value, (tirx.Var, tirx.IntImm, tirx.FloatImm)):
        return body(value)
    v = tirx.Var("t", dt(value))
    return tirx.Let(v, value, body(v))


def _poly(x, coeffs, dtype):
    p = const(coeffs[0], dtype)
    for c in coeffs[1:]:
        p = p * x + const(c, dtype)
    return p


def fast_erf(x):
    d = dt(x)

    def clamped(x):
        return let(x * x, lambda x2: x * _poly(x2, _ERF_A, d) / _poly(x2, _ERF_B, d))
    # NaN stays NaN (the clamp alone would make it 4: erf 1)
    return let(x, lambda x: tirx.Select(tirx.isnan(x), x, let(tirx.max(tirx.min(x, const(4.0, d)), const(-4.0, d)),
                                                               clamped)))


def fast_exp(x):
    """exp(x) in fp32 to ~1 ulp; vectorises (the power of two is built from the exponent bits)."""
    d = dt(x)
    if d != "float32":
        return cast(fast_exp(cast(x, "float32")), d)

    def with_x(x):
        return let(tirx.floor(x * const(1.44269504088896341, d) + const(0.5, d)), lambda n: let(
            x - n * const(0.693359375, d) - n * const(-2.12194440e-4, d), lambda r: (
                _poly(r, _EXP_P, d) * r * r + r + const(1.0, d)) * tirx.reinterpret(
                "float32", tirx.shift_left(n.astype("int32") + const(127, "int32"), const(23, "int32")))))
    # below -87.3 the true value is under fp32's smallest normal: 0; above 88.7 it overflows: inf; NaN stays NaN
    # (the clamp alone would turn -inf into 1e-38, inf into 3e38 and NaN into a number)
    return let(x, lambda x: tirx.Select(tirx.isnan(x), x, tirx.Select(
        x < const(-87.3, d), const(0.0, d), tirx.Select(x > const(88.7, d), const(float("inf"), d), let(
            tirx.max(tirx.min(x, const(88.7, d)), const(-87.3, d)), with_x)))))


def fast_tanh(x):
    d = dt(x)
    return const(1.0, d) - const(2.0, d) / (fast_exp(x * const(2.0, d)) + const(1.0, d))


def sigmoid(x):
    return const(1.0, dt(x)) / (const(1.0, dt(x)) + fast_exp(-x))


def gelu(x, approximate: str = "none"):
    return let(x, lambda x: _gelu(x, approximate))


def _gelu(x, approximate: str):
    d = dt(x)
    if approximate == "tanh":
        inner = const(math.sqrt(2 / math.pi), d) * (x + const(0.044715, d) * x * x * x)
        return const(0.5, d) * x * (const(1.0, d) + fast_tanh(inner))
    return const(0.5, d) * x * (const(1.0, d) + fast_erf(x * const(1 / math.sqrt(2), d)))


def act(name: str, x):
    if name == "silu":
        return let(x, lambda x: x * sigmoid(x))
    if name in ("gelu", "gelu_tanh"):
        return gelu(x, "tanh" if name == "gelu_tanh" else "none")
    raise Unsupported(f"activation {name}")


# --- index helpers --------------------------------------------------------------------------------------------
def one(n: Size) -> bool:
    """Whether a size is a static 1 (a symbolic size is never taken for a broadcast: export unified it)."""
    return isinstance(n, int) and n == 1


def static(n: Size, what: str) -> int:
    """A size that must be static here; Unsupported names `what` when it is symbolic."""
    if not isinstance(n, int):
        raise Unsupported(f"{what} has a symbolic size ({n})")
    return n


def broadcast(v: Val, shape: tuple[Size, ...]) -> Callable[[Sequence], tirx.PrimExpr]:
    off = len(shape) - len(v.shape)

    def at(idx):
        return v.at([const(0, "int32") if one(n) else idx[off + i] for i, n in enumerate(v.shape)])
    return at


def delinearize(flat, shape: tuple[Size, ...]) -> list:
    out = []
    for n in reversed(shape):
        out.append(tirx.floormod(flat, n) if not one(n) else const(0, "int32"))
        flat = tirx.floordiv(flat, n)
    return list(reversed(out))


def linearize(idx, shape: tuple[Size, ...]):
    flat = const(0, "int32")
    for i, n in zip(idx, shape):
        flat = flat * n + i
    return flat


_VARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def size_vars(graph: fx.Graph) -> dict[str, tirx.Var]:
    """The body's size arguments (fxcc.codegen.triton_gen.size_args) as int64 TIR variables, by name."""
    if graph not in _VARS:
        _VARS[graph] = {name: tirx.Var(name, "int64") for name, _, _ in _size_args(graph)}
    return _VARS[graph]


def _size_args(graph: fx.Graph) -> list[tuple[str, int, int]]:
    try:
        return tg.size_args(graph.owning_module)
    except tg.Unsupported as e:
        raise Unsupported(str(e)) from None


def sym_sizes(values, graph: fx.Graph) -> tuple[SymSize, ...]:
    """Sizes (a shape, strides) as ints and sympy expressions of the size arguments."""
    try:
        return tuple(int(e) if isinstance(e, int) or e.is_Integer else e for e in tg.sizes_of(values, graph))
    except tg.Unsupported as e:
        raise Unsupported(str(e)) from None


def tir_size(e: SymSize, graph: fx.Graph) -> Size:
    """A size as TIR: an int, or an int64 expression of the size variables (sums and products of them)."""
    if isinstance(e, int):
        return e
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        return size_vars(graph)[str(e)]
    if e.is_Add or e.is_Mul:
        terms = [tir_size(a, graph) for a in e.args]
        out = terms[0]
        for t in terms[1:]:
            out = out + t if e.is_Add else out * t
        return out if isinstance(out, tvm.ir.expr.Expr) else int(out)
    raise Unsupported(f"size {e} is not a sum of products of the input sizes")


def _sizes(values, graph: fx.Graph) -> tuple[Size, ...]:
    return tuple(tir_size(e, graph) for e in sym_sizes(values, graph))


def _shape(node: fx.Node) -> tuple[Size, ...]:
    return _sizes(node.meta["val"].shape, node.graph)


def _symbolic(node: fx.Node) -> bool:
    """Whether a node reads or makes a tensor of symbolic sizes, or takes a symbolic scalar argument."""
    vals = [node.meta.get("val"), *(a.meta.get("val") for a in node.all_input_nodes)]
    if any(ir.is_symbolic(d) for v in vals if isinstance(v, torch.Tensor) for d in (*v.shape, *v.stride())):
        return True
    return any(isinstance(a, torch.SymInt) for a in _flat(node.args, node.kwargs))


def _sym_extent(shape: tuple[SymSize, ...], stride: tuple[SymSize, ...]) -> SymSize:
    """Elements of the flat buffer a tensor spans (ir.extent), for symbolic sizes too (taken to be at least 1)."""
    if all(isinstance(n, int) for n in (*shape, *stride)):
        return ir.extent(shape, stride)
    e = sympy.expand(1 + sum((n - 1) * s for n, s in zip(shape, stride)))
    return int(e) if e.is_Integer else e


def _contiguous(shape: tuple[SymSize, ...]) -> tuple[SymSize, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step = sympy.expand(step * n) if not isinstance(n, int) or not isinstance(step, int) else step * max(n, 1)
    return tuple(reversed(out))


def _dtype(node: fx.Node) -> str:
    dt = node.meta["val"].dtype
    if dt not in DTYPES:
        raise Unsupported(f"dtype {dt}")
    return DTYPES[dt]


# --- the lowering -------------------------------------------------------------------------------------------
class Lowering:
    """Walks a kernel body and builds its TE; `split` (a GEMM node) becomes an input computed elsewhere."""

    def __init__(self, body: fx.GraphModule, split: fx.Node | None = None, vec: int = 8, tile_n: int = 0,
                 weight_first: bool = False, lanes: int = 0):
        self.body = body
        self.weight_first = weight_first  # `split` is read as `weight @ input.T` leaves it (tvm.weight_first_strides)
        self.vec = vec
        self.tile_n = tile_n  # > 0: linear weights are read packed in panels of this many columns (fitted to N)
        self.lanes = lanes  # > 0: linear weights are read as they are, activations packed in panels of these many rows
        self.split = split
        self.env: dict[fx.Node, Val] = {}
        self.out = Lowered([], [], [])
        self.n_stage = 0
        self.size: dict[fx.Node, int] = {}  # ops in each value's expression, counting repeats (see _bound)
        self.early: dict[int, tuple[te.Tensor, OutputSpec]] = {}  # outputs stored before the end, by position

    def run(self) -> Lowered:
        nodes = list(self.body.graph.nodes)
        needed = tvm_codegen.needed(nodes, self.split)
        packed = {n.args[1] for n in nodes if n in needed and packable(n)} if self.tile_n else set()
        outs = next(n for n in nodes if n.op == "output").args[0]
        uses = _uses(nodes, needed)
        if any(_symbolic(n) for n in nodes if n in needed):
            self.out.sizes = _size_args(self.body.graph)
            self.out.vars = [size_vars(self.body.graph)[name] for name, _, _ in self.out.sizes]
        for node in nodes:
            if node.op == "placeholder" or node is self.split:
                if node in needed:
                    self.env[node] = self._input(node, node in packed)
                if node is self.split and split_bias(node) is not None:  # the library GEMM runs without it
                    self.env[node] = _plus_bias(self.env[node], self.env[split_bias(node)])
            elif node.op == "call_function":
                if node in needed:
                    self.env[node] = self._op(node)
                    self._bound(node, uses.get(node, 0), outs)
            elif node.op == "output":
                self._outputs(outs)
            else:
                raise Unsupported(f"{node.op} {node.target}")
        return self.out

    def _bound(self, node: fx.Node, uses: int, outs) -> None:
        """Store `node` once computed when its expression is large and read more than once: a value is an
        expression rebuilt at every use, so a chain of such reuses (an unrolled scan, where(x > 0, x, ...)
        repeated) grows exponentially, and TVM's simplifier with it. An output is read back from its own
        buffer; any other value becomes a stage."""
        args = [a for a in _flat(node.args, node.kwargs) if isinstance(a, fx.Node) and a in self.size]
        own = 0 if classify(node)[0] == "view" else 1
        self.size[node] = own + sum(self.size[a] for a in args)
        if uses < 2 or self.size[node] <= REUSE_SIZE:
            return
        val = self.env[node]
        if node in outs:  # stored at its first place among the outputs, read back from there
            self.env[node] = self._output(node, outs.index(node))
        else:
            self.env[node] = self.stage(val.shape, lambda *i: val.at(i), "value")
        self.size[node] = 1

    def _input(self, node: fx.Node, packed: bool = False) -> Val:
        v = node.meta["val"]
        if v.dtype not in DTYPES:
            raise Unsupported(f"input dtype {v.dtype}")
        graph = self.body.graph
        if packed:
            return self._packed_input(_shape(node), v.dtype)
        shape, stride = sym_sizes(v.shape, graph), sym_sizes(v.stride(), graph)
        if node is self.split and self.weight_first:
            stride = weight_first_strides(tuple(int(d) for d in shape))
        extent = _sym_extent(shape, stride)
        ity = "int32" if isinstance(extent, int) and extent < 2**31 else "int64"
        buf = te.placeholder((tir_size(extent, graph),), DTYPES[v.dtype], name=f"in{len(self.out.args)}")
        self.out.args.append(buf)
        self.out.inputs.append(InputSpec(shape, stride, extent, v.dtype))
        tshape, tstride = tuple(tir_size(n, graph) for n in shape), tuple(tir_size(n, graph) for n in stride)

        def at(idx):
            flat = const(0, ity)
            for i, s, n in zip(idx, tstride, tshape):
                if not one(n) and not (isinstance(s, int) and s == 0):
                    flat = flat + cast(i, ity) * (cast(s, ity) if isinstance(s, tvm.ir.expr.Expr) else s)
            return buf(flat)
        return Val(tshape, DTYPES[v.dtype], at)

    def _packed_input(self, shape: tuple[int, ...], dtype: torch.dtype) -> Val:
        """A [N, K] weight read from its [N/tn, K, tn] panels: element (n, k) at (n // tn, k, n % tn)."""
        n_out, k_in = shape
        tn = _fit(n_out, self.tile_n)
        buf = te.placeholder((n_out * k_in,), DTYPES[dtype], name=f"in{len(self.out.args)}")
        self.out.args.append(buf)
        self.out.inputs.append(InputSpec(shape, (k_in, 1), n_out * k_in, dtype, pack=tn))

        def at(idx):
            n, k = (cast(i, "int32") for i in idx)
            return buf(tirx.floordiv(n, tn) * (k_in * tn) + k * tn + tirx.floormod(n, tn))
        return Val(shape, DTYPES[dtype], at)

    def _outputs(self, outs) -> None:
        for i, node in enumerate(outs):
            if i not in self.early:
                self._store(node, self.env[node], i)
            t, spec = self.early[i]
            self.out.out_tensors.append(t)
            self.out.outputs.append(spec)
        self.out.args.extend(self.out.out_tensors)

    def _output(self, node: fx.Node, i: int) -> Val:
        """Store output `i` (`node`) now; the value, read back from the output's buffer."""
        t, spec = self._store(node, self.env[node], i)
        return Val(_shape(node), dt(t), lambda idx: t(*[idx[d] for d in spec.order]))

    def _store(self, node: fx.Node, val: Val, i: int) -> tuple[te.Tensor, OutputSpec]:
        v = node.meta["val"]
        graph = self.body.graph
        shape, stride = sym_sizes(v.shape, graph), sym_sizes(v.stride(), graph)
        order = dense_order(ir.hints(v.shape), ir.hints(v.stride()))
        if order is not None and not all(isinstance(n, int) for n in (*shape, *stride)):
            dense = dict(zip(order, _contiguous(tuple(shape[d] for d in order))))
            if any(sympy.expand(stride[d] - dense[d]) != 0 for d in order if not one(shape[d])):
                order = None  # dense at the example's sizes only
        if order is None:  # not a dense layout: write contiguous, the consumer re-strides
            order = tuple(range(len(shape)))
            stride = _contiguous(shape)
        phys = tuple(tir_size(shape[d], graph) for d in order)
        inv = [order.index(d) for d in range(len(shape))]
        t = te.compute(phys, _permuted(val, inv), name=f"out{i}")
        self.early[i] = (t, OutputSpec(shape, stride, order, v.dtype))
        return self.early[i]

    def stage(self, shape, fn, role: str, reduce_axes=None) -> Val:
        name = f"{role}{self.n_stage}"
        self.n_stage += 1
        t = te.compute(shape, fn, name=name)
        self.out.stages.append(Stage(t, role))
        return Val(tuple(shape), dt(t), lambda idx: t(*idx))

    def _op(self, node: fx.Node) -> Val:
        t = node.target
        handler = OPS.get(t)
        if handler is None:
            raise Unsupported(f"no TVM lowering for {t}")
        floats = [a for a in _flat(node.args, node.kwargs) if _symbolic_float(a)]
        if floats and (not getattr(handler, "elementwise", False) or any(map(_symbolic_float, _flat((), node.kwargs)))):
            raise Unsupported(f"{t} with a symbolic float argument")  # handlers that read a number as a constant
        if self.out.sizes and not getattr(handler, "symbolic", False) and _symbolic(node):
            raise Unsupported(f"{t} with symbolic sizes")
        if t in gather.OPS and not gather.generated(node):
            raise Unsupported(f"{t} with these arguments is left to the library")
        return handler(self, node, *node.args, **node.kwargs)

    def val(self, a) -> Val:
        v = self.env[a]
        if not isinstance(v, Val):  # a size (aten.sym_size) where a tensor is read
            raise Unsupported(f"{a} is a size, not a tensor")
        return v


def _uses(nodes: list[fx.Node], needed: set[fx.Node]) -> dict[fx.Node, int]:
    """How many times each value is read: by the ops that need it, an operand repeated counting each time,
    and by the output."""
    uses: dict[fx.Node, int] = {}
    for n in nodes:
        if n in needed or n.op == "output":
            for a in _flat(n.args, n.kwargs):
                if isinstance(a, fx.Node):
                    uses[a] = uses.get(a, 0) + 1
    return uses


def _flat(args, kwargs) -> list:
    out = []
    fx.node.map_aggregate((args, kwargs), out.append)
    return out


def _permuted(val: Val, inv: list[int]):
    def at(*p):
        return val.at([p[j] for j in inv])
    return at


def _plus_bias(v: Val, b: Val) -> Val:
    ba = broadcast(b, v.shape)
    return Val(v.shape, v.dtype, lambda i: v.at(i) + cast(ba(i), v.dtype))


# --- op handlers --------------------------------------------------------------------------------------------
OPS: dict = {}


def handles(*targets):
    def deco(fn):
        for t in targets:
            OPS[t] = fn
        return fn
    return deco


def _operand(L: Lowering, a, shape, dtype):
    if isinstance(a, fx.Node) and not isinstance(L.env[a], Val):  # a size read from an input: a scalar
        e = cast(tirx.IntImm("int64", L.env[a]) if isinstance(L.env[a], int) else L.env[a], dtype)
        return lambda idx: e
    if isinstance(a, fx.Node):
        v = L.val(a)
        at = broadcast(v, shape)
        return lambda idx: cast(at(idx), dtype)
    if isinstance(a, (bool, int, float)):
        c = const(a, dtype)
        return lambda idx: c
    raise Unsupported(f"operand {a!r}")


def pointwise(fn, compute: str | None = None):
    """Handler for an elementwise op: operands broadcast to the output shape and cast to the compute type."""
    def handler(L: Lowering, node: fx.Node, *args, **kwargs):
        shape, out_dt = _shape(node), _dtype(node)
        if compute == "inputs":  # comparisons: compute in the promoted type of the inputs
            dts = [a.meta["val"].dtype for a in args if isinstance(a, fx.Node) and isinstance(a.meta["val"], torch.Tensor)]
            dt = DTYPES[dts[0] if len(dts) == 1 else torch.promote_types(*dts[:2])]
        else:
            dt = out_dt
        if compute == "inputs" and not dt.startswith("float") and any(map(_symbolic_float, args)):
            raise Unsupported("an integer tensor compared with a symbolic float")  # eager compares as floats
        ops = [_operand(L, a, shape, dt) if isinstance(a, (fx.Node, bool, int, float)) else a for a in args]
        on = _arithmetic(dt)  # a bool operand is made a bool first (0.5 is True), then computed on as 0/1

        def at(idx):
            xs = [cast(o(idx), on) if callable(o) else o for o in ops]
            return cast(_let_all(xs, lambda vs: fn(*vs, **kwargs)), out_dt)
        return Val(shape, out_dt, at)
    handler.symbolic = True
    handler.elementwise = True  # an operand may be a symbolic float: read, as any operand, through _operand
    return handler


def _arithmetic(dtype: str) -> str:
    """The type to compute `dtype` in: bools as int8 0/1, since TVM's LLVM codegen builds no add, max or compare of
    bools (a failed check on the float type code); on 0/1, + and max are torch's `or`, * and min its `and`, and
    the cast back to bool is `!= 0`."""
    return "int8" if dtype == "bool" else dtype


def _symbolic_float(a) -> bool:
    """A symbolic float argument of the graph, read from its 0-d float64 kernel input (`_item`)."""
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.SymFloat)


@handles(aten.item.default)
def _item(L, node, x):
    """A float argument of the graph, which fusion hands to the kernel as a 0-d float64 tensor: its one element,
    cast where it is used as an operand (as eager casts a Python scalar to the op's computation type)."""
    v = L.val(x)
    if v.shape or v.dtype != "float64":
        raise Unsupported(f"item of a {v.dtype} tensor of shape {v.shape}")
    return v


def _let_all(xs: list, body: Callable):
    if not xs:
        return body([])
    if not isinstance(xs[0], tvm.ir.expr.Expr):
        return _let_all(xs[1:], lambda rest: body([xs[0], *rest]))
    return let(xs[0], lambda v: _let_all(xs[1:], lambda rest: body([v, *rest])))


def mul(a, b):
    """a * b; a float times a constant 0 is 0 where the float is finite and NaN elsewhere, as torch's (TVM's
    simplifier folds the product to 0)."""
    if isinstance(a, tirx.FloatImm):
        a, b = b, a
    if _floating(a) and isinstance(b, tirx.FloatImm) and b.value == 0:
        return tirx.Select(tirx.isfinite(a), b, const(float("nan"), dt(a)))
    return a * b


def _alpha(f):
    def g(a, b, alpha=1):
        return f(a, b * const(alpha, dt(b)) if alpha != 1 else b)
    return g


for _t, _f in {
    aten.add.Tensor: _alpha(operator.add), aten.add.Scalar: _alpha(operator.add),
    aten.sub.Tensor: _alpha(operator.sub), aten.sub.Scalar: _alpha(operator.sub),
    aten.rsub.Scalar: lambda a, b, alpha=1: b - a * const(alpha, dt(a)),
    aten.mul.Tensor: mul, aten.mul.Scalar: mul,
    aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv,
    aten.neg.default: operator.neg, aten.exp.default: fast_exp, aten.tanh.default: fast_tanh,
    aten.sigmoid.default: sigmoid, aten.erf.default: fast_erf, aten.sqrt.default: tirx.sqrt,
    aten.rsqrt.default: lambda x: const(1.0, dt(x)) / tirx.sqrt(x), aten.abs.default: tirx.abs,
    aten.log.default: tirx.log, aten.reciprocal.default: lambda x: const(1.0, dt(x)) / x,
    aten.expm1.default: lambda x: fast_exp(x) - const(1.0, dt(x)), aten.log1p.default: tirx.log1p,
    aten.clamp_min.default: nan_max, aten.clamp_max.default: nan_min,
    aten.relu.default: lambda x: nan_max(x, const(0, dt(x))),
    aten.maximum.default: nan_max, aten.minimum.default: nan_min,
    aten.where.self: lambda c, a, b: tirx.Select(cast(c, "bool"), a, b),
    aten.silu.default: lambda x: act("silu", x),
    aten.gelu.default: lambda x, approximate="none": gelu(x, approximate),
    tx.gelu.default: lambda x, approximate="none": gelu(x, approximate),
    tx.silu.default: lambda x: act("silu", x),
    tx.gated_act.default: lambda g, u, act_name: act(act_name, g) * u,
    aten._to_copy.default: lambda x, **kw: x, aten.to.dtype: lambda x, *a, **kw: x,
    aten.to.dtype_layout: lambda x, **kw: x, aten.clone.default: lambda x, **kw: x,
    aten.alias.default: lambda x: x, aten.detach.default: lambda x: x,
}.items():
    OPS[_t] = pointwise(_f)

for _t, _f in {
    aten.gt.Tensor: operator.gt, aten.gt.Scalar: operator.gt, aten.lt.Tensor: operator.lt,
    aten.lt.Scalar: operator.lt, aten.ge.Tensor: operator.ge, aten.ge.Scalar: operator.ge,
    aten.le.Tensor: operator.le, aten.le.Scalar: operator.le, aten.eq.Tensor: tirx.EQ,
    aten.eq.Scalar: tirx.EQ, aten.ne.Tensor: tirx.NE, aten.ne.Scalar: tirx.NE,
}.items():
    OPS[_t] = pointwise(_f, compute="inputs")


@handles(aten.dropout.default)
def _dropout(L, node, x, p, train):
    if train:
        raise Unsupported("dropout in training mode is random")
    return L.val(x)


@handles(aten.pow.Tensor_Scalar)
def _pow(L, node, x, e):
    # the exponents torch's CPU kernel computes by products and a reciprocal, computed the same way here: equal to
    # eager's values where a general power (TVM's, which also warns on exponents of 3 and over) may differ by an ulp
    forms = {2: lambda a: a * a, 3: lambda a: a * a * a, 0.5: tirx.sqrt, 1: lambda a: a,
             -1: lambda a: const(1, dt(a)) / a, -2: lambda a: const(1, dt(a)) / (a * a)}

    def f(a):
        form = forms.get(e) if dt(a).startswith("float") or e in (1, 2, 3) else None
        return form(a) if form is not None else tirx.power(a, const(e, dt(a)))
    return pointwise(f)(L, node, x)


@handles(aten.clamp.default)
def _clamp(L, node, x, min=None, max=None):
    def f(a):
        if min is not None:
            a = nan_max(a, const(min, dt(a)))
        if max is not None:
            a = nan_min(a, const(max, dt(a)))
        return a
    return pointwise(f)(L, node, x)


@handles(aten.masked_fill.Scalar)
def _masked_fill(L, node, x, mask, value):
    shape, dt = _shape(node), _dtype(node)
    xa, ma = _operand(L, x, shape, dt), _operand(L, mask, shape, "bool")
    return Val(shape, dt, lambda idx: tirx.Select(ma(idx), const(value, dt), xa(idx)))


@handles(aten.logical_not.default, aten.bitwise_not.default)
def _not(L, node, x):
    v = L.val(x)
    return Val(v.shape, v.dtype, lambda idx: tirx.Not(v.at(idx)) if v.dtype == "bool" else ~v.at(idx))


def _bool_xor(x, y):
    """Exclusive or of two bools (TVM's LLVM codegen emits a float comparison for NE on bool vectors)."""
    return tirx.Or(tirx.And(x, tirx.Not(y)), tirx.And(tirx.Not(x), y))


def _bitwise(logical, bitwise):
    """A bitwise op: on bools the logical one, on integers the bitwise one."""
    return lambda x, y: logical(x, y) if dt(x) == "bool" else bitwise(x, y)


for _t, _f in {
    aten.bitwise_and.Tensor: _bitwise(tirx.And, tirx.bitwise_and), aten.__and__.Tensor: _bitwise(tirx.And, tirx.bitwise_and),
    aten.bitwise_and.Scalar: _bitwise(tirx.And, tirx.bitwise_and), aten.logical_and.default: tirx.And,
    aten.bitwise_or.Tensor: _bitwise(tirx.Or, tirx.bitwise_or), aten.__or__.Tensor: _bitwise(tirx.Or, tirx.bitwise_or),
    aten.bitwise_or.Scalar: _bitwise(tirx.Or, tirx.bitwise_or), aten.logical_or.default: tirx.Or,
    aten.bitwise_xor.Tensor: _bitwise(_bool_xor, tirx.bitwise_xor), aten.bitwise_xor.Scalar: _bitwise(_bool_xor, tirx.bitwise_xor),
    aten.__and__.Scalar: _bitwise(tirx.And, tirx.bitwise_and), aten.__or__.Scalar: _bitwise(tirx.Or, tirx.bitwise_or),
    aten.__xor__.Tensor: _bitwise(_bool_xor, tirx.bitwise_xor), aten.__xor__.Scalar: _bitwise(_bool_xor, tirx.bitwise_xor),
}.items():
    OPS[_t] = pointwise(_f, compute="inputs")


def _truth(x):
    return x if dt(x) == "bool" else tirx.NE(x, const(0, dt(x)))


@handles(aten.logical_xor.default)
def _xor(L, node, a, b):
    return pointwise(lambda x, y: _bool_xor(_truth(x), _truth(y)), compute="inputs")(L, node, a, b)


def _is_float(e) -> bool:
    return dt(e).startswith(("float", "bfloat"))


def _float_only(f):
    """`f` on floating-point operands; integer ones are left to another backend (torch's integer semantics)."""
    def g(*xs):
        if not _is_float(xs[0]):
            raise Unsupported(f"{f.__name__} of integers")
        return f(*xs)
    return g


def _whole(f):
    """A rounding function: the identity on integers."""
    return lambda x: f(x) if _is_float(x) else x


def _fmod(a, b):
    if _is_float(a):  # TVM's LLVM target has no lowering of tirx.fmod
        raise Unsupported("fmod of floating-point values")
    return tirx.truncmod(a, b)


def _remainder(a, b):
    """Python's remainder (the sign of the divisor), as torch computes it: integers only (see _fmod)."""
    if _is_float(a):
        raise Unsupported("remainder of floating-point values")
    return tirx.floormod(a, b)


def _div_mode(a, b, rounding_mode=None):
    if rounding_mode is None:
        return a / b
    if rounding_mode == "trunc":
        return tirx.trunc(a / b) if _is_float(a) else tirx.truncdiv(a, b)
    if _is_float(a):  # torch floors the exact quotient (fmod-corrected), not the rounded a / b
        raise Unsupported("floor division of floating-point values")
    return tirx.floordiv(a, b)


for _t, _f in {
    aten.sin.default: tirx.sin, aten.cos.default: tirx.cos, aten.tan.default: tirx.tan, aten.asin.default: tirx.asin,
    aten.acos.default: tirx.acos, aten.atan.default: tirx.atan, aten.sinh.default: tirx.sinh,
    aten.cosh.default: tirx.cosh, aten.asinh.default: tirx.asinh, aten.acosh.default: tirx.acosh,
    aten.atanh.default: tirx.atanh, aten.atan2.default: tirx.atan2, aten.log2.default: tirx.log2,
    aten.log10.default: tirx.log10, aten.floor.default: _whole(tirx.floor), aten.ceil.default: _whole(tirx.ceil),
    aten.trunc.default: _whole(tirx.trunc), aten.round.default: _whole(tirx.nearbyint),  # half to even, as torch
    aten.pow.Tensor_Tensor: _float_only(tirx.power), aten.pow.Scalar: _float_only(tirx.power),
    aten.sign.default: lambda x: tirx.Select(x > const(0, dt(x)), const(1, dt(x)), tirx.Select(
        x < const(0, dt(x)), const(-1, dt(x)), const(0, dt(x)))),
    aten.fmod.Tensor: _fmod, aten.fmod.Scalar: _fmod, aten.remainder.Tensor: _remainder,
    aten.remainder.Scalar: _remainder, aten.div.Tensor_mode: _div_mode, aten.div.Scalar_mode: _div_mode,
}.items():
    OPS[_t] = pointwise(_f)
OPS[aten.isinf.default] = pointwise(tirx.isinf, compute="inputs")
OPS[aten.isnan.default] = pointwise(tirx.isnan, compute="inputs")


@handles(aten.clamp.Tensor)
def _clamp_tensor(L, node, x, min=None, max=None):
    def f(a, lo, hi):
        a = a if lo is None else nan_max(a, lo)
        return a if hi is None else nan_min(a, hi)
    return pointwise(f)(L, node, x, min, max)


@handles(tx.rotary.default)
def _rotary(L, node, x, cos, sin):
    shape, dt = _shape(node), _dtype(node)
    xv = L.val(x)
    xa, ca, sa = broadcast(xv, shape), _operand(L, cos, shape, dt), _operand(L, sin, shape, dt)
    half = static(xv.shape[-1], "the rotated dim") // 2

    def at(idx):
        j = idx[-1]
        lo = list(idx[:-1]) + [j + half]
        hi = list(idx[:-1]) + [j - half]
        rot = tirx.Select(j < half, -cast(xa(lo), dt), cast(xa(hi), dt))
        return cast(xa(idx), dt) * ca(idx) + rot * sa(idx)
    return Val(shape, dt, at)


# views: an output index maps to an input index; nothing is copied
def _view(L, node, x, *args, **kwargs):
    v, shape = L.val(x), _shape(node)
    src, dst = x.meta["val"].shape, node.meta["val"].shape
    if math.prod(ir.hints(src)) != math.prod(ir.hints(dst)):
        raise Unsupported("reshape changes the element count")
    groups = _reshape_groups(ir.hints(src), ir.hints(dst))
    if not all(isinstance(n, int) for n in (*v.shape, *shape)):  # the groups, found at the example's sizes,
        ss, ds = sym_sizes(src, node.graph), sym_sizes(dst, node.graph)  # must hold at every size
        kept = {i for ins, _ in groups for i in ins} | {i for i, n in enumerate(ss) if n == 1}
        made = {o for _, outs in groups for o in outs} | {o for o, n in enumerate(ds) if n == 1}
        if len(kept) != len(ss) or len(made) != len(ds) or any(
                sympy.expand(math.prod(ss[i] for i in ins) - math.prod(ds[o] for o in outs)) != 0
                for ins, outs in groups):
            raise Unsupported("a reshape that merges or splits dims differently at other sizes")

    def at(idx):
        src = [const(0, "int32")] * len(v.shape)
        for ins, outs in groups:  # dims merged or split together: index arithmetic stays within a group
            if len(ins) == 1 and len(outs) == 1:
                src[ins[0]] = idx[outs[0]]
                continue
            flat = linearize([idx[o] for o in outs], tuple(shape[o] for o in outs))
            for d, e in zip(ins, delinearize(flat, tuple(v.shape[i] for i in ins))):
                src[d] = e
        return v.at(src)
    return Val(shape, v.dtype, at)


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pairs (source dims, result dims) of a reshape whose sizes multiply to the same number, ignoring
    size-1 dims; a reshape that only merges or splits neighbours maps index to index group by group."""
    si = [i for i, n in enumerate(src) if n != 1]  # a symbolic size hinted 1 is dropped too: _view then refuses
    di = [i for i, n in enumerate(dst) if n != 1]
    groups, a, b = [], 0, 0
    while a < len(si) or b < len(di):
        ins, outs, pa, pb = [], [], 1, 1
        while True:
            if pa <= pb and a < len(si):
                ins.append(si[a])
                pa *= src[si[a]]
                a += 1
            elif b < len(di):
                outs.append(di[b])
                pb *= dst[di[b]]
                b += 1
            else:
                break
            if pa == pb and ins and outs:
                break
        groups.append((ins, outs))
    return groups


for _t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
           aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default):
    OPS[_t] = _view


@handles(aten.permute.default)
def _permute(L, node, x, dims):
    v = L.val(x)
    dims = [d % len(v.shape) for d in dims]

    def at(idx):
        src = [None] * len(dims)
        for o, d in enumerate(dims):
            src[d] = idx[o]
        return v.at(src)
    return Val(_shape(node), v.dtype, at)


@handles(aten.transpose.int)
def _transpose(L, node, x, d0, d1):
    nd = len(L.val(x).shape)
    dims = list(range(nd))
    d0, d1 = d0 % nd, d1 % nd
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return _permute(L, node, x, dims)


@handles(aten.t.default)
def _t(L, node, x):
    return _transpose(L, node, x, 0, 1) if len(L.val(x).shape) == 2 else _view(L, node, x)


@handles(aten.expand.default)
def _expand(L, node, x, size, implicit=False):
    v, shape = L.val(x), _shape(node)
    return Val(shape, v.dtype, broadcast(v, shape))


@handles(aten.select.int)
def _select(L, node, x, dim, index):
    v = L.val(x)
    dim %= len(v.shape)
    index %= static(v.shape[dim], "the selected dim")
    return Val(_shape(node), v.dtype, lambda idx: v.at(list(idx[:dim]) + [const(index, "int32")] + list(idx[dim:])))


@handles(aten.slice.Tensor)
def _slice(L, node, x, dim=0, start=None, end=None, step=1):
    v = L.val(x)
    dim %= len(v.shape)
    if isinstance(start, torch.SymInt) or isinstance(step, torch.SymInt):
        raise Unsupported("a slice from a symbolic start")
    n, start = v.shape[dim], start or 0
    if start and isinstance(n, int):
        start = start + n if start < 0 else min(start, n)
    elif start < 0:  # from the end of a symbolic dim (hidden[:, -1:]), clamped to 0 as torch does
        start = tirx.max(n + start, const(0, "int64"))
    elif start:
        raise Unsupported("a slice from a positive start of a symbolic dim")

    def at(idx):
        src = list(idx)
        src[dim] = idx[dim] * step + start
        return v.at(src)
    return Val(_shape(node), v.dtype, at)


# gathers (fxcc.codegen.gather): each output element from input elements at computed indices. Reads are
# clamped into range, and a read that may fall outside its input is chosen by `_guarded`, never by a Select:
# TVM simplifies the clamp away under the Select's condition, and a Select evaluates both sides.
def _guarded(cond, read, otherwise):
    """`read` where `cond` holds (only there is it evaluated: the read may leave its buffer elsewhere), else
    `otherwise`."""
    return tirx.if_then_else(cond, read, otherwise)


def _clamp_index(e, n: int):
    return tirx.max(tirx.min(e, const(n - 1, "int32")), const(0, "int32"))


def _inside(e, n: int):
    return tirx.And(e >= const(0, "int32"), e < const(n, "int32"))


def _all(conds: list):
    out = conds[0]
    for c in conds[1:]:
        out = tirx.And(out, c)
    return out


@handles(aten.cat.default)
def _cat(L, node, tensors, dim=0):
    shape, dtype = _shape(node), _dtype(node)
    dim %= len(shape)
    parts, start = [], 0
    for t in tensors:
        v = L.val(t)
        if len(v.shape) != len(shape):  # a legacy empty 1-D tensor
            continue
        parts.append((v, start, static(v.shape[dim], "the joined dim")))
        start += parts[-1][2]

    def at(idx):
        e = None
        for v, off, n in reversed(parts):
            src = list(idx)
            src[dim] = _clamp_index(idx[dim] - off, n)
            x = cast(v.at(src), dtype)
            e = x if e is None else _guarded(idx[dim] < const(off + n, "int32"), x, e)
        return e
    return Val(shape, dtype, at)


def _wrap(e, n: int):
    """e mod n for e in [-n, 2n), by selects: TVM 0.27 miscompiles a floormod of a shifted index once the
    loops around it are fused (checked in tests/test_tvm.py)."""
    return tirx.Select(e < const(0, "int32"), e + const(n, "int32"),
                       tirx.Select(e >= const(n, "int32"), e - const(n, "int32"), e))


def _pad_index(e, n: int, mode: str):
    """The source index of padded index `e` (already shifted by the padding before) in a dim of size n."""
    if mode == "reflect":
        r = tirx.abs(e)
        return const(n - 1, "int32") - tirx.abs(const(n - 1, "int32") - r)
    if mode == "circular":
        return _wrap(e, n)
    return _clamp_index(e, n)


@handles(*gather.PADS)
def _pad(L, node, x, *args, **kwargs):
    p = gather.pad(node)
    v, shape, dtype = L.val(x), _shape(node), _dtype(node)
    first = len(shape) - len(p.before)

    def at(idx):
        src, conds = list(idx), []
        for j, b in enumerate(p.before):
            d, n = first + j, v.shape[first + j]
            e = idx[d] - const(b, "int32")
            src[d] = _pad_index(e, n, p.mode) if p.mode != "constant" else _clamp_index(e, n)
            if p.mode == "constant":
                conds.append(_inside(e, n))
        y = cast(v.at(src), dtype)
        return _guarded(_all(conds), y, const(p.value, dtype)) if conds else y
    return Val(shape, dtype, at)


@handles(aten.roll.default)
def _roll(L, node, x, shifts, dims=()):
    v, shape = L.val(x), _shape(node)
    if not dims:  # the flattened tensor, rolled
        n = math.prod(shape)

        def flat(idx):
            return v.at(delinearize(_wrap(linearize(idx, shape) - const(shifts[0] % n, "int32"), n), shape))
        return Val(shape, v.dtype, flat)
    by = {d % len(shape): s % shape[d % len(shape)] for d, s in zip(dims, shifts)}

    def at(idx):
        return v.at([_wrap(e - const(by[d], "int32"), shape[d]) if d in by else e for d, e in enumerate(idx)])
    return Val(shape, v.dtype, at)


@handles(*gather.MAX_POOL, *gather.AVG_POOL)
def _pool(L, node, x, *args, **kwargs):
    p = gather.pool(node)
    v, shape, dtype = L.val(x), _shape(node), _dtype(node)
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    k = len(p.kernel)
    first = len(shape) - k
    sizes = v.shape[first:]

    def at(idx):
        starts = [idx[first + d] * p.stride[d] - const(p.padding[d], "int32") for d in range(k)]
        taps = []
        for tap in p.taps():
            pos = [starts[d] + const(tap[d] * p.dilation[d], "int32") for d in range(k)]
            src = list(idx[:first]) + [_clamp_index(q, n) for q, n in zip(pos, sizes)]
            inside = _all([_inside(q, n) for q, n in zip(pos, sizes)])
            fill = const(float("-inf") if p.kind == "max" else 0.0, acc)
            taps.append(_guarded(inside, cast(v.at(src), acc), fill))
        if p.kind == "avg":
            e = taps[0]
            for y in taps[1:]:
                e = e + y
            return cast(e / _avg_divisor(p, starts, sizes, acc), dtype)
        if not _floating(taps[0]):
            e = taps[0]
            for y in taps[1:]:
                e = tirx.max(e, y)
            return cast(e, dtype)

        # tirx.max skips a NaN, torch's window max is NaN: each tap bound once (read by the max and a NaN flag),
        # a plain max chain and an `or` of flags (nested NaN selects grow past what TVM's simplifier takes)
        def fold(i, e, nan):
            if i == len(taps):
                return tirx.Select(nan, const(float("nan"), acc), e)
            return let(taps[i], lambda y: fold(i + 1, y if e is None else tirx.max(e, y),
                                               tirx.isnan(y) if nan is None else tirx.Or(nan, tirx.isnan(y))))
        return cast(fold(0, None, None), dtype)
    return Val(shape, dtype, at)


def _avg_divisor(p: gather.Pool, starts: list, sizes: tuple[int, ...], dtype: str):
    """divisor_override, or the window's extent clipped to the padded input (count_include_pad) or to the
    input, as torch divides."""
    if p.divisor:
        return const(float(p.divisor), dtype)
    div = None
    for d, (s, n) in enumerate(zip(starts, sizes)):
        end = tirx.min(s + const(p.kernel[d], "int32"), const(n + p.padding[d], "int32"))
        if p.count_include_pad:
            cnt = end - s
        else:
            cnt = tirx.min(end, const(n, "int32")) - tirx.max(s, const(0, "int32"))
        div = cnt if div is None else div * cnt
    return cast(div, dtype)


# reductions: a stage per statistic over the last dim(s); the normalised value stays lazy
def _rows(v: Val, ndims: int):
    return v.shape[:len(v.shape) - ndims], v.shape[len(v.shape) - ndims:]


def _row_reduce(L: Lowering, v: Val, ndims: int, body, kind: str = "sum", dtype: str | None = None) -> Val:
    """A reduction over the last `ndims` dims. Over one dim divisible by the vector width it is built
    in two levels: `vec` interleaved partial results (which vectorise), then a short final reduction."""
    lead, red = _rows(v, ndims)
    red = tuple(static(n, "a reduced dim") for n in red)
    combine = _COMBINE[kind]
    vec = L.vec
    if ndims == 1 and red[0] % vec == 0 and red[0] >= 2 * vec:
        ko = te.reduce_axis((0, red[0] // vec), f"r{L.n_stage}")

        def part(*i):
            x = body(list(i[:-1]) + [ko.var * vec + i[-1]])
            return combine(cast(x, dtype) if dtype else x, axis=ko)
        rf = L.stage(lead + (vec,), part, "partial")
        lane = te.reduce_axis((0, vec), f"l{L.n_stage}")
        return L.stage(lead, lambda *i: combine(rf.at(list(i) + [lane.var]), axis=lane), "reduction")
    axes = [te.reduce_axis((0, n), f"r{L.n_stage}_{i}") for i, n in enumerate(red)]

    def fn(*i):
        x = body(list(i) + [a.var for a in axes])
        return combine(cast(x, dtype) if dtype else x, axis=axes)
    return L.stage(lead, fn, "reduction")


@handles(tx.layer_norm.default)
def _layer_norm(L, node, x, normalized_shape, w, b, eps):
    v = L.val(x)
    nd = len(normalized_shape)
    lead, red = _rows(v, nd)
    n = math.prod(static(m, "a normalised dim") for m in red)
    acc = "float32" if v.dtype in ("float16", "bfloat16") else v.dtype
    s = _row_reduce(L, v, nd, v.at, dtype=acc)
    mean = lambda i: s.at(i[:len(lead)]) / const(float(n), acc)  # noqa: E731
    q = _row_reduce(L, v, nd, lambda i: (cast(v.at(i), acc) - mean(i)) * (cast(v.at(i), acc) - mean(i)))
    wa = broadcast(L.val(w), v.shape) if w is not None else None
    ba = broadcast(L.val(b), v.shape) if b is not None else None
    dt = _dtype(node)

    def at(i):
        y = (cast(v.at(i), acc) - mean(i)) / tirx.sqrt(q.at(i[:len(lead)]) / const(float(n), acc) + const(eps, acc))
        y = cast(y, dt)
        if wa is not None:
            y = y * cast(wa(i), dt)
        if ba is not None:
            y = y + cast(ba(i), dt)
        return y
    return Val(v.shape, dt, at)


@handles(tx.rms_norm.default)
def _rms_norm(L, node, x, w, eps):
    v = L.val(x)
    lead, red = _rows(v, 1)
    n = static(red[0], "the normalised dim")
    ss = _row_reduce(L, v, 1, lambda i: cast(v.at(i), "float32") * cast(v.at(i), "float32"))
    wa = broadcast(L.val(w), v.shape) if w is not None else None
    dt = _dtype(node)

    def at(i):
        r = const(1.0, "float32") / tirx.sqrt(ss.at(i[:-1]) / const(float(n), "float32") + const(eps, "float32"))
        y = cast(cast(v.at(i), "float32") * r, v.dtype)
        return cast(y, dt) * cast(wa(i), dt) if wa is not None else cast(y, dt)
    return Val(v.shape, dt, at)


@handles(tx.softmax.default, aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
         aten.log_softmax.int)
def _softmax(L, node, x, dim, *rest):
    v = L.val(x)
    if dim % len(v.shape) != len(v.shape) - 1:
        raise Unsupported("softmax over a dim other than the last")
    acc = "float32"
    m = _row_reduce(L, v, 1, lambda i: cast(v.at(i), acc), kind="max")
    e = lambda i: fast_exp(cast(v.at(i), acc) - m.at(i[:-1]))  # noqa: E731
    s = _row_reduce(L, v, 1, e)
    dt = _dtype(node)
    if node.target in (aten._log_softmax.default, aten.log_softmax.int):
        return Val(v.shape, dt, lambda i: cast(cast(v.at(i), acc) - m.at(i[:-1]) - tirx.log(s.at(i[:-1])), dt))
    return Val(v.shape, dt, lambda i: cast(e(i) / s.at(i[:-1]), dt))


_COMBINE = {"sum": te.sum, "max": NAN_MAX, "min": NAN_MIN}
# a reduction of at least this many elements into fewer than _FEW results is split into chunks reduced in
# parallel (and each into its own accumulator: a long fp32 sum loses digits in one), then the chunks' results
_LONG, _FEW, _CHUNK = 8192, 64, 2048


def _reduce_stage(L: Lowering, lead: tuple[int, ...], red: tuple[int, ...], body, kind: str) -> Val:
    """A stage of shape `lead` reducing body(lead index, reduced index) over `red` (any number of dims)."""
    combine, n = _COMBINE[kind], math.prod(static(m, "a reduced dim") for m in red)
    if n >= _LONG and all(isinstance(m, int) for m in lead) and math.prod(lead) < _FEW:
        chunk = _fit(n, _CHUNK)
        chunk = chunk if chunk >= _CHUNK // 8 else _CHUNK
        parts = -(-n // chunk)
        c = te.reduce_axis((0, chunk), f"c{L.n_stage}")

        def part(*i):
            k = i[-1] * chunk + c.var
            x = body(list(i[:-1]), delinearize(k, red))
            return combine(x, axis=c) if n % chunk == 0 else combine(x, axis=c, where=k < n)
        pt = L.stage(lead + (parts,), part, "chunks")
        p = te.reduce_axis((0, parts), f"p{L.n_stage}")
        return L.stage(lead, lambda *i: combine(pt.at(list(i) + [p.var]), axis=p), "reduction")
    axes = [te.reduce_axis((0, m), f"r{L.n_stage}_{j}") for j, m in enumerate(red)]
    return L.stage(lead, lambda *i: combine(body(list(i), [a.var for a in axes]), axis=axes), "reduction")


@handles(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
         aten.amin.default)
def _reduce(L, node, x, dims=None, keepdim=False, dtype=None):
    v = L.val(x)
    nd = len(v.shape)
    dims = sorted({d % nd for d in (dims if dims else range(nd))}) if nd else []
    keep = [d for d in range(nd) if d not in dims]
    for d in dims:
        static(v.shape[d], "a reduced dim")
    out_dt = _dtype(node)
    acc = "float32" if out_dt in ("float16", "bfloat16") else _arithmetic(out_dt)
    kind = {aten.amax.default: "max", aten.amin.default: "min"}.get(node.target, "sum")

    def src(i, r):
        at = [None] * nd
        for d, e in [*zip(keep, i), *zip(dims, r)]:
            at[d] = e
        return at
    st = _reduce_stage(L, tuple(v.shape[d] for d in keep), tuple(v.shape[d] for d in dims),
                       lambda i, r: cast(v.at(src(i, r)), acc), kind)
    n = math.prod(v.shape[d] for d in dims)
    mean = node.target in (aten.mean.dim, aten.mean.default)

    def at(idx):
        r = st.at([idx[d] for d in keep] if keepdim else list(idx))
        return cast(r / const(float(n), acc) if mean else r, out_dt)
    return Val(_shape(node), out_dt, at)


@handles(aten.sym_size.int)
def _sym_size(L, node, x, dim):
    """A size read from an input: its TIR expression (a view takes its sizes from its own value; a pointwise op
    reads it as a scalar operand)."""
    return tir_size(sym_sizes([node.meta["val"]], node.graph)[0], node.graph)


@handles(aten.scalar_tensor.default, aten.full.default)
def _constant(L, node, *args, **kwargs):
    value = args[0] if node.target is aten.scalar_tensor.default else args[1]
    c = const(value, _dtype(node))
    return Val(_shape(node), _dtype(node), lambda idx: c)


# attention: scores, row max, probabilities, row sum and P @ V as stages computed per (batch, head)
@handles(tx.attention.default)
def _attention(L, node, q, k, v, mask, scale, is_causal):
    qv, kv, vv = L.val(q), L.val(k), L.val(v)
    B, H, Tq, D = qv.shape
    Hk, Tk = kv.shape[-3], kv.shape[-2]
    if len(qv.shape) != 4 or len(kv.shape) != 4 or kv.shape[0] != B or H % Hk:
        raise Unsupported("attention operands are not [B, H, T, D]")
    g = H // Hk
    dt = _dtype(node)
    f32 = "float32"
    kt = L.stage((B, Hk, D, Tk), lambda b, h, d, j: cast(kv.at([b, h, j, d]), f32), "pack")
    r = te.reduce_axis((0, D), f"d{L.n_stage}")
    sc = L.stage((B, H, Tq, Tk), lambda b, h, i, j: te.sum(
        cast(qv.at([b, h, i, r.var]), f32) * kt.at([b, tirx.floordiv(h, g), r.var, j]), axis=r), "scores")
    ma = _operand(L, mask, (B, H, Tq, Tk), "bool" if mask is not None and mask.meta["val"].dtype == torch.bool
                  else f32) if mask is not None else None
    neg = const(float("-inf"), f32)

    def logits(idx):
        x = sc.at(idx) * const(scale, f32)
        if ma is not None:
            # a boolean mask adds -inf where False, as eager does (a NaN or inf score stays NaN there);
            # causal masking drops future keys whatever their score, as eager does
            x = x + (tirx.Select(ma(idx), const(0.0, f32), neg) if mask.meta["val"].dtype == torch.bool else ma(idx))
        if is_causal:
            x = tirx.Select(idx[3] <= idx[2], x, neg)
        return x
    scores = Val((B, H, Tq, Tk), f32, logits)
    m = _row_reduce(L, scores, 1, scores.at, kind="max")
    zero = const(0.0, f32)

    def prob(i):
        # a masked key weighs exactly 0 (fast_exp clamps, it never reaches 0); a row whose keys are all masked
        # has max -inf: it is shifted by 0 instead (no -inf - -inf), so all its weights and its output are 0,
        # as eager's attention gives
        mx = m.at(i[:3])
        return let(logits(i), lambda x: tirx.Select(x == neg, zero, fast_exp(x - tirx.Select(mx == neg, zero, mx))))
    pr = L.stage((B, H, Tq, Tk), lambda *i: prob(list(i)), "probs")
    den = _row_reduce(L, pr, 1, pr.at)
    j = te.reduce_axis((0, Tk), f"j{L.n_stage}")
    o = L.stage((B, H, Tq, D), lambda b, h, i, d: te.sum(
        pr.at([b, h, i, j.var]) * cast(vv.at([b, tirx.floordiv(h, g), j.var, d]), f32), axis=j), "attn")
    out = L.stage((B, H, Tq, D), lambda *i: let(den.at(list(i[:3])), lambda s: tirx.Select(
        s == zero, zero, o.at(list(i)) / s)), "attnout")
    return Val((B, H, Tq, D), dt, lambda i: cast(out.at(i), dt))


# GEMMs: one stage with a reduction over k; bias/scale stay lazy as the epilogue
def _gemm(L: Lowering, node: fx.Node, a: Val, b_at, k: int) -> Val:
    shape, dt = _shape(node), _dtype(node)
    acc = "float32" if dt in ("float16", "bfloat16") else dt
    r = te.reduce_axis((0, k), f"k{L.n_stage}")
    ab = broadcast(Val(a.shape[:-1], a.dtype, lambda i: i), shape[:-1])  # batch broadcasting of a's rows

    def fn(*i):
        rows = ab(list(i[:-1]))
        return te.sum(cast(a.at(list(rows) + [r.var]), acc) * cast(b_at(list(i[:-2]), r.var, i[-1]), acc), axis=r)
    st = L.stage(shape, fn, "gemm")
    return Val(shape, dt, lambda i: cast(st.at(i), dt))


def _gemm_rows(L: Lowering, node: fx.Node, a: Val, w: Val) -> Val:
    """A linear of a [*lead, K] activation and an [N, K] weight read as it is (`Lowering.lanes`): the activation
    packed into [*lead[:-1], M/tm, K, tm] row panels first (once per call, and any expression computing it with
    it: once per element, not once per column tile), then the GEMM reads a vector of tm rows from a panel and
    broadcasts one weight element at a time (`_gemm_schedule`)."""
    shape, dt = _shape(node), _dtype(node)
    *lead, rows, _ = shape
    k = static(a.shape[-1], "a linear's reduced dim")
    tm = _fit(rows, L.lanes)
    panels = L.stage((*lead, rows // tm, k, tm), lambda *i: a.at([*i[:-3], i[-3] * tm + i[-1], i[-2]]), "rowpack")
    r = te.reduce_axis((0, k), f"k{L.n_stage}")

    def fn(*i):
        m = i[-2]
        return te.sum(cast(panels.at([*i[:-2], tirx.floordiv(m, tm), r.var, tirx.floormod(m, tm)]), "float32")
                      * cast(w.at([i[-1], r.var]), "float32"), axis=r)
    st = L.stage(shape, fn, "gemm")
    L.out.stages[-1].lanes = tm
    return Val(shape, dt, lambda i: cast(st.at(i), dt))


def _rows_apply(L: Lowering, node: fx.Node) -> bool:
    """Whether this linear is read as `_gemm_rows` reads it: row panels asked for (`Lowering.lanes`), a weight
    the kernel takes as a 2-D contiguous fp32 input, static sizes, and rows that split into panels of at least 8
    (an AVX2 vector; fewer rows per vector leave the FMAs mostly idle: the panel GEMM serves those)."""
    v = node.meta.get("val")
    if not (L.lanes > 0 and packable(node) and isinstance(v, torch.Tensor) and v.dim() >= 2
            and v.dtype == torch.float32):
        return False
    sizes = (*v.shape, *node.args[0].meta["val"].shape)
    return all(isinstance(d, int) for d in sizes) and _fit(v.shape[-2], L.lanes) >= 8


@handles(aten.linear.default)
def _linear(L, node, x, w, b=None):
    xv, wv = L.val(x), L.val(w)
    if _rows_apply(L, node):
        y = _gemm_rows(L, node, xv, wv)
    else:
        y = _gemm(L, node, xv, lambda batch, kk, n: wv.at([n, kk]), xv.shape[-1])
    if b is None:
        return y
    ba = broadcast(L.val(b), y.shape)
    return Val(y.shape, y.dtype, lambda i: y.at(i) + cast(ba(i), y.dtype))


@handles(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(L, node, a, b):
    av, bv = L.val(a), L.val(b)
    if len(bv.shape) < 2 or len(av.shape) < 2:
        raise Unsupported("matmul with a vector operand")
    shape = _shape(node)
    bb = broadcast(Val(bv.shape[:-2], bv.dtype, lambda i: i), shape[:-2])
    return _gemm(L, node, av, lambda batch, kk, n: bv.at(list(bb(batch)) + [kk, n]), av.shape[-1])


@handles(aten.addmm.default)
def _addmm(L, node, bias, a, b, beta=1, alpha=1):
    av, bv = L.val(a), L.val(b)
    y = _gemm(L, node, av, lambda batch, kk, n: bv.at([kk, n]), av.shape[-1])
    ba = broadcast(L.val(bias), y.shape)
    dt = y.dtype
    return Val(y.shape, dt, lambda i: y.at(i) * const(alpha, dt) + cast(ba(i), dt) * const(beta, dt))


# --- schedules ----------------------------------------------------------------------------------------------
def space(lowered: Lowered) -> dict[str, list]:
    """The schedule parameters of this kernel (its tuning space); each one changes the generated code."""
    if any(s.lanes for s in lowered.stages):  # tile_m: the rows of a vector, tile_n: the weight rows broadcast
        return {"tile_m": [8, 16, 24], "tile_n": [2, 3, 4, 6], "tile_mb": [32, 64, 128], "unroll": [0, 1]}
    if any(s.role == "gemm" for s in lowered.stages):
        return {"tile_m": [2, 4, 6, 8], "tile_n": [8, 16, 24, 32], "tile_mb": [32, 64, 128], "unroll": [0, 1]}
    sp = {"vec": [4, 8, 16]}
    if any(s.role == "attn" for s in lowered.stages):
        sp.update(tile_m=[2, 4, 6, 8], tile_n=[8, 16, 32])
    return sp


DEFAULTS = {"vec": 8, "unroll": 1, "tile_m": 4, "tile_n": 16, "tile_mb": 64}
# a GEMM on row panels (`_gemm_rows`): 16 rows (two AVX2 vectors) by 4 weight rows, 8 accumulators, as the panel
# GEMM's 4 x 16; more weight rows need a register for each broadcast, and LLVM then spills accumulators
ROW_DEFAULTS = {**DEFAULTS, "tile_m": 16, "tile_n": 4}
# elements below which a row-wise or pointwise loop runs on the calling thread, as torch's own loops do
# (at::internal::GRAIN_SIZE): waking the other threads for a decode step's one row costs more than the row
PARALLEL_GRAIN = 32768


def schedule(lowered: Lowered, params: dict, parallel: bool | None = None) -> s_tir.Schedule:
    """Apply the parameterised schedule: parallel outer loops, vectorised inner loops, row reductions
    computed inside the row loop with vectorised partial sums, GEMMs tiled with the epilogue fused.
    `parallel` decides loops of symbolic extent (a symbolic kernel is built both ways, and its caller picks
    one by the sizes of each call); static loops are parallel from PARALLEL_GRAIN elements."""
    p = {**DEFAULTS, **params, "parallel": parallel}
    func = te.create_prim_func(lowered.args + lowered.vars, index_dtype_override="int64" if lowered.vars else None)
    sch = s_tir.Schedule(func)
    gemms = [s for s in lowered.stages if s.role == "gemm"]
    placed: set[str] = set()
    inner: list[str] = []
    for st in lowered.stages:
        if st.role == "attnout":
            placed |= _attention_schedule(sch, lowered, st, p)
    for t in lowered.out_tensors:
        blk = sch.get_sblock(t.op.name)
        if gemms and len(lowered.out_tensors) == 1 and len(gemms) == 1:
            _gemm_schedule(sch, gemms[0].tensor.op.name, blk, p, gemms[0].lanes)
            placed.add(gemms[0].tensor.op.name)
            continue
        rows = _spatial(sch, blk, p)
        if rows is None:
            continue
        for st in reversed(lowered.stages):
            name = st.tensor.op.name
            if name in placed or st.role not in ("reduction", "partial"):
                continue
            lead = tuple(st.tensor.shape)[:-1] if st.role == "partial" else tuple(st.tensor.shape)
            if not _same_sizes(lead, tuple(t.shape[:-1])):
                continue  # not one result per row of this output: computed once, before it
            try:
                sch.compute_at(sch.get_sblock(name), rows, preserve_unit_loops=True)
            except Exception:  # another output consumes it too: it stays a root stage
                continue
            placed.add(name)
            if st.role == "partial":
                inner.append(name)
    for name in inner:
        _vector_lanes(sch, name)
    for st in lowered.stages:
        name = st.tensor.op.name
        if name not in placed:
            if st.role == "gemm":
                _gemm_schedule(sch, name, None, p, st.lanes)
            elif st.role == "value":  # a stored value (Lowering._bound): a pointwise loop of its own
                _spatial(sch, sch.get_sblock(name), p)
            elif st.role == "rowpack":
                _rowpack_schedule(sch, sch.get_sblock(name), p)
            else:
                loops = sch.get_loops(sch.get_sblock(name))
                spatial = loops[:len(st.tensor.shape)]
                if spatial and p["parallel"] is not False:
                    sch.parallel(_fuse_rows(sch, spatial))
    return _prefetched(sch)


# a GEMM on row panels reads tile_n weight rows of a few KB each, in step, once per column tile: the hardware
# prefetcher learns each short stream anew (and stops at each 4 KB page), so with the weights coming from memory, as in
# a model, the loads wait where the panels' one long stream does not (8-20% at K=512, benchmarks/tvm_nt_gemm.py
# --cold). The k loop, in steps of a cache line, asks for the same line of the next tile's rows.
LINE = 16  # fp32 elements in a 64-byte cache line
PREFETCH = "fxcc.prefetch_next_rows"  # the annotation of that k loop (its value: tile_n) and of the weight-row loop


def _prefetched(sch: s_tir.Schedule) -> s_tir.Schedule:
    """The schedule with a prefetch, at the start of each loop annotated PREFETCH (`_gemm_schedule`), of the weight
    elements its GEMM reads at the first iteration of the loops inside it, in the tile_n rows after the current ones
    (the next column tile: the parallel loop gives each thread a run of consecutive tiles). The address is clamped to
    the weight's buffer; a schedule without such a loop is returned as it is."""
    func = sch.mod["main"]

    def fetches(loop) -> list:
        tn, inner, rows, updates = int(loop.annotations[PREFETCH]), [], [], []

        def collect(node):
            if isinstance(node, S.For):
                inner.append(node.loop_var)
                if PREFETCH in node.annotations:
                    rows.append(node.loop_var)
            elif isinstance(node, s_tir.SBlockRealize) and any(iv.iter_type == tirx.IterVar.CommReduce
                                                              for iv in node.block.iter_vars):
                updates.append(node)
        tvm_ffi.structural_walk(loop.body, collect)
        if len(rows) != 1 or len(updates) != 1:
            return []
        loads = []
        tvm_ffi.structural_walk(updates[0].block.body, lambda e: loads.append(e) if isinstance(e, _LOAD) and any(
            e.source.same_as(p) for p in func.params) and len(e.source.shape) == 1 else None)
        if not loads or any(not ld.source.same_as(loads[0].source) for ld in loads):
            return []  # the weight: the one input the GEMM reads as it is (an expression of several: no prefetch)
        realize, weight = updates[0], loads[0].source
        binds = list(zip((iv.var for iv in realize.block.iter_vars), realize.iter_values))
        out = []
        for j in range(tn):  # the first element of this line of k in row j of the next tile
            at = _substitute(_substitute(loads[0].indices[0], binds),
                             [(v, tirx.const(tn + j if v.same_as(rows[0]) else 0, v.ty.dtype)) for v in inner])
            at = tirx.min(at, tirx.const(int(weight.shape[0]) - 1, at.ty.dtype))
            addr = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(weight, [at]))
            out.append(S.Evaluate(tirx.call_intrin("void", "tirx.prefetch", addr, 0, 3, 1)))
        return out

    def on_for(loop, m):
        if PREFETCH not in loop.annotations:
            return m.default_mutate(loop)
        body = m.mutate(loop.body)
        notes = {k: v for k, v in loop.annotations.items() if k != PREFETCH}
        pre = fetches(loop) if int(loop.annotations[PREFETCH]) > 0 else []
        return S.For(loop.loop_var, loop.min, loop.extent, loop.kind, S.SeqStmt([*pre, body]) if pre else body,
                     loop.thread_binding, notes, loop.step)

    body = tvm_ffi.structural_mutate(func.body, [(S.For, on_for)])
    if body.same_as(func.body):
        return sch
    return s_tir.Schedule(tvm.IRModule({"main": func.with_body(body)}))


_LOAD = type(tirx.BufferLoad(tirx.decl_buffer((1,), "float32", "b"), [tirx.const(0, "int32")]))


def _substitute(expr, binds: list):
    """`expr` with each variable of `binds` ((variable, value) pairs) replaced by its value."""
    return tvm_ffi.structural_mutate(expr, [(tvm.ir.expr.Var,
                                             lambda v, _: next((x for u, x in binds if u.same_as(v)), v))])


def _fuse_rows(sch, loops):
    """The row loops fused into one, from the last of symbolic extent on (fusing loops inside one of symbolic
    extent would index by a division by a size variable, which TVM cannot schedule); those before it stay
    outer loops."""
    syms = [i for i, lp in enumerate(loops) if _extent(sch, lp) is None]
    start = syms[-1] if syms else 0
    return sch.fuse(*loops[start:]) if len(loops) - start > 1 else loops[start]


def _same_sizes(a: tuple, b: tuple) -> bool:
    """Whether two TE shapes are equal: the same numbers (of any int type) or the same size expressions."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tirx.IntImm) and isinstance(y, tirx.IntImm):
            if int(x) != int(y):
                return False
        elif not tvm_ffi.structural_equal(x, y):
            return False
    return True


def _extent(sch, loop) -> int | None:
    """A loop's extent when static, else None (a symbolic size)."""
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


def _attention_schedule(sch, lowered: Lowered, anchor: Stage, p) -> set[str]:
    """All stages of one attention computed per (batch, head) in a parallel loop: the working set
    (a head's scores) stays in cache; scores vectorise along keys, P @ V along the head dim."""
    blk = sch.get_sblock(anchor.tensor.op.name)
    b, h, i, d = sch.get_loops(blk)
    bh = sch.fuse(b, h)
    sch.parallel(bh)
    idx = lowered.stages.index(anchor)
    start = max(k for k in range(idx) if lowered.stages[k].role == "pack")
    mine = lowered.stages[start:idx]
    for st in reversed(mine):
        sch.compute_at(sch.get_sblock(st.tensor.op.name), bh, preserve_unit_loops=True)
    for st in mine:
        sb = sch.get_sblock(st.tensor.op.name)
        loops = sch.get_loops(sb)
        if st.role == "partial":
            _vector_lanes(sch, st.tensor.op.name)
        elif st.role in ("scores", "attn"):
            _microkernel(sch, st.tensor.op.name, p["tile_m"], p["tile_n"])
        elif st.role in ("probs", "pack"):
            _vectorize_last(sch, loops[-1])
    _vectorize_last(sch, sch.get_loops(blk)[-1])
    return {st.tensor.op.name for st in mine} | {anchor.tensor.op.name}


def _microkernel(sch, name: str, tm: int, tn: int) -> None:
    """A small matrix product (last loops m, n, k) as a register-blocked kernel: a tm x tn tile of
    accumulators (n the vector) lives in a local buffer while k runs; then it is written back."""
    blk = sch.get_sblock(name)
    *_, m, n, k = sch.get_loops(blk)
    M, N = int(sch.get(m).extent), int(sch.get(n).extent)
    tm, tn = _fit(M, tm), _fit(N, tn)
    mo, mi = sch.split(m, [None, tm])
    no, ni = sch.split(n, [None, tn])
    sch.reorder(mo, no, k, mi, ni)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, no, preserve_unit_loops=True)
    if tn % 4 == 0:
        sch.vectorize(ni)
        _vectorize_last(sch, sch.get_loops(acc)[-1])
    sch.unroll(mi)
    sch.decompose_reduction(blk, k)


def _vectorize_last(sch, loop) -> None:
    n = int(sch.get(loop).extent)
    if n % 8 == 0:
        sch.vectorize(sch.split(loop, [None, 8])[1])


def _spatial(sch, blk, p):
    """Fuse the outer loops into one parallel row loop and vectorise the innermost; returns the row loop."""
    loops = sch.get_loops(blk)
    if not loops:
        return None
    inner = loops[-1]
    n = _extent(sch, inner)
    vec = max(v for v in (p["vec"], 8, 4, 2, 1) if n % v == 0 and v <= p["vec"]) if n is not None else 1
    if vec > 1:
        _, vi = sch.split(inner, [None, vec])
        sch.vectorize(vi)
    if len(loops) == 1:
        if (vec > 1 and n >= PARALLEL_GRAIN) if n is not None else p["parallel"]:
            outer = sch.get_loops(blk)[0]
            sch.parallel(outer)
        return None
    rows = _fuse_rows(sch, loops[:-1])
    extent = _extent(sch, rows)
    if extent is not None and n is not None:
        if extent > 1 and extent * n >= PARALLEL_GRAIN:
            sch.parallel(rows)
    elif p["parallel"]:  # a symbolic row count (or row length): the variant the caller picks by size
        sch.parallel(rows)
    return rows


def _rowpack_schedule(sch, blk, p) -> None:
    """The activation's row panels (`_gemm_rows`): written in order, a panel's rows read side by side (their lines
    stay in L1 across the next k); in parallel over the panels when large."""
    loops = sch.get_loops(blk)
    sch.unroll(loops[-1])
    panels = _fuse_rows(sch, loops[:-2])
    if math.prod(int(sch.get(lp).extent) for lp in sch.get_loops(blk)) >= PARALLEL_GRAIN and p["parallel"] is not False:
        sch.parallel(panels)


def _vector_lanes(sch, name: str) -> None:
    """Partial results of a two-level reduction: lanes innermost and vectorised."""
    loops = sch.get_loops(sch.get_sblock(name))
    sch.reorder(loops[-1], loops[-2])
    sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])


def _per_iteration(sch, block, at) -> int:
    """Iterations of `block` per iteration of loop `at` (the product of the loops inside it)."""
    loops = sch.get_loops(block)
    target = sch.get(at)
    i = next(k for k, lp in enumerate(loops) if sch.get(lp).same_as(target))
    return math.prod(int(sch.get(lp).extent) for lp in loops[i + 1:])


def _fit(n: int, want: int) -> int:
    """The largest divisor of `n` not above `want` (tiles never leave a remainder)."""
    return max(d for d in range(1, min(n, want) + 1) if n % d == 0)


def _gemm_schedule(sch, name: str, epilogue, p, lanes: int = 0) -> None:
    """A register-blocked GEMM: a tile_m x tile_n block of accumulators (n the vector, m unrolled) lives
    in registers while k runs. Row tiles are grouped in blocks of about tile_mb rows, and the parallel
    loop runs over (row block, column panel): the panel of the packed weight (K x tile_n) stays in L1
    while the block's rows (in L2) pass it. The epilogue runs per register tile, on what was just written.
    A GEMM on row panels (`lanes`: its rows per panel, `_gemm_rows`) is the same with the roles swapped: m the
    vector, the tile_n weight rows unrolled, each of their elements broadcast."""
    blk = sch.get_sblock(name)
    *batch, m, n, k = sch.get_loops(blk)
    M, N = (int(sch.get(x).extent) for x in (m, n))
    tm, tn = lanes or _fit(M, p["tile_m"]), _fit(N, p["tile_n"])
    mo, mi = sch.split(m, [None, tm])
    mbo, mbi = sch.split(mo, [None, _fit(M // tm, max(1, p["tile_mb"] // tm))])
    no, ni = sch.split(n, [None, tn])
    vector, scalar = (mi, ni) if lanes else (ni, mi)
    sch.reorder(mbo, no, mbi, k, scalar, vector)
    K = int(sch.get(k).extent)
    if lanes and K % LINE == 0 and N > tn:  # a line of each next weight row per line of k (`_prefetched`)
        k, ki = sch.split(k, [None, LINE])
        sch.annotate(k, PREFETCH, tn)
        sch.annotate(ni, PREFETCH, 0)
    outer = sch.fuse(*batch, mbo, no)
    sch.parallel(outer)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, mbi, preserve_unit_loops=True)
    if lanes:  # the accumulators column-major: each one a vector of rows
        sch.transform_layout(blk, ("write", 0), lambda *i: (*i[:-2], i[-1], i[-2]))
    if (tm if lanes else tn) % 4 == 0:
        sch.vectorize(vector)
        if tn % 4 == 0:
            sch.vectorize(sch.get_loops(acc)[-1])
    if p["unroll"]:
        sch.unroll(scalar)
    sch.decompose_reduction(blk, k)
    if epilogue is not None:
        for at in (mbi, outer):
            trial = sch.copy()
            try:
                trial.reverse_compute_at(epilogue, at, preserve_unit_loops=True)
            except Exception:  # it reads beyond the tile (a transpose, a row statistic): try a wider loop
                continue
            if _per_iteration(trial, epilogue, at) <= _per_iteration(trial, acc, at):
                sch.reverse_compute_at(epilogue, at, preserve_unit_loops=True)
                break
            # more epilogue elements per tile than the tile holds: TVM covered the elements that read the tile
            # with a range that also holds some reading other tiles, not yet written (a reshape splitting the
            # tile's columns over rows): computed there, they would read stale memory
        else:
            _spatial(sch, epilogue, p)
            return
        el = sch.get_loops(epilogue)
        if int(sch.get(el[-1]).extent) % 4 == 0:
            sch.vectorize(el[-1])


# handlers that take symbolic sizes where they are outer (see the module doc); each checks its own static dims
for _h in (_dropout, _pow, _clamp, _masked_fill, _not, _xor, _clamp_tensor, _rotary, _view, _permute, _transpose,
           _t, _expand, _select, _slice, _cat, _layer_norm, _rms_norm, _softmax, _reduce, _constant, _sym_size):
    _h.symbolic = True
