"""Triton source generation from kernel bodies: index algebra and an expression emitter.

A body value is produced at an index: a tuple of Triton expressions, one per dimension of its shape.
Evaluating an output at its own index walks the body backwards: a view maps the index onto its input's
(reshape by linearising, transpose by permuting, expand by pinning broadcast dimensions to 0), a
pointwise op evaluates its operands at their broadcast indices, a placeholder becomes a strided load.
Evaluation is memoised per (node, index), so a value used twice is computed once.

Row kernels reduce over the tile's column axis (`Emitter.axis`). Their reductions go through
`Emitter.row_reduce`: inline over a tile that holds whole rows (persistent), or accumulated chunk by chunk in
a loop over the columns (`RowLoop`), where a reduction that needs another's result waits for a later loop
(`Later`); lines that do not vary within a loop are emitted before it (`Emitter.variant`). A mean and the sum of
squared deviations from it (a variance's, as var, std and the norms have it) accumulate in the same loop, by
Welford's update per lane and Chan et al.'s combination of the lanes (`welford_combine`).

Kernels whose anchor is computed by a template (a GEMM tile, an attention tile) run the other way for
what follows the anchor: `seed` gives the anchor's value at the tile's index, and `forward` carries that
index through views and pointwise ops to the outputs; operands that are not derived from the anchor
(a residual, a bias, rotary tables) are still loaded backwards from there. Whatever this cannot express
exactly raises Unsupported, and the backend then offers no candidate for that body.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from fxcc import gather, ir
from fxcc.dialects import domain
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

aten = torch.ops.aten
tx = torch.ops.fxcc_tx


class Unsupported(Exception):
    """A body, or part of one, the Triton generator cannot express (the backend offers no candidate)."""


class Later(Exception):
    """A reduction's result is not available in this loop over the columns: it accumulates here (or waits for
    what it needs) and what reads it is computed in a later loop."""


@dataclass
class RowLoop:
    """One loop over a row kernel's columns, a chunk per iteration. `init` is the code before the loop (the
    accumulators' start values and the loop-invariant lines), `pending` the reductions accumulating in it:
    key -> (accumulator, kind, propagate_nan, its Triton dtype); after the loop each becomes a row vector
    (`Emitter.finish_rows`). `means`: the sums of squared deviations accumulating with their mean's sum in one
    pass (key -> the keys of the mean's sum and of the shifts it is taken from, each pending), for which the loop
    names its mask, the number of chunks before the current one (`ordinal`) and each lane's count of columns
    after the loop (`lanes`, an fp32 tile)."""

    tile: str  # the accumulators' shape, e.g. "[ROWS, RBLOCK]"
    init: list[str]
    pending: dict[tuple, tuple[str, str, bool, str]] = field(default_factory=dict)
    mask: str = ""
    ordinal: str = ""
    lanes: str = ""
    means: dict[tuple, tuple[tuple, tuple]] = field(default_factory=dict)


# a closed loop: what follows all loops reads finished reductions only
CLOSED = RowLoop("", [])


TL = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
      torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int16: "tl.int16",
      torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1"}


def tl_dtype(dtype: torch.dtype) -> str:
    if dtype not in TL:
        raise Unsupported(f"dtype {dtype} has no Triton type here")
    return TL[dtype]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Floats narrower than fp32 are computed in fp32 (and rounded back after every op, as eager does)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def shape_of(x: object) -> tuple[int | sympy.Expr, ...]:
    """A node's shape: ints, and for symbolic sizes sympy expressions of the body's kernel arguments
    `sym0`, `sym1`, ... (see `size_args`), which print as the Triton expressions computing them."""
    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        raise Unsupported(f"{x} has no tensor value")
    return tuple(_size(s, x.graph) for s in v.shape)


def sizes_of(values: object, graph: fx.Graph) -> tuple[int | sympy.Expr, ...]:
    """Sizes (a shape, strides) as ints and sympy expressions of the body's size arguments, as `shape_of`."""
    return tuple(_size(s, graph) for s in values)


def _size(s: object, graph: fx.Graph) -> int | sympy.Expr:
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        if not expr.free_symbols:
            return int(expr)
        names = _symbols(graph)
        if not expr.free_symbols <= names.keys():
            raise Unsupported(f"size {expr} is not computed from the kernel's input sizes")
        return expr.xreplace(names)
    return int(s)


_SYMBOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _symbols(graph: fx.Graph) -> dict[sympy.Symbol, sympy.Symbol]:
    """The size symbols of a body's inputs, each renamed `sym<i>` in order of first use: the names its
    generated source uses, the same for every body that differs only in export's numbering."""
    if graph not in _SYMBOLS:
        names: dict[sympy.Symbol, sympy.Symbol] = {}
        for n in graph.nodes:
            v = n.meta.get("val") if n.op == "placeholder" else None
            for d in (v.shape if isinstance(v, torch.Tensor) else ()):
                if isinstance(d, torch.SymInt):
                    for sym in sorted(d.node.expr.free_symbols, key=str):
                        names.setdefault(sym, sympy.Symbol(f"sym{len(names)}", integer=True, positive=True))
        _SYMBOLS[graph] = names
    return _SYMBOLS[graph]


def size_args(body: fx.GraphModule) -> list[tuple[str, int, int]]:
    """The kernel's size arguments: (name, input position, dimension) of each symbol of the body, read at
    launch from an input that has it as a dimension. Raises Unsupported when one is in no input's shape."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    out = []
    for sym, name in _symbols(body.graph).items():
        where = next(((k, d) for k, p in enumerate(placeholders) if isinstance(p.meta.get("val"), torch.Tensor)
                      for d, s in enumerate(p.meta["val"].shape)
                      if isinstance(s, torch.SymInt) and s.node.expr == sym), None)
        if where is None:
            raise Unsupported(f"size {sym} is no input's dimension")
        out.append((str(name), *where))
    return out


def is_symbolic(body: fx.GraphModule) -> bool:
    return bool(_symbols(body.graph))


def shape_fn(node: fx.Node, args: list[tuple[str, int, int]]):
    """A function of the kernel's inputs giving `node`'s shape (its symbolic sizes evaluated at launch)."""
    shape = shape_of(node)
    if all(isinstance(s, int) for s in shape):
        return lambda inputs: shape
    shape_code = compile("(" + "".join(f"{code(s)}, " for s in shape) + ")", "<fxcc-triton-shape>", "eval")

    def evaluate(inputs: list[torch.Tensor]) -> tuple[int, ...]:
        return eval(shape_code, {"__builtins__": {}}, {name: inputs[k].shape[d] for name, k, d in args})
    return evaluate


def hint_shape(node: fx.Node) -> tuple[int, ...]:
    """A node's shape at the example sizes the compile saw (for block sizes and other heuristics)."""
    return tuple(ir.hint(s) for s in node.meta["val"].shape)


def dtype_of(x: object) -> torch.dtype:
    return x.meta["val"].dtype


# ------------------------------------------------------------------------------------ index algebra

Index = tuple[str, ...]


class _Code(StrPrinter):
    """Size expressions as Triton (and Python) source: a power as a product, `Mod` and torch's `PythonMod` as a
    remainder (sympy writes `sym0**2` and `Mod(1, sym0)`, neither of which a Triton kernel compiles); a size with
    any other function in it (Max, Min, ...) is Unsupported, so no kernel is made with a call it cannot run."""

    def _print_Pow(self, e: sympy.Pow) -> str:
        if not (e.exp.is_Integer and e.exp > 0):
            raise Unsupported(f"size {e}")
        return "(" + " * ".join([self.parenthesize(e.base, PRECEDENCE["Mul"])] * int(e.exp)) + ")"

    def _print_Mod(self, e: sympy.Basic) -> str:
        a, b = (self._print(x) for x in e.args)
        return f"((({a}) % ({b}) + ({b})) % ({b}))"  # Triton's remainder takes the dividend's sign; sympy's not

    _print_PythonMod = _print_Mod  # torch's symbolic `%` (the divisor's sign, as Python's)

    def _print_Function(self, e: sympy.Function) -> str:
        # any other function (Max, Min, torch's CeilToInt, IntTrueDiv, ...) would print as a call no kernel has
        raise Unsupported(f"size {e}")

    _print_Max = _print_Min = _print_MinMaxBase = _print_Function


def code(e: object) -> str:
    """A size (an int, or a sympy expression of the size arguments) as kernel source."""
    return _Code().doprint(e) if isinstance(e, sympy.Basic) else str(e)


def _wrap(e: str) -> str:
    e = code(e)  # a size may be a sympy expression of size arguments
    return e if e.isidentifier() or e.isdigit() else f"({e})"


def mul(e: str, c: int) -> str:
    if e == "0" or c == 0:
        return "0"
    return e if c == 1 else f"{_wrap(e)} * {_wrap(c)}"


def add(*es: str) -> str:
    es = tuple(e for e in es if e != "0")
    return " + ".join(es) if es else "0"


def div(e: str, c: int) -> str:
    return e if c == 1 or e == "0" else f"{_wrap(e)} // {_wrap(c)}"


def mod(e: str, c: int) -> str:
    return "0" if c == 1 else (e if e == "0" else f"{_wrap(e)} % {_wrap(c)}")


def _le(a: int | sympy.Expr, b: int | sympy.Expr) -> bool:
    """a <= b for sizes; symbolic sizes are taken as large (this only steers how reshapes are grouped)."""
    if isinstance(a, int) and isinstance(b, int):
        return a <= b
    big = {s: 1 << 16 for s in (sympy.sympify(a).free_symbols | sympy.sympify(b).free_symbols)}
    return bool(sympy.sympify(a).subs(big) <= sympy.sympify(b).subs(big))


def linearize(idx: Index, shape: tuple[int, ...]) -> str:
    terms, stride = [], 1
    for e, s in zip(reversed(idx), reversed(shape)):
        if s != 1:
            terms.append(mul(e, stride))
        stride *= s
    return add(*reversed(terms))


def delinearize(lin: str, shape: tuple[int, ...], bounded: bool = True) -> Index:
    """Indices of row-major position `lin` in `shape`; `bounded`: lin < numel, so dim 0 needs no modulo."""
    out, stride = [], 1
    for d in range(len(shape) - 1, -1, -1):
        s = shape[d]
        if s == 1:
            out.append("0")
        else:
            e = div(lin, stride)
            outermost = bounded and math.prod(shape[:d]) == 1
            out.append(e if outermost else mod(e, s))
        stride *= s
    return tuple(reversed(out))


def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal numel into runs of dimensions with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ga, gb, pa, pb = [], [], 1, 1
        while True:
            if _le(pa, pb) and i < len(a):
                ga.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                gb.append(j)
                pb *= b[j]
                j += 1
            else:
                break
            if pa == pb and (i == len(a) or a[i] != 1) and (j == len(b) or b[j] != 1):
                break
        groups.append((ga, gb))
    return groups


def reshape_index(idx: Index, shape: tuple[int, ...], to: tuple[int, ...]) -> Index:
    """The index in `to` of the element at `idx` in `shape` (same numel, row-major order)."""
    if math.prod(shape) != math.prod(to):
        raise Unsupported(f"reshape {list(shape)} -> {list(to)} changes the element count")
    out = ["0"] * len(to)
    for ga, gb in _groups(shape, to):
        sa = [d for d in ga if shape[d] != 1]
        sb = [d for d in gb if to[d] != 1]
        if [shape[d] for d in sa] == [to[d] for d in sb]:
            for da, db in zip(sa, sb):
                out[db] = idx[da]
            continue
        lin = linearize(tuple(idx[d] for d in ga), tuple(shape[d] for d in ga))
        for db, e in zip(gb, delinearize(lin, tuple(to[d] for d in gb))):
            out[db] = e
    return tuple(out)


def broadcast_index(idx: Index, out_shape: tuple[int, ...], shape: tuple[int, ...]) -> Index:
    """The index into an operand of `shape` broadcast to `out_shape`."""
    r, ra = len(out_shape), len(shape)
    return tuple("0" if shape[j] == 1 else idx[r - ra + j] for j in range(ra))


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# views whose element order is row-major in both shapes: a reshape of the index
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
             aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints,
             aten.unflatten.int}
_IDENTITY = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
             aten.lift_fresh_copy.default}


def _permutation(node: fx.Node) -> list[int] | None:
    """dims with out[d] = in[dims[d]] for permute/transpose/t, else None."""
    t, rank = node.target, len(shape_of(node))
    if t is aten.permute.default:
        return [_dim(d, rank) for d in node.args[1]]
    if t is aten.transpose.int:
        a, b = _dim(node.args[1], rank), _dim(node.args[2], rank)
        dims = list(range(rank))
        dims[a], dims[b] = dims[b], dims[a]
        return dims
    if t in (aten.t.default, aten.numpy_T.default):
        return list(range(rank))[::-1]
    return None


def is_view(node: fx.Node) -> bool:
    t = node.target
    return (t in _RESHAPES or t in _IDENTITY or _permutation(node) is not None
            or t in (aten.expand.default, aten.slice.Tensor, aten.select.int))


def view_input_index(node: fx.Node, idx: Index) -> Index:
    """Backwards through a view: the input's index for the view's element at `idx`."""
    src, t = node.args[0], node.target
    out_shape, in_shape = shape_of(node), shape_of(src)
    if t in _IDENTITY:
        return idx
    if t in _RESHAPES:
        return reshape_index(idx, out_shape, in_shape)
    perm = _permutation(node)
    if perm is not None:
        res = ["0"] * len(in_shape)
        for d, p in enumerate(perm):
            res[p] = idx[d]
        return tuple(res)
    if t is aten.expand.default:
        return broadcast_index(idx, out_shape, in_shape)
    if t is aten.slice.Tensor:
        d = _dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(in_shape))
        start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
        end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        if not isinstance(in_shape[d], int):
            raise Unsupported("a slice of a symbolic dimension")
        start, _, step = slice(start, end, step).indices(in_shape[d])
        res = list(idx)
        res[d] = add(str(start) if start else "0", mul(idx[d], step))
        return tuple(res)
    if t is aten.select.int:
        d = _dim(node.args[1], len(in_shape))
        i = node.args[2] + in_shape[d] if node.args[2] < 0 else node.args[2]
        return (*idx[:d], str(i), *idx[d:])
    raise Unsupported(f"view {node.target} is not lowered")


def view_output_index(node: fx.Node, idx: Index) -> Index:
    """Forwards through a one-to-one view: the view's index of its input's element at `idx`."""
    t = node.target
    out_shape, in_shape = shape_of(node), shape_of(node.args[0])
    if t in _IDENTITY or (t is aten.expand.default and out_shape == in_shape):
        return idx
    if t in _RESHAPES:
        return reshape_index(idx, in_shape, out_shape)
    perm = _permutation(node)
    if perm is not None:
        return tuple(idx[p] for p in perm)
    raise Unsupported(f"{node.target} after a template anchor is not one-to-one")


# ------------------------------------------------------------------------------------------ emitter


@dataclass(frozen=True)
class Value:
    """A Triton variable holding a body value; floats narrower than fp32 are held (exactly) in fp32."""

    name: str
    dtype: torch.dtype


def _literal(x: object) -> str:
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, float):
        if math.isinf(x):
            return 'float("inf")' if x > 0 else 'float("-inf")'
        if math.isnan(x):
            return 'float("nan")'
        return repr(x)
    if isinstance(x, int):
        return str(x)
    raise Unsupported(f"constant {x!r} is not lowered")


_NAME = re.compile(r"[A-Za-z_]\w*")
_INDEX_NAME = re.compile(r"\bi\d+\b")
_FILL = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}
_NAN = ", propagate_nan=tl.PropagateNan.ALL"


def _tiny(x: object) -> torch.Tensor | object:
    """A stand-in for type promotion: tensors keep dtype and dimensionality class, numbers stay."""
    if isinstance(x, fx.Node):
        v = x.meta["val"]
        return torch.empty(() if v.dim() == 0 else (1,), dtype=v.dtype)
    return x


class Emitter:
    """Emits the SSA lines of one Triton kernel body.

    `loads[node]` names the pointer argument of each placeholder; strides are run-time arguments
    (`s{k}_{d}`), recorded in `strides` in the order the kernel takes them.
    """

    def __init__(self, pointers: dict[fx.Node, str], mask: str | None, precise: bool = True):
        self.lines: list[str] = []
        # transcendental functions: libdevice's correctly range-reduced ones on the GPU (rotary tables take
        # sin/cos of thousands of radians); the interpreter knows only tl's
        self.math = "libdevice" if precise else "tl"
        self.pointers = pointers
        self.mask = mask
        self.strides: list[tuple[fx.Node, int]] = []
        self._stride_names: dict[tuple[fx.Node, int], str] = {}
        self._memo: dict[tuple[fx.Node, Index, str | None], Value] = {}
        self._index: dict[str, str] = {}
        self._n = 0
        self.fwd: dict[fx.Node, tuple[Index, Value]] = {}
        self.used: set[fx.Node] = set()
        self.reads: list[tuple[fx.Node, Index]] = []  # each load: the placeholder and its index (tiling reads it)
        self.cols: dict[int, str] = {}  # a row kernel's reduced dims -> their index, from its column vector
        self.zero: str | None = None  # a zero index tile of the kernel's shape (set by the kernel plan)
        # (view, its index) -> its input's index, where the input's came first (a row kernel's outputs that
        # are views of row-shaped values): read back as it was, not through the inverse index arithmetic
        self.view_back: dict[tuple[fx.Node, Index], Index] = {}
        # a row kernel: the tile axis its columns run along (1: rows x columns; 0: columns x rows, where the
        # kept dims are contiguous in memory), its current loop over the columns (None: whole rows in the tile,
        # reduced inline) and the reductions finished before it (key -> row vector)
        self.axis = 1
        self.loop: RowLoop | None = None
        self.reduced: dict[tuple, str] = {}
        # in a loop: the names that vary within it; lines using none of them go to `hoisted` (before the loop)
        self.variant: set[str] | None = None
        self.hoisted: list[str] = []
        # a row kernel's means -> the reductions of squared deviations from them (`variances`), accumulated with
        # them in one loop where `welford` (else a loop later, once the mean is known)
        self.variances: dict[fx.Node, fx.Node] = {}
        self.welford = False

    def reset(self) -> None:
        """Start another kernel function: nothing computed so far is in scope (pointers and strides stay)."""
        self.lines, self.hoisted, self.variant, self.loop = [], [], None, None
        self._memo.clear()
        self._index.clear()
        self.view_back.clear()
        self.reduced = {}

    # --------------------------------------------------------------- lines
    def emit(self, expr: str, prefix: str = "v") -> str:
        name = self.fresh(prefix)
        if self.variant is not None and self.variant.isdisjoint(_NAME.findall(expr)):
            self.hoisted.append(f"{name} = {expr}")  # loop-invariant: computed once, before the loop
            return name
        self.lines.append(f"{name} = {expr}")
        if self.variant is not None:
            self.variant.add(name)
        return name

    def bind(self, expr: str) -> str:
        """A name for `expr` (itself where it is one)."""
        return expr if expr.isidentifier() else self.emit(expr)

    def fresh(self, prefix: str = "v") -> str:
        name = f"{prefix}{self._n}"
        self._n += 1
        return name

    def index(self, expr: str) -> str:
        """A variable for an index expression (each distinct one computed once)."""
        if expr.isidentifier() or expr.isdigit():
            return expr
        if expr not in self._index:
            self._index[expr] = self.emit(expr, "i")
        return self._index[expr]

    def stride(self, node: fx.Node, d: int) -> str:
        key = (node, d)
        if key not in self._stride_names:
            self._stride_names[key] = f"s{self.pointers[node][2:]}_{d}"
            self.strides.append(key)
        return self._stride_names[key]

    def round(self, expr: str, dtype: torch.dtype) -> Value:
        """`expr` (computed in compute_dtype) rounded to `dtype`, as eager rounds each op's result."""
        if compute_dtype(dtype) != dtype:
            expr = f"{_wrap(expr)}.to({tl_dtype(dtype)}).to(tl.float32)"
        return Value(self.emit(expr), dtype)

    def cast(self, v: Value | str, frm: torch.dtype, to: torch.dtype) -> str:
        """Expression converting a value held for dtype `frm` into compute_dtype(`to`) (no rounding)."""
        name = v.name if isinstance(v, Value) else v
        cf, ct = compute_dtype(frm), compute_dtype(to)
        if cf == ct:
            return name
        if ct == torch.bool:
            return f"({_wrap(name)} != 0)"
        return f"{_wrap(name)}.to({tl_dtype(ct)})"

    # ------------------------------------------------------------ row reductions
    def keep(self) -> str:
        """The subscript restoring the reduced axis of a row vector."""
        return "[:, None]" if self.axis == 1 else "[None, :]"

    def finish(self, tile: str, kind: str, propagate_nan: bool = True) -> str:
        """A row vector reducing `tile` (padded with the kind's neutral value) along the column axis.
        tl.max/min skip a NaN; torch's amax/amin return it, so a NaN is counted where `propagate_nan`."""
        if kind == "sum":
            return self.emit(f"tl.sum({tile}, axis={self.axis}){self.keep()}")
        tile = self.bind(tile)
        m = self.emit(f"tl.{kind}({tile}, axis={self.axis}){self.keep()}")
        if not propagate_nan:
            return m
        nans = self.emit(f"tl.sum(({tile} != {tile}).to(tl.int32), axis={self.axis}){self.keep()}")
        return self.emit(f"tl.where({nans} > 0, float('nan'), {m})")

    def finish_rows(self, tiles: dict[tuple, tuple[str, str, bool]], means: dict[tuple, tuple[tuple, tuple]],
                    counts: str, partial: bool = False) -> dict[tuple, str]:
        """Row vectors of accumulated tiles, key -> (tile, kind, propagate_nan): a loop's lanes, or the partial
        results of a split's programs. A sum of squared deviations (a key of `means`, -> the keys of its mean's
        sum and of the shifts that sum is taken from) combines with them by Chan et al.'s formula
        (`welford_combine`), `counts` (a tile) the number of columns behind each entry; the mean's row is its sum,
        or with `partial` its shift and the sum less it (to be combined again)."""
        rows: dict[tuple, str] = {}
        n = self.emit(counts) if means else ""
        for key, (mean, shift) in means.items():
            k, t, q, c = self.fresh(), self.fresh(), self.fresh(), self.fresh()
            self.lines.append(f"{k}, {t}, {q}, {c} = tl.reduce(({tiles[shift][0]}, {tiles[mean][0]}, "
                              f"{tiles[key][0]}, {n}), {self.axis}, welford_combine)")
            if partial:
                rows[shift], rows[mean] = self.emit(f"{k}{self.keep()}"), self.emit(f"{t}{self.keep()}")
                rows[key] = self.emit(f"{q}{self.keep()}")
                continue
            rows[mean] = self.emit(f"({k} * {c} + {t}){self.keep()}")
            # an infinite value makes the two-pass deviations NaN (inf - inf), as eager's are
            rows[key] = self.emit(f"tl.where(tl.abs({rows[mean]}) < float('inf'), {q}{self.keep()}, float('nan'))")
        shifts = {shift for _, shift in means.values()}
        for key, (tile, kind, nan) in tiles.items():
            if key not in rows and key not in shifts:
                rows[key] = self.finish(tile, kind, nan)
        return rows

    def row_reduce(self, node: fx.Node, stage: int, row: Index, kind: str, element: Callable[[], str],
                   dtype: torch.dtype, propagate_nan: bool = True, m2: tuple[fx.Node, int] | None = None) -> str:
        """The `kind` ("sum", "max", "min") of `element()` over the columns, at row index `row` (the kept dims),
        computed in compute_dtype(`dtype`); `stage` tells a node's reductions apart (a norm's mean and variance).
        Whole rows reduce inline; in a loop a finished result is read, any other accumulates and raises Later.
        `m2`: the (node, stage) summing the squared deviations of `element()` from this sum's mean, which a loop
        accumulates with it where the emitter is `welford`."""
        fill = _FILL[kind]
        if self.loop is None:
            return self.finish(f"tl.where({self.mask}, {element()}, {fill})", kind, propagate_nan)
        key = (node, stage, self.canonical(row))
        if key in self.reduced:
            return self.reduced[key]
        if self.loop is CLOSED:
            raise Unsupported(f"{node.name} is needed at a row index no loop reduced")
        if key not in self.loop.pending:
            v = element()
            acc, tdt = self.fresh("acc"), tl_dtype(compute_dtype(dtype))
            self.loop.init.append(f"{acc} = tl.full({self.loop.tile}, {fill}, {tdt})")
            deviations = (m2[0], m2[1], key[2]) if m2 is not None else None
            if deviations is not None and self._one_pass(kind, tdt, deviations):
                self._welford(key, deviations, acc, self.bind(v))
            else:
                new = f"tl.where({self.mask}, {v}, {fill})"
                step = {"sum": f"{acc} + {new}",
                        "max": f"tl.maximum({acc}, {new}{_NAN if propagate_nan else ''})",
                        "min": f"tl.minimum({acc}, {new}{_NAN if propagate_nan else ''})"}[kind]
                self.lines.append(f"{acc} = {step}")
            self.loop.pending[key] = (acc, kind, propagate_nan, tdt)
        raise Later(node.name)

    def _one_pass(self, kind: str, tdt: str, deviations: tuple) -> bool:
        """Whether a sum accumulates with the squared deviations from its mean: in fp32, under the loop's own mask
        (where a lane past a row's end stays past it, so its count is known), the deviations not done already."""
        return (self.welford and kind == "sum" and tdt == "tl.float32" and bool(self.loop.ordinal)
                and self.mask == self.loop.mask and deviations not in self.reduced
                and deviations not in self.loop.pending)

    def _welford(self, key: tuple, deviations: tuple, acc: str, v: str) -> None:
        """Welford's update per lane, shifted by the lane's first value (so the sums stay near zero for rows of a
        large mean): a lane in the loop's mask has counted `ordinal` columns before this chunk's (the lanes past a
        row's end are past it in every later chunk), so its M2 grows by (u - mean)^2 * i / (i + 1), u the shifted
        value and the mean that of its sum so far. `acc` sums the shifted values."""
        shift, q, i = self.fresh("acc"), self.fresh("acc"), self.loop.ordinal
        self.loop.init += [f"{shift} = tl.full({self.loop.tile}, 0.0, tl.float32)",
                           f"{q} = tl.full({self.loop.tile}, 0.0, tl.float32)"]
        before, weight = self.index(f"1.0 / tl.maximum({i}, 1)"), self.index(f"{i} / ({i} + 1)")
        u, d = self.fresh("u"), self.fresh("d")
        self.lines += [f"{shift} = tl.where({self.mask} & ({i} == 0), {v}, {shift})",
                       f"{u} = {v} - {shift}",
                       f"{d} = {u} - {acc} * {before}",
                       f"{q} = {q} + tl.where({self.mask}, {d} * {d} * {weight}, 0.0)",
                       f"{acc} = {acc} + tl.where({self.mask}, {u}, 0.0)"]
        self.loop.pending[(*key, "shift")] = (shift, "shift", False, "tl.float32")
        self.loop.pending[deviations] = (q, "sum", False, "tl.float32")
        self.loop.means[deviations] = (key, (*key, "shift"))

    def canonical(self, idx: Index) -> Index:
        """`idx` with its index variables spelled out: the same index in every loop and kernel of a plan."""
        names = {v: k for k, v in self._index.items()}

        def expand(e: str) -> str:
            return _INDEX_NAME.sub(lambda m: f"({expand(names[m.group()])})" if m.group() in names else m.group(),
                                   e)
        return tuple(expand(str(e)) for e in idx)

    # ----------------------------------------------------------- evaluation
    def value(self, x: object, idx: Index) -> Value | str:
        """`x` at `idx`: a Value for nodes, a literal for numbers."""
        if not isinstance(x, fx.Node):
            return _literal(x)
        if x in self.fwd:
            fidx, v = self.fwd[x]
            if tuple(idx) != fidx:
                raise Unsupported(f"{x.name} (computed by the template) is needed at another index")
            return v
        key = (x, tuple(idx), self.mask)
        if key not in self._memo:
            self._memo[key] = self._eval(x, tuple(idx))
        return self._memo[key]

    def operand(self, node: fx.Node, x: object, idx: Index, dtype: torch.dtype) -> str:
        """Operand `x` of `node` at node's `idx`, broadcast, as an expression of compute_dtype(dtype)."""
        if not isinstance(x, fx.Node):
            return _literal(x)
        v = self.value(x, broadcast_index(idx, shape_of(node), shape_of(x)))
        return self.cast(v, v.dtype, dtype)

    def masked_value(self, x: fx.Node, idx: Index, cond: str) -> Value:
        """`x` at `idx` where `cond` holds (loads elsewhere are skipped and read as 0)."""
        outer = self.mask
        self.mask = cond if outer is None else f"{outer} & {cond}"
        try:
            return self.value(x, idx)
        finally:
            self.mask = outer

    def load(self, node: fx.Node, idx: Index) -> Value:
        shape = shape_of(node)
        if node not in self.pointers:
            raise Unsupported(f"{node.name} is not an input of this kernel")
        offset = add(*(f"{self.index(e)} * {self.stride(node, d)}"
                       for d, (e, s) in enumerate(zip(idx, shape)) if s != 1 and e != "0"))
        ptr = self.pointers[node]
        self.used.add(node)
        self.reads.append((node, tuple(idx)))
        if offset == "0":
            expr = f"tl.load({ptr})"
        else:
            m = f", mask={self.mask}, other=0" if self.mask else ""
            if m and self.zero is not None and all(e.lstrip("-").isdigit() for e, s in zip(idx, shape) if s != 1):
                offset = f"{self.zero} + {offset}"  # one element at every lane: a tile of pointers, as its mask is
            expr = f"tl.load({ptr} + {offset}{m})"
        dtype = dtype_of(node)
        if compute_dtype(dtype) != dtype:
            expr += ".to(tl.float32)"
        return Value(self.emit(expr), dtype)

    def _eval(self, node: fx.Node, idx: Index) -> Value:
        if node.op == "placeholder":
            return self.load(node, idx)
        if node.op != "call_function":
            raise Unsupported(f"{node.op} {node.target} in a kernel body")
        if is_view(node):
            back = self.view_back.get((node, tuple(idx)))
            return self.value(node.args[0], back if back is not None else view_input_index(node, idx))
        rule = RULES.get(node.target) or REDUCTIONS.get(node.target)
        if rule is None:
            raise Unsupported(f"{node.target} has no Triton lowering")
        return rule(self, node, idx)

    # ------------------------------------------------- forward from an anchor
    def seed(self, node: fx.Node, idx: Index, v: Value) -> None:
        self.fwd[node] = (tuple(idx), v)

    def forward(self, node: fx.Node) -> None:
        """Evaluate `node`, which depends on a seeded anchor, at the index its anchor-derived input has."""
        derived = [x for x in node.all_input_nodes if x in self.fwd]
        if is_view(node):
            idx = view_output_index(node, self.fwd[node.args[0]][0])
            self.fwd[node] = (idx, self.fwd[node.args[0]][1])
            return
        same = [x for x in derived if shape_of(x) == shape_of(node)]
        if not same:
            raise Unsupported(f"{node.name} broadcasts a template result")
        idx = self.fwd[same[0]][0]
        rule = RULES.get(node.target)
        if rule is None:
            raise Unsupported(f"{node.target} has no Triton lowering")
        self.fwd[node] = (idx, rule(self, node, idx))


# ------------------------------------------------------------------------------------ pointwise rules


def _arg(node: fx.Node, i: int, name: str, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _binary(fmt: str, *, compare: bool = False):
    def rule(em: Emitter, node: fx.Node, idx: Index) -> Value:
        a, b = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        out = dtype_of(node)
        common = torch.result_type(_tiny(a), _tiny(b)) if compare else out
        ea, eb = em.operand(node, a, idx, common), em.operand(node, b, idx, common)
        if alpha != 1:
            eb = f"{_wrap(eb)} * {_literal(alpha)}"
        expr = fmt.format(a=_wrap(ea), b=_wrap(eb))
        return Value(em.emit(expr), torch.bool) if compare else em.round(expr, out)
    return rule


def _unary(fmt: str):
    def rule(em: Emitter, node: fx.Node, idx: Index) -> Value:
        out = dtype_of(node)
        if not out.is_floating_point and fmt not in ("-{x}", "tl.abs({x})"):
            raise Unsupported(f"{node.target} on {out}")
        x = em.operand(node, node.args[0], idx, out)
        return em.round(fmt.format(x=_wrap(x), m=em.math), out)
    return rule


def _gelu(x: str, approximate: str, m: str) -> str:
    if approximate == "tanh":
        inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"0.5 * {x} * (1.0 + {_tanh(inner, m)})"
    return f"0.5 * {x} * (1.0 + {m}.erf({x} * 0.7071067811865476))"


def _tanh(x: str, m: str) -> str:
    return f"{m}.tanh({x})" if m == "libdevice" else f"(2.0 * tl.sigmoid(2.0 * ({x})) - 1.0)"


def _silu(x: str) -> str:
    return f"{x} * tl.sigmoid({x})"


def _act(em: Emitter, node: fx.Node, idx: Index, fn) -> Value:
    out = dtype_of(node)
    x = em.operand(node, node.args[0], idx, out)
    xv = em.bind(x)
    return em.round(fn(xv), out)


def _pow(em: Emitter, node: fx.Node, idx: Index) -> Value:
    out, e = dtype_of(node), node.args[1]
    x = em.operand(node, node.args[0], idx, out)
    forms = {2: "{x} * {x}", 3: "{x} * {x} * {x}", 1: "{x}", 0.5: "tl.sqrt({x})", -1: "1.0 / {x}",
             -0.5: "tl.rsqrt({x})"}
    if e not in forms or (not out.is_floating_point and e not in (1, 2, 3)):
        raise Unsupported(f"pow with exponent {e!r}")
    return em.round(forms[e].format(x=_wrap(x)), out)


def _to(em: Emitter, node: fx.Node, idx: Index) -> Value:
    out = dtype_of(node)
    src = node.args[0]
    v = em.value(src, broadcast_index(idx, shape_of(node), shape_of(src)))
    if v.dtype == out:
        return v
    return em.round(em.cast(v, v.dtype, out), out)


def _where(em: Emitter, node: fx.Node, idx: Index) -> Value:
    cond, a, b = node.args[:3]
    out = dtype_of(node)
    c = em.operand(node, cond, idx, torch.bool)
    return em.round(f"tl.where({c}, {em.operand(node, a, idx, out)}, {em.operand(node, b, idx, out)})", out)


def _masked_fill(em: Emitter, node: fx.Node, idx: Index) -> Value:
    x, cond, fill = node.args[:3]
    out = dtype_of(node)
    c = em.operand(node, cond, idx, torch.bool)
    return em.round(f"tl.where({c}, {em.operand(node, fill, idx, out)}, {em.operand(node, x, idx, out)})", out)


def _clamp(em: Emitter, node: fx.Node, idx: Index) -> Value:
    out = dtype_of(node)
    e = em.operand(node, node.args[0], idx, out)
    lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    if lo is not None:
        e = f"tl.maximum({e}, {em.operand(node, lo, idx, out)}, propagate_nan=tl.PropagateNan.ALL)"
    if hi is not None:
        e = f"tl.minimum({e}, {em.operand(node, hi, idx, out)}, propagate_nan=tl.PropagateNan.ALL)"
    return em.round(e, out)


def _rotary(em: Emitter, node: fx.Node, idx: Index) -> Value:
    """x * cos + rotate_half(x) * sin; rotate_half reads x[j + half] (first half) or x[j - half] (second half),
    as two masked loads whose addresses stay affine in j (so they vectorise)."""
    x, cos, sin = node.args
    out, xd = dtype_of(node), dtype_of(x)
    n = shape_of(x)[-1]
    if n % 2:
        raise Unsupported("rotary over an odd last dimension")
    h = n // 2
    xi = broadcast_index(idx, shape_of(node), shape_of(x))
    j = em.index(xi[-1])
    first = em.emit(f"{j} < {h}", "c")
    xv = em.cast(em.value(x, xi), xd, out)
    hi = em.masked_value(x, (*xi[:-1], em.index(f"{j} + {h}")), first)
    lo = em.masked_value(x, (*xi[:-1], em.index(f"{j} - {h}")), f"({first} == 0)")
    # rotate_half is computed in x's dtype: -x[j + h] for the first half, x[j - h] for the second
    rot = em.cast(Value(em.emit(f"tl.where({first}, -{hi.name}, {lo.name})"), xd), xd, out)
    a = em.round(f"{xv} * {em.operand(node, cos, idx, out)}", out)
    b = em.round(f"{rot} * {em.operand(node, sin, idx, out)}", out)
    return em.round(f"{a.name} + {b.name}", out)


def _gated(em: Emitter, node: fx.Node, idx: Index) -> Value:
    gate, up, act = node.args
    out, gd = dtype_of(node), dtype_of(gate)
    g = em.operand(node, gate, idx, gd)
    gv = em.bind(g)
    if act == "silu":
        a = em.round(_silu(gv), gd)
    elif act in ("gelu", "gelu_tanh"):
        a = em.round(_gelu(gv, "tanh" if act == "gelu_tanh" else "none", em.math), gd)
    else:
        raise Unsupported(f"gated activation {act!r}")
    return em.round(f"{em.cast(a, gd, out)} * {em.operand(node, up, idx, out)}", out)


# torch's max/min/clamp/relu return a NaN operand; tl.maximum/minimum skip it unless told
MAX = "tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"
MIN = "tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"

RULES = {
    aten.add.Tensor: _binary("{a} + {b}"), aten.add.Scalar: _binary("{a} + {b}"),
    aten.sub.Tensor: _binary("{a} - {b}"), aten.sub.Scalar: _binary("{a} - {b}"),
    aten.rsub.Scalar: _binary("{b} - {a}"), aten.rsub.Tensor: _binary("{b} - {a}"),
    aten.mul.Tensor: _binary("{a} * {b}"), aten.mul.Scalar: _binary("{a} * {b}"),
    aten.maximum.default: _binary(MAX), aten.minimum.default: _binary(MIN),
    aten.eq.Tensor: _binary("{a} == {b}", compare=True), aten.eq.Scalar: _binary("{a} == {b}", compare=True),
    aten.ne.Tensor: _binary("{a} != {b}", compare=True), aten.ne.Scalar: _binary("{a} != {b}", compare=True),
    aten.lt.Tensor: _binary("{a} < {b}", compare=True), aten.lt.Scalar: _binary("{a} < {b}", compare=True),
    aten.le.Tensor: _binary("{a} <= {b}", compare=True), aten.le.Scalar: _binary("{a} <= {b}", compare=True),
    aten.gt.Tensor: _binary("{a} > {b}", compare=True), aten.gt.Scalar: _binary("{a} > {b}", compare=True),
    aten.ge.Tensor: _binary("{a} >= {b}", compare=True), aten.ge.Scalar: _binary("{a} >= {b}", compare=True),
    aten.logical_and.default: _binary("({a} != 0) & ({b} != 0)", compare=True),
    aten.logical_or.default: _binary("({a} != 0) | ({b} != 0)", compare=True),
    aten.neg.default: _unary("-{x}"), aten.abs.default: _unary("tl.abs({x})"),
    aten.exp.default: _unary("tl.exp({x})"), aten.log.default: _unary("tl.log({x})"),
    aten.sqrt.default: _unary("tl.sqrt({x})"), aten.rsqrt.default: _unary("tl.rsqrt({x})"),
    aten.reciprocal.default: _unary("1.0 / {x}"), aten.sin.default: _unary("{m}.sin({x})"),
    aten.clamp_min.default: _binary(MAX), aten.clamp_max.default: _binary(MIN),
    aten.cos.default: _unary("{m}.cos({x})"), aten.sigmoid.default: _unary("tl.sigmoid({x})"),
    aten.tanh.default: lambda em, n, i: _act(em, n, i, lambda x: _tanh(x, em.math)),
    aten.erf.default: _unary("{m}.erf({x})"),
    aten.relu.default: _unary("tl.maximum({x}, 0.0, propagate_nan=tl.PropagateNan.ALL)"),
    aten.pow.Tensor_Scalar: _pow, aten.where.self: _where, aten.masked_fill.Scalar: _masked_fill,
    aten.clamp.default: _clamp,
    aten._to_copy.default: _to, aten.to.dtype: _to, aten.to.dtype_layout: _to, aten.type_as.default: _to,
    aten.silu.default: lambda em, n, i: _act(em, n, i, _silu),
    aten.gelu.default: lambda em, n, i: _act(em, n, i, lambda x: _gelu(x, _arg(n, 1, "approximate", "none"), em.math)),
    tx.silu.default: lambda em, n, i: _act(em, n, i, _silu),
    tx.gelu.default: lambda em, n, i: _act(em, n, i, lambda x: _gelu(x, n.args[1], em.math)),
    tx.gated_act.default: _gated, tx.rotary.default: _rotary,
}


def _div_rule(em: Emitter, node: fx.Node, idx: Index) -> Value:
    if node.kwargs.get("rounding_mode") is not None or (len(node.args) > 2 and node.args[2] is not None):
        raise Unsupported("division with a rounding mode")
    return _binary("{a} / {b}")(em, node, idx)


RULES[aten.div.Tensor] = _div_rule
RULES[aten.div.Scalar] = _div_rule


def _float_only(rule):
    """A rule for floating-point operands only (integer remainders and divisions follow C on the GPU and
    numpy in the interpreter: neither is torch's)."""
    def checked(em: Emitter, node: fx.Node, idx: Index) -> Value:
        if not all(dtype_of(x).is_floating_point for x in node.all_input_nodes):
            raise Unsupported(f"{node.target} on integers")
        return rule(em, node, idx)
    return checked


def _gpu_only(rule):
    """A rule calling libdevice, which Triton's interpreter does not run (kernels there keep the library)."""
    def checked(em: Emitter, node: fx.Node, idx: Index) -> Value:
        if em.math != "libdevice":
            raise Unsupported(f"{node.target} needs libdevice")
        return rule(em, node, idx)
    return _float_only(checked)


def _div_mode(em: Emitter, node: fx.Node, idx: Index) -> Value:
    mode = _arg(node, 2, "rounding_mode")
    q = _binary("{a} / {b}")(em, node, idx)
    if mode == "trunc":
        return em.round(f"tl.where({q.name} < 0, tl.ceil({q.name}), tl.floor({q.name}))", dtype_of(node))
    if mode is None:
        return q
    raise Unsupported("floor division (torch floors the exact quotient, not the rounded one)")


def _round_half_even(em: Emitter, node: fx.Node, idx: Index) -> Value:
    out = dtype_of(node)
    x = em.emit(em.operand(node, node.args[0], idx, out))
    r = em.emit(f"tl.floor({x} + 0.5)")
    even = f"tl.where(({r} - {x} == 0.5) & ({r} - 2.0 * tl.floor({r} * 0.5) != 0.0), {r} - 1.0, {r})"
    return em.round(f"tl.where(tl.abs({x}) >= 8388608.0, {x}, {even})", out)  # from 2**23 on, x is whole


def _remainder(em: Emitter, node: fx.Node, idx: Index) -> Value:
    out = dtype_of(node)
    a, b = (em.emit(em.operand(node, y, idx, out)) for y in node.args[:2])
    m = em.emit(f"libdevice.fmod({a}, {b})")
    return em.round(f"tl.where(({m} != 0) & (({m} < 0) != ({b} < 0)), {m} + {b}, {m})", out)


def _logical_not(em: Emitter, node: fx.Node, idx: Index) -> Value:
    x = node.args[0]
    if node.target is aten.bitwise_not.default and dtype_of(x) != torch.bool:
        return em.round(f"~{_wrap(em.operand(node, x, idx, dtype_of(node)))}", dtype_of(node))
    v = em.value(x, broadcast_index(idx, shape_of(node), shape_of(x)))
    return Value(em.emit(f"{_wrap(v.name)} == 0"), torch.bool)


def _is(fmt: str):
    def rule(em: Emitter, node: fx.Node, idx: Index) -> Value:
        x = em.emit(em.operand(node, node.args[0], idx, torch.float32))
        return Value(em.emit(fmt.format(x=x)), torch.bool)
    return rule


_AND, _OR, _XOR = _binary("{a} & {b}"), _binary("{a} | {b}"), _binary("{a} ^ {b}")
RULES.update({
    aten.bitwise_and.Tensor: _AND, aten.bitwise_and.Scalar: _AND, aten.__and__.Tensor: _AND, aten.__and__.Scalar: _AND,
    aten.bitwise_or.Tensor: _OR, aten.bitwise_or.Scalar: _OR, aten.__or__.Tensor: _OR, aten.__or__.Scalar: _OR,
    aten.bitwise_xor.Tensor: _XOR, aten.bitwise_xor.Scalar: _XOR, aten.__xor__.Tensor: _XOR, aten.__xor__.Scalar: _XOR,
    aten.logical_xor.default: _binary("({a} != 0) ^ ({b} != 0)", compare=True),
    aten.logical_not.default: _logical_not, aten.bitwise_not.default: _logical_not,
    aten.floor.default: _unary("tl.floor({x})"), aten.ceil.default: _unary("tl.ceil({x})"),
    aten.trunc.default: _unary("tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))"),
    aten.round.default: _float_only(_round_half_even), aten.log2.default: _unary("tl.log2({x})"),
    aten.log10.default: _unary("tl.log2({x}) * 0.30102999566398120"),
    aten.sign.default: _unary("tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"),
    aten.isinf.default: _is("tl.abs({x}) == float(\"inf\")"), aten.isnan.default: _is("{x} != {x}"),
    aten.clamp.Tensor: _clamp, aten.div.Tensor_mode: _float_only(_div_mode),
    aten.div.Scalar_mode: _float_only(_div_mode),
    # libdevice's on the GPU (the interpreter has no tl equivalents)
    aten.tan.default: _gpu_only(_unary("libdevice.tan({x})")),
    aten.expm1.default: _gpu_only(_unary("libdevice.expm1({x})")),
    aten.log1p.default: _gpu_only(_unary("libdevice.log1p({x})")),
    aten.asin.default: _gpu_only(_unary("libdevice.asin({x})")),
    aten.acos.default: _gpu_only(_unary("libdevice.acos({x})")),
    aten.atan.default: _gpu_only(_unary("libdevice.atan({x})")),
    aten.sinh.default: _gpu_only(_unary("libdevice.sinh({x})")),
    aten.cosh.default: _gpu_only(_unary("libdevice.cosh({x})")),
    aten.asinh.default: _gpu_only(_unary("libdevice.asinh({x})")),
    aten.acosh.default: _gpu_only(_unary("libdevice.acosh({x})")),
    aten.atanh.default: _gpu_only(_unary("libdevice.atanh({x})")),
    aten.atan2.default: _gpu_only(_binary("libdevice.atan2({a}, {b})")),
    aten.pow.Tensor_Tensor: _gpu_only(_binary("libdevice.pow({a}, {b})")),
    aten.pow.Scalar: _gpu_only(_binary("libdevice.pow({a}, {b})")),
    aten.fmod.Tensor: _gpu_only(_binary("libdevice.fmod({a}, {b})")),
    aten.fmod.Scalar: _gpu_only(_binary("libdevice.fmod({a}, {b})")),
    aten.remainder.Tensor: _gpu_only(_remainder), aten.remainder.Scalar: _gpu_only(_remainder),
})


def _constant(em: Emitter, node: fx.Node, idx: Index) -> Value:
    value = node.args[0] if node.target is aten.scalar_tensor.default else node.args[1]
    return em.round(_literal(value) if dtype_of(node).is_floating_point else str(int(value)), dtype_of(node))


RULES[aten.scalar_tensor.default] = _constant
RULES[aten.full.default] = _constant


# gathers (fxcc.gather): an output element from input elements at computed indices; loads outside a source
# are masked off, and the value chosen after
def _ix(em: Emitter, e: str) -> str:
    """Index `e` as a tensor of the kernel's tile: a size-1 dim's index is the number 0, and conditions on
    plain numbers are no masks (the kernel plan names a zero tile, `em.zero`)."""
    if not e.isdigit():
        return e
    if em.zero is None:
        raise Unsupported("a gather over a size-1 dim outside a kernel plan")
    return em.zero if e == "0" else f"{em.zero} + {e}"


def _between(e: str, lo: int, hi: int) -> str:
    return f"({_wrap(e)} >= {lo}) & ({_wrap(e)} < {hi})"


def _wrap_index(e: str, n: int) -> str:
    """e mod n for e in [-n, 2n)."""
    e, n = _wrap(e), _wrap(n)
    return f"tl.where({e} < 0, {e} + {n}, tl.where({e} >= {n}, {e} - {n}, {e}))"


def _cat(em: Emitter, node: fx.Node, idx: Index) -> Value:
    tensors, out = node.args[0], dtype_of(node)
    rank = len(shape_of(node))
    dim = _dim(_arg(node, 1, "dim", 0), rank)
    e, off = None, 0
    parts = []
    for t in tensors:
        if len(shape_of(t)) != rank:  # a legacy empty 1-D tensor
            continue
        parts.append((t, off, shape_of(t)[dim]))
        off += shape_of(t)[dim]
    at = _ix(em, idx[dim])
    for t, start, n in reversed(parts):
        cond = em.index(_between(at, start, start + n))
        src = (*idx[:dim], em.index(f"{_wrap(at)} - {start}") if start else idx[dim], *idx[dim + 1:])
        v = em.cast(em.masked_value(t, src, cond), dtype_of(t), out)
        e = v if e is None else em.emit(f"tl.where({cond}, {v}, {e})")
    return em.round(e, out)


def _pad(em: Emitter, node: fx.Node, idx: Index) -> Value:
    p = gather.pad(node)
    x, out = node.args[0], dtype_of(node)
    sizes = shape_of(x)
    first = len(sizes) - len(p.before)
    src, conds = list(idx), []
    for j, b in enumerate(p.before):
        d, n = first + j, sizes[first + j]
        i = _ix(em, idx[d])
        e = f"{_wrap(i)} - {b}" if b > 0 else f"{_wrap(i)} + {-b}" if b < 0 else i
        if p.mode == "constant":
            conds.append(_between(e, 0, n))
        elif p.mode == "reflect":
            e = f"{n - 1} - tl.abs({n - 1} - tl.abs({e}))"
        elif p.mode == "replicate":
            e = f"tl.minimum(tl.maximum({e}, 0), {n - 1})"
        else:
            e = _wrap_index(e, n)
        src[d] = em.index(e)
    if not conds:
        return em.round(em.cast(em.value(x, tuple(src)), dtype_of(x), out), out)
    cond = em.index(" & ".join(f"({c})" for c in conds))
    v = em.cast(em.masked_value(x, tuple(src), cond), dtype_of(x), out)
    return em.round(f"tl.where({cond}, {v}, {_literal(p.value)})", out)


def _roll(em: Emitter, node: fx.Node, idx: Index) -> Value:
    x, shifts = node.args[0], node.args[1]
    dims = _arg(node, 2, "dims", [])
    shape = shape_of(node)
    if not dims:
        n = math.prod(shape)
        lin = em.index(_wrap_index(f"{_wrap(_ix(em, linearize(idx, shape)))} - {_wrap(shifts[0] % n)}", n))
        return em.value(x, tuple(em.index(e) for e in delinearize(lin, shape)))
    src = list(idx)
    for d, k in zip(dims, shifts):
        d = _dim(d, len(shape))
        src[d] = em.index(_wrap_index(f"{_wrap(_ix(em, idx[d]))} - {_wrap(k % shape[d])}", shape[d]))
    return em.value(x, tuple(src))


def _pool(em: Emitter, node: fx.Node, idx: Index) -> Value:
    p = gather.pool(node)
    x, out = node.args[0], dtype_of(node)
    sizes = shape_of(x)
    k = len(p.kernel)
    first = len(sizes) - k
    starts = [em.index(f"{_wrap(_ix(em, idx[first + d]))} * {p.stride[d]} - {p.padding[d]}") for d in range(k)]
    acc = None
    for tap in p.taps():
        pos = [em.index(f"{starts[d]} + {tap[d] * p.dilation[d]}") for d in range(k)]
        cond = em.index(" & ".join(f"({_between(q, 0, n)})" for q, n in zip(pos, sizes[first:])))
        v = em.cast(em.masked_value(x, (*idx[:first], *pos), cond), dtype_of(x), torch.float32)
        fill = 'float("-inf")' if p.kind == "max" else "0.0"
        v = em.emit(f"tl.where({cond}, {v}, {fill})")
        if acc is None:
            acc = v
        else:
            acc = em.emit(f"tl.maximum({acc}, {v}, propagate_nan=tl.PropagateNan.ALL)" if p.kind == "max" else f"{acc} + {v}")
    if p.kind == "avg":
        if p.divisor:
            div = f"{float(p.divisor)}"
        else:
            counts = []
            for d, (s0, n) in enumerate(zip(starts, sizes[first:])):
                end = f"tl.minimum({s0} + {p.kernel[d]}, {n + p.padding[d]})"
                counts.append(f"({end} - {s0})" if p.count_include_pad
                              else f"(tl.minimum({end}, {n}) - tl.maximum({s0}, 0))")
            div = em.emit(f"({' * '.join(counts)}).to(tl.float32)")
        acc = em.emit(f"{acc} / {div}")
    return em.round(em.cast(Value(acc, torch.float32), torch.float32, out), out)


def _generated(rule):
    """A gather's rule, for the cases fxcc.gather says are generated (small windows, no empty operands)."""
    def checked(em: Emitter, node: fx.Node, idx: Index) -> Value:
        if not gather.generated(node):
            raise Unsupported(f"{node.target} with these arguments is left to the library")
        return rule(em, node, idx)
    return checked


RULES[aten.cat.default] = _generated(_cat)
RULES[aten.roll.default] = _generated(_roll)
for _t in gather.PADS:
    RULES[_t] = _generated(_pad)
for _t in (*gather.MAX_POOL, *gather.AVG_POOL):
    RULES[_t] = _generated(_pool)


# ------------------------------------------------------------------------------------ reduction rules


def reduced_dims(node: fx.Node) -> tuple[int, ...]:
    """The dims of its input a supported reduction reduces (sorted)."""
    d = domain(node)
    if d is None:
        raise Unsupported(f"reduction {node.target} has no Triton lowering")
    return d[1]


def _row_input(em: Emitter, node: fx.Node, idx: Index) -> tuple[fx.Node, Index, Index]:
    """The reduction's input, its index (the kernel's column index, `em.cols`, in the reduced dims) and the
    row's index (the kept dims')."""
    x = node.args[0]
    rank, dims = len(shape_of(x)), reduced_dims(node)
    if any(d not in em.cols for d in dims):
        raise Unsupported(f"{node.name} reduces other dims than the kernel's columns")
    if len(shape_of(node)) == rank:  # keepdim, or a same-shape normalisation
        xi = tuple(em.cols[d] if d in dims else idx[d] for d in range(rank))
    else:
        kept = iter(idx)
        xi = tuple(em.cols[d] if d in dims else next(kept) for d in range(rank))
    return x, xi, tuple(e for d, e in enumerate(xi) if d not in dims)


def _reduce(kind: str):
    def rule(em: Emitter, node: fx.Node, idx: Index) -> Value:
        x, xi, row = _row_input(em, node, idx)
        out, xd = dtype_of(node), dtype_of(x)
        if not xd.is_floating_point:
            raise Unsupported(f"{kind} over {xd}")
        n = math.prod(shape_of(x)[d] for d in reduced_dims(node))
        m2 = (em.variances[node], 0) if node in em.variances else None
        r = em.row_reduce(node, 0, row, "sum" if kind == "mean" else kind,
                          lambda: em.cast(em.value(x, xi), xd, out), out, m2=m2)
        return em.round(f"{r} / {n}" if kind == "mean" else r, out)
    return rule


def _row_check(em: Emitter, node: fx.Node, idx: Index) -> Index:
    """Norms and softmax are lowered over trailing dims, the kernel's columns, at the columns' own index; the
    row's index (the kept dims')."""
    dims = reduced_dims(node)
    if any(em.cols.get(d) != idx[d] for d in dims):
        raise Unsupported(f"{node.name} is needed at another column than its row's")
    return tuple(e for d, e in enumerate(idx) if d not in dims)


def _rms_norm(em: Emitter, node: fx.Node, idx: Index) -> Value:
    row = _row_check(em, node, idx)
    x, w, eps = node.args
    xd, out = dtype_of(x), dtype_of(node)
    xf = em.cast(em.value(x, idx), xd, torch.float32)
    n = shape_of(x)[-1]
    s = em.row_reduce(node, 0, row, "sum", lambda: f"{xf} * {xf}", torch.float32)
    ms = em.emit(f"{s} / {n}")
    y = em.round(f"{xf} * tl.rsqrt({ms} + {_literal(float(eps))})", xd)
    if w is None:
        return y
    return em.round(f"{em.cast(y, xd, out)} * {em.operand(node, w, idx, out)}", out)


def _layer_norm(em: Emitter, node: fx.Node, idx: Index) -> Value:
    """The mean, then the mean of the centred squares (a loop over long rows accumulates both at once)."""
    row = _row_check(em, node, idx)
    x, normalized, w, b, eps = node.args
    xd, out = dtype_of(x), dtype_of(node)
    n = math.prod(shape_of(x)[-len(normalized):])
    xf = em.bind(em.cast(em.value(x, idx), xd, torch.float32))
    mean = em.emit(f"{em.row_reduce(node, 0, row, 'sum', lambda: xf, torch.float32, m2=(node, 1))} / {n}")
    d = em.emit(f"{xf} - {mean}")
    var = em.emit(f"{em.row_reduce(node, 1, row, 'sum', lambda: f'{d} * {d}', torch.float32)} / {n}")
    y = f"{d} * tl.rsqrt({var} + {_literal(float(eps))})"
    if w is not None:
        y = f"{y} * {em.operand(node, w, idx, torch.float32)}"
    if b is not None:
        y = f"{y} + {em.operand(node, b, idx, torch.float32)}"
    return em.round(y, out)


def _softmax(log: bool):
    def rule(em: Emitter, node: fx.Node, idx: Index) -> Value:
        row = _row_check(em, node, idx)
        x, dim = node.args[0], node.args[1]
        if _dim(dim, len(shape_of(x))) != len(shape_of(x)) - 1:
            raise Unsupported("softmax over another dimension than the last")
        if node.target is aten._softmax.default and node.args[2]:
            raise Unsupported("half-to-float softmax")
        xd, out = dtype_of(x), dtype_of(node)
        xf = em.bind(em.cast(em.value(x, idx), xd, torch.float32))
        # a NaN need not propagate through the max: exp(NaN - m) makes the sum, and so the whole row, NaN
        m = em.row_reduce(node, 0, row, "max", lambda: xf, torch.float32, propagate_nan=False)
        e = em.emit(f"tl.exp({xf} - {m})")
        s = em.row_reduce(node, 1, row, "sum", lambda: e, torch.float32)
        return em.round(f"{xf} - {m} - tl.log({s})" if log else f"{e} / {s}", out)
    return rule


REDUCTIONS = {
    aten.sum.dim_IntList: _reduce("sum"), aten.mean.dim: _reduce("mean"), aten.amax.default: _reduce("max"),
    aten.sum.default: _reduce("sum"), aten.mean.default: _reduce("mean"),
    aten.amin.default: _reduce("min"), tx.rms_norm.default: _rms_norm, tx.layer_norm.default: _layer_norm,
    tx.softmax.default: _softmax(False), aten._softmax.default: _softmax(False), aten.softmax.int: _softmax(False),
    aten._log_softmax.default: _softmax(True), aten.log_softmax.int: _softmax(True),
}


_MEANS = (aten.mean.dim, aten.mean.default)
_SUMS = (aten.sum.dim_IntList, aten.sum.default, *_MEANS)


def _squared(node: object) -> fx.Node | None:
    """x where `node` is x * x or x ** 2."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.mul.Tensor and node.args[0] is node.args[1]:
        return node.args[0]
    if node.target is aten.pow.Tensor_Scalar and node.args[1] == 2:
        return node.args[0]
    return None


def variances(body: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """mean -> the sum (or mean) of the squared deviations from it over the same dims, as var, std, GroupNorm and
    InstanceNorm decompose: m = mean(x, dims, keepdim=True); sum((x - m) ** 2, dims). A looped row kernel
    accumulates the two in one pass (`Emitter.welford`)."""
    found: dict[fx.Node, fx.Node] = {}
    for b in body.graph.nodes:
        if b.op != "call_function" or b.target not in _SUMS:
            continue
        d = _squared(b.args[0])
        if not isinstance(d, fx.Node) or d.target is not aten.sub.Tensor or d.kwargs.get("alpha", 1) != 1:
            continue
        for x, m in (d.args[:2], d.args[1::-1]):
            if not (isinstance(m, fx.Node) and m.op == "call_function" and m.target in _MEANS and m.args[0] is x
                    and m not in found and dtype_of(m).is_floating_point):
                continue
            shape, dims = shape_of(x), reduced_dims(m)
            keepdim = tuple(1 if i in dims else s for i, s in enumerate(shape))
            if reduced_dims(b) == dims and shape_of(d) == shape and shape_of(m) in (keepdim, ()) and \
                    (shape_of(m) or len(dims) == len(shape)):
                found[m] = b
    return found


# Chan et al.'s combination of two partial results of a variance, each (shift, sum of the values less the shift,
# sum of squared deviations from their mean, count): the sums are moved to the shift of a side that has values
# (shifts of one row are close, so their difference is exact where it matters), and the means' difference adds
# d^2 * n_a * n_b / n to the squared deviations
WELFORD_COMBINE = """@triton.jit
def welford_combine(k_a, s_a, q_a, n_a, k_b, s_b, q_b, n_b):
    n = n_a + n_b
    k = tl.where(n_a > 0, k_a, k_b)
    s_a = s_a + n_a * (k_a - k)
    s_b = s_b + n_b * (k_b - k)
    d = s_b / tl.maximum(n_b, 1.0) - s_a / tl.maximum(n_a, 1.0)
    return k, s_a + s_b, q_a + q_b + d * d * (n_a * n_b / tl.maximum(n, 1.0)), n
"""


def reduction_input(node: fx.Node) -> fx.Node:
    """The operand a supported reduction anchor reduces (see `reduction_domain` for over which dims)."""
    reduction_domain(node)
    return node.args[0]


def reduction_domain(node: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, reduced dims) of a supported reduction anchor: sums, means, max and min over any dims,
    norms and softmax over the last."""
    if node.target not in REDUCTIONS:
        raise Unsupported(f"reduction {node.target} has no Triton lowering")
    if node.kwargs.get("dtype") is not None or (node.target in (aten.softmax.int, aten.log_softmax.int)
                                                and _arg(node, 2, "dtype") is not None):
        raise Unsupported(f"{node.target} with a dtype")
    shape, dims = domain(node) or ((), ())
    if node.target is tx.layer_norm.default:
        if dims != tuple(range(len(shape) - len(dims), len(shape))):
            raise Unsupported(f"{node.target} over other dims than the trailing ones")
    elif node.target in (tx.rms_norm.default, tx.softmax.default, aten.softmax.int, aten._softmax.default,
                         aten.log_softmax.int, aten._log_softmax.default):
        if dims != (len(shape) - 1,):
            raise Unsupported(f"{node.target} over other dims than the last")
    return shape, dims


def body_nodes(body: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]]:
    """(placeholders, compute nodes, outputs) of a kernel body."""
    nodes = list(body.graph.nodes)
    out = next(n for n in nodes if n.op == "output")
    outs = out.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return ([n for n in nodes if n.op == "placeholder"], [n for n in nodes if n.op == "call_function"], outs)

