"""triton backend: kernel bodies generated as Triton kernels (GPU; on the CPU only through the interpreter).

Candidates by kernel kind, each labelled as `fxcc explain` shows it:
- pointwise: one generated kernel per output shape ("triton"); broadcasting, strided and transposed views,
  casts, rotary, gated activations. Where an output is written across an input's layout (a copy between NCHW and
  NHWC, a transpose made contiguous), also a kernel of 2-D tiles coalesced on both sides ("triton-tiled").
- reduction: a row kernel over the reduced dims ("triton"): sum/mean/max, softmax, layer norm, RMSNorm,
  with the pointwise prologue and epilogue the fusion pass grouped around them; whole rows in registers,
  rows looped over in chunks, or few long rows split over programs (the parameters choose).
- gemm: a Triton GEMM with the epilogue fused into its store ("triton"), and the library GEMM, batched
  GEMM or convolution followed by one generated epilogue kernel ("triton+lib"; "-nhwc": a 2-D convolution run
  channels-last; "-tiled": the epilogue in 2-D tiles where it reads the result across the layout it writes).
- attention: a flash-attention kernel ("triton") and the library SDPA with native grouped-query heads
  ("sdpa"); the codegen pass times both against extern and keeps the fastest.

Meta-parameters (BLOCK sizes, ROWS / RBLOCK / SPLIT, num_warps, num_stages, GROUP_M) are each candidate's
`space`; `defaults` are chosen from the shapes and are good without tuning. Generated source is readable
Python with the kernel body's IR as a header; it is the `source` of what is built and its cache file
(`kernel.py`).
"""

from __future__ import annotations

import linecache
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxcc import ir
from fxcc.codegen import Built, KernelFn, conv_layout
from fxcc.codegen import triton_decode as decode
from fxcc.codegen.launch import ReadOnly
from fxcc.codegen.triton_gen import (
    CLOSED,
    REDUCTIONS,
    RULES,
    WELFORD_COMBINE,
    Emitter,
    Later,
    RowLoop,
    Unsupported,
    Value,
    add,
    body_nodes,
    broadcast_index,
    code,
    delinearize,
    dtype_of,
    hint_shape,
    is_symbolic,
    is_view,
    linearize,
    mul,
    reduction_domain,
    reduction_input,
    shape_fn,
    shape_of,
    size_args,
    tl_dtype,
    variances,
    view_output_index,
)
from fxcc.codegen.triton_templates import attention_source, gemm_source
from fxcc.dialects import ANCHORS, CONV, REFERENCE, KernelBody, dense_order
from fxcc.options import settings

name = "triton"

aten = torch.ops.aten
tx = torch.ops.fxcc_tx

_GEMMS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default}
_HEADER = "import triton\nimport triton.language as tl\nfrom triton.language.extra import libdevice  # noqa: F401\n"


def available(target: str) -> str | None:
    """None when Triton can run kernels for `target`, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if target == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if target == "cpu":
        if settings().triton_interpret:
            return None
        return ("Triton runs on the CPU only in its interpreter: set TRITON_INTERPRET=1 and "
                "FXCC_TRITON_INTERPRET=1 (slow; meant for tests)")
    return f"no Triton support for target {target!r}"


def candidates(kb: KernelBody, target: str) -> list[TritonCandidate]:
    """The Triton candidates for `kb`; [] for bodies this backend cannot lower. Pointwise and reduction
    kernels may have symbolic sizes (taken as kernel arguments); the templates are built per shape."""
    try:
        attention = kb.kind == "extern" and _anchor(kb.body, {tx.attention.default}) is not None
        if is_symbolic(kb.body) and kb.kind not in ("pointwise", "reduction"):
            return _optional(lambda: TritonCandidate(kb, "triton-decode", decode_attention_plan(kb.body, kb.text))) \
                if attention else []
        if kb.kind == "pointwise":
            return [TritonCandidate(kb, "triton", pointwise_plan(kb.body, kb.text)),
                    *_optional(lambda: TritonCandidate(kb, "triton-tiled", tiled_plan(kb.body, kb.text)))]
        if kb.kind == "reduction":
            return [TritonCandidate(kb, "triton", reduction_plan(kb.body, kb.text))]
        if kb.kind == "gemm":
            return _optional(lambda: TritonCandidate(kb, "triton", gemm_plan(kb.body, kb.text)),
                             lambda: TritonCandidate(kb, "triton+lib", library_epilogue_plan(kb.body, kb.text)),
                             lambda: TritonCandidate(kb, "triton+lib-nhwc",
                                                     library_epilogue_plan(kb.body, kb.text, nhwc=True)),
                             lambda: TritonCandidate(kb, "triton+lib-tiled",
                                                     library_epilogue_plan(kb.body, kb.text, tiled=True)),
                             lambda: TritonCandidate(kb, "triton+lib-nhwc-tiled",
                                                     library_epilogue_plan(kb.body, kb.text, nhwc=True, tiled=True)))
        if attention:
            return _optional(lambda: TritonCandidate(kb, "triton", attention_plan(kb.body, kb.text)),
                             lambda: TritonCandidate(kb, "sdpa", sdpa_plan(kb.body, kb.text)),
                             lambda: TritonCandidate(kb, "triton-decode", decode_attention_plan(kb.body, kb.text)))
    except Unsupported:
        return []
    return []


def _epilogue_stores(em, body: fx.GraphModule, anchor: fx.Node, outs: list[fx.Node],
                     what: str) -> tuple[list, list]:
    """Carry the anchor's value through its epilogue; each output's value and store offset."""
    for n in _epilogue(body, anchor):
        em.forward(n)
    values, offsets = [], []
    for o in outs:
        if o not in em.fwd:
            raise Unsupported(f"output {o.name} does not follow the {what}")
        idx, val = em.fwd[o]
        values.append(val)
        offsets.append(em.index(linearize(idx, shape_of(o))))
    return values, offsets


def load(kb: KernelBody, label: str, files: dict[str, Path], params: dict) -> Built:
    """The `label` candidate of `kb` from the source an earlier build stored (the artifact cache)."""
    cand = next((c for c in candidates(kb, "cuda") if c.backend == label), None)
    if cand is None:
        raise ValueError(f"the Triton backend has no {label!r} candidate for kernel {kb.key}")
    return cand.load(files, params)


def _optional(*makers: Callable[[], TritonCandidate]) -> list[TritonCandidate]:
    out = []
    for make in makers:
        try:
            out.append(make())
        except Unsupported:
            pass
    return out


# ------------------------------------------------------------------------------------------ kernels


@dataclass
class TritonProgram:
    """A generated kernel: its source, the meta-parameter space and defaults, and how to launch it.

    `launcher(namespace, params)` turns the executed source's namespace into the kernel callable.
    """

    source: str
    space: dict[str, list]
    defaults: dict
    launcher: Callable[[dict, dict], KernelFn]


@dataclass
class TritonCandidate:
    """One Triton candidate for a kernel op (a codegen.Candidate)."""

    kb: KernelBody
    backend: str
    plan: TritonProgram
    space: dict = field(init=False)
    defaults: dict = field(init=False)

    def __post_init__(self) -> None:
        self.space, self.defaults = self.plan.space, self.plan.defaults

    def build(self, params: dict) -> Built:
        ns = _execute(self.plan.source, f"{self.kb.key}_{self.backend}")
        return Built(self.plan.launcher(ns, {**self.defaults, **params}), self.plan.source,
                     {"kernel.py": self.plan.source.encode()})

    def load(self, files: dict[str, Path], params: dict) -> Built:
        source = Path(files["kernel.py"]).read_text()
        ns = _execute(source, f"{self.kb.key}_{self.backend}")
        return Built(self.plan.launcher(ns, {**self.defaults, **params}), source, {"kernel.py": source.encode()})


# Eager rounds every op's result; a multiply-add contracted into one FMA rounds once, and bf16 round trips
# around it get narrowed away (seen on an H200: rotary off by one ulp in a quarter of its elements). Kernels
# whose every op mirrors an eager op compile without contraction, so they match eager bit for bit.
_EXACT = {"enable_fp_fusion": False}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _execute(source: str, tag: str) -> dict:
    """Run generated source as a module; Triton reads a kernel's source back through linecache."""
    filename = f"<fxcc-triton-{tag}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict[str, Any] = {"__name__": f"fxcc_triton_{tag}"}
    exec(compile(source, filename, "exec"), ns)
    from triton.runtime import KernelInterface  # imported with the source: triton loads only where it runs
    # kernels read watched weights by address, never copying them (fxcc.codegen.launch)
    return {k: ReadOnly(v) if isinstance(v, KernelInterface) else v for k, v in ns.items()}


def _header(text: str, what: str) -> str:
    ir = "\n".join(f"# {line}" for line in text.rstrip().splitlines())
    return f"# fxcc generated Triton kernel: {what}\n{ir}\n\n{_HEADER}\n"


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _extent(node: fx.Node) -> int:
    v = node.meta["val"]
    return sum((s - 1) * st for s, st in zip(hint_shape(node), ir.hints(v.stride()))) + 1


def _int64(nodes: list[fx.Node], *numels: int) -> bool:
    """Whether offsets can pass 2**31: then index arithmetic starts from an int64 program id."""
    return max([*numels, *(_extent(n) for n in nodes)], default=0) >= 2**31 - 1


def _empty(node: fx.Node, device: torch.device) -> torch.Tensor:
    v = node.meta["val"]
    return torch.empty(tuple(v.shape), dtype=v.dtype, device=device)


def memory_order(node: fx.Node) -> tuple[int, ...] | None:
    """The order of `node`'s dims in memory (outermost first) where its recorded layout is dense but not
    row-major (channels-last: (0, 2, 3, 1)), so a kernel writes it in place; None for row-major, a layout
    with gaps or broadcasts, and symbolic strides (those outputs are written row-major)."""
    v = node.meta["val"]
    shape, stride = tuple(v.shape), tuple(v.stride())
    if not all(type(s) is int for s in (*shape, *stride)):
        return None
    order = dense_order(shape, stride)
    if order is None or ir.row_major(shape, stride):
        return None
    return order


def store_offset(node: fx.Node, idx: tuple) -> str:
    """The offset of element `idx` of output `node` in the buffer `_allocator` gives it: row-major, or its
    recorded strides where `memory_order` says the buffer is dense in another order (channels-last)."""
    if memory_order(node) is None:
        return linearize(idx, shape_of(node))
    v = node.meta["val"]
    return add(*(mul(e, st) for e, s, st in zip(idx, v.shape, v.stride()) if s != 1))


def _allocator(node: fx.Node, sizes: list[tuple[str, int, int]]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """A function of the kernel's inputs allocating `node`'s output (its symbolic sizes read from them), in
    its recorded strides where `memory_order` gives them."""
    dtype, shape = node.meta["val"].dtype, shape_fn(node, sizes)
    if memory_order(node) is not None:
        v = node.meta["val"]
        fixed, stride = tuple(v.shape), tuple(v.stride())
        return lambda inputs: torch.empty_strided(fixed, stride, dtype=dtype, device=inputs[0].device)

    def empty(inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.empty(shape(inputs), dtype=dtype, device=inputs[0].device)
    return empty


def _signature(em: Emitter, placeholders: list[fx.Node], fixed: list[str]) -> tuple[list[str], list[int]]:
    """Pointer arguments: the template's `fixed` ones, then each placeholder the emitter loaded, in order."""
    used = [k for k, p in enumerate(placeholders) if p in em.used and f"in{k}" not in fixed]
    return [*fixed, *(f"in{k}" for k in used)], used


def _stores(em: Emitter, outs: list[fx.Node], values: list[Value], offsets: list[str], mask: str,
            tile: str) -> list[str]:
    """Template stores; `tile` is a zero of the tile's shape, so an offset missing a tile dimension (one of
    size 1 in the output) still addresses the whole tile."""
    return [f"tl.store(out{i} + {off} + {tile}, {v.name}.to({tl_dtype(dtype_of(o))}), mask={mask})"
            for i, (o, v, off) in enumerate(zip(outs, values, offsets))]


def _indent(lines: list[str], n: int = 4) -> str:
    return "\n".join(" " * n + line for line in lines)


# ---------------------------------------------------------------------------------------- pointwise


@dataclass
class _Launch:
    fn: str
    inputs: list[int]  # body input positions passed as pointers
    outputs: list[int]  # body output positions written
    strides: list[tuple[int, int]]  # (input position, dim) run-time stride arguments
    numel: int


def pointwise_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """One kernel per distinct output shape, each over its output's elements in row-major order."""
    placeholders, _, outs = body_nodes(body)
    if not placeholders:
        raise Unsupported("a body without inputs")
    pos = {p: k for k, p in enumerate(placeholders)}
    sizes = size_args(body)  # symbolic sizes: kernel arguments read from the inputs at launch
    by_shape: dict[tuple[tuple[int, ...], tuple[int, ...] | None], list[int]] = {}
    for i, o in enumerate(outs):
        if not isinstance(o, fx.Node):
            raise Unsupported("a non-tensor output")
        by_shape.setdefault((shape_of(o), memory_order(o)), []).append(i)
    sources, launches = [], []
    for j, ((shape, order), positions) in enumerate(by_shape.items()):
        em = Emitter({p: f"in{k}" for k, p in enumerate(placeholders)}, "mask", not _interpreting())
        em.zero = em.index("offs * 0")
        numel = math.prod(hint_shape(outs[positions[0]]))
        # offs walks the outputs' memory: row-major, or their dense order (channels-last written in place)
        order = order or tuple(range(len(shape)))
        walked = delinearize("offs", tuple(shape[d] for d in order))
        at = {d: walked[k] for k, d in enumerate(order)}
        idx = tuple(em.index(at[d]) for d in range(len(shape)))
        values = [em.value(outs[i], idx) for i in positions]
        args, used = _signature(em, placeholders, [])
        fn = f"fxcc_pointwise_{j}"
        start = "tl.program_id(0).to(tl.int64)" if _int64(placeholders, numel) else "tl.program_id(0)"
        stores = [f"tl.store(out{i} + offs, {v.name}.to({tl_dtype(dtype_of(outs[i]))}), mask=mask)"
                  for i, v in zip(positions, values)]
        strides = [f"s{pos[p]}_{d}" for p, d in em.strides]
        sig = ", ".join([*args, *(f"out{i}" for i in positions), *strides, *(n for n, _, _ in sizes),
                         "BLOCK: tl.constexpr"])
        sources.append(f"@triton.jit\ndef {fn}({sig}):\n"
                       f"    offs = {start} * BLOCK + tl.arange(0, BLOCK)\n"
                       f"    mask = offs < {code(math.prod(shape))}\n"
                       f"{_indent([*em.lines, *stores])}\n")
        launches.append(_Launch(fn, used, positions, [(pos[p], d) for p, d in em.strides], numel))
    source = _header(text, "pointwise") + "\n\n".join(sources)
    biggest = max(x.numel for x in launches)
    block = min(1024, max(128, _pow2(biggest)))
    defaults = {"BLOCK": block, "num_warps": 4 if block >= 512 else (2 if block >= 256 else 1)}
    space = {"BLOCK": [128, 256, 512, 1024, 2048, 4096], "num_warps": [1, 2, 4, 8]}
    alloc = [_allocator(o, sizes) for o in outs]

    def launcher(ns: dict, params: dict) -> KernelFn:
        kernels = [(ns[x.fn], x) for x in launches]
        meta = {"BLOCK": params["BLOCK"], "num_warps": params["num_warps"], **_EXACT}

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            res = [a(inputs) for a in alloc]
            syms = [inputs[k].shape[d] for _, k, d in sizes]
            for fn, x in kernels:
                grid = (_cdiv(res[x.outputs[0]].numel(), params["BLOCK"]),)
                fn[grid](*(inputs[k] for k in x.inputs), *(res[i] for i in x.outputs),
                         *(inputs[k].stride(d) for k, d in x.strides), *syms, **meta)
            return res
        return run

    return TritonProgram(source, space, defaults, launcher)


@dataclass(frozen=True)
class _Tiles:
    """How a tiled kernel covers its output: dims walked by the grid (`outer`), the tile's axis 0 (`a`: the
    innermost dims of the input it is planned for, in that input's memory order) and axis 1 (`b`: the
    innermost dims of the output's memory order)."""

    outer: tuple[int, ...]
    a: tuple[int, ...]
    b: tuple[int, ...]


def transposed_tiles(placeholders: list[fx.Node], outs: list[fx.Node]) -> _Tiles:
    """Tiles for outputs (of one shape) written across an input's layout: the first input whose contiguous dim is
    not an output's (an NCHW value copied NHWC, an NHWC convolution result read by an epilogue writing NCHW), read
    along its contiguous dims on one tile axis while that output is written along its own on the other (an output
    in the input's layout is written along the first axis). Raises Unsupported where every input is read along
    every output's layout (the 1-D kernel is coalesced)."""
    shape = shape_of(outs[0])
    if not all(isinstance(s, int) for s in shape):
        raise Unsupported("tiles over symbolic sizes")
    names = tuple(f"x{d}" for d in range(len(shape)))
    em = Emitter({p: f"in{k}" for k, p in enumerate(placeholders)}, None)
    em.zero = "zero"  # (a dry run: only the loads' indices are read)
    for o in outs:
        em.value(o, names)  # which input dim each output dim indexes (permutations carry the names over)
    for o in dict.fromkeys(outs):
        tiles = _across(em.reads, names, [d for d in (memory_order(o) or range(len(shape))) if shape[d] != 1])
        if tiles is not None:
            return tiles
    raise Unsupported("no input is read across an output's layout")


def _across(reads: list[tuple[fx.Node, tuple]], names: tuple[str, ...], out_order: list[int]) -> _Tiles | None:
    """The tiles for the first of `reads` (loads, at indices named by the output dims) whose contiguous dim is not
    the last of `out_order` (the output's non-unit dims, outermost first); None if none is."""
    if not out_order:
        return None
    for p, idx in reads:
        v = p.meta["val"]
        if not all(type(s) is int for s in (*v.shape, *v.stride())):
            continue
        dims = [d for d in range(v.dim()) if v.shape[d] != 1]
        if not dims or any(idx[d] not in names or v.stride()[d] == 0 for d in dims):
            continue  # a broadcast, or an index computed from several (a reshape): no tile axis to give it
        in_order = sorted(dims, key=lambda d: -v.stride()[d])
        mapped = [names.index(idx[d]) for d in in_order]
        if len(set(mapped)) != len(mapped) or v.stride()[in_order[-1]] != 1 or mapped[-1] == out_order[-1]:
            continue
        b = []
        for d in reversed(out_order):
            if d == mapped[-1]:
                break
            b.insert(0, d)
        a, step = [], 1  # the input's innermost dims while they are dense (one run of memory) and not in b
        for d_in, d in zip(reversed(in_order), reversed(mapped)):
            if d in b or v.stride()[d_in] != step:
                break
            a.insert(0, d)
            step *= v.shape[d_in]
        return _Tiles(tuple(d for d in out_order if d not in a and d not in b), tuple(a), tuple(b))
    return None


def tiled_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """A pointwise body whose outputs are written across an input's layout (layout copies, transposes made
    contiguous, epilogues changing the layout) as 2-D tiles: the input read along its contiguous dims on one
    axis, the outputs written along theirs on the other, Triton exchanging the tile between the two layouts
    in shared memory. The 1-D kernel walks the outputs' memory, so it reads such an input a stride apart
    per lane (one memory segment per element); torch's copies between NCHW and NHWC are slow the same way."""
    placeholders, _, outs = body_nodes(body)
    if not placeholders or not outs or not all(isinstance(o, fx.Node) for o in outs):
        raise Unsupported("a body without inputs or with a non-tensor output")
    if is_symbolic(body) or len({shape_of(o) for o in outs}) != 1:
        raise Unsupported("outputs of symbolic sizes, or of several shapes")
    shape = shape_of(outs[0])
    tiles = transposed_tiles(placeholders, outs)
    pos = {p: k for k, p in enumerate(placeholders)}
    em = Emitter({p: f"in{k}" for k, p in enumerate(placeholders)}, "mask", not _interpreting())
    em.zero = em.index("ra * 0 + rb * 0")
    at = {d: "0" for d in range(len(shape))}
    for lin, dims in (("po", tiles.outer), ("ra", tiles.a), ("rb", tiles.b)):
        at.update(zip(dims, delinearize(lin, tuple(shape[d] for d in dims))))
    idx = tuple(em.index(at[d]) for d in range(len(shape)))
    values = [em.value(o, idx) for o in outs]
    args, used = _signature(em, placeholders, [])
    stores = [f"tl.store(out{i} + {em.index(store_offset(o, idx))}, {v.name}.to({tl_dtype(dtype_of(o))}), mask=mask)"
              for i, (o, v) in enumerate(zip(outs, values))]
    size_a, size_b = (math.prod(shape[d] for d in dims) for dims in (tiles.a, tiles.b))
    numel = math.prod(shape)
    start = "tl.program_id(0).to(tl.int64)" if _int64(placeholders, numel) else "tl.program_id(0)"
    sig = ", ".join([*args, *(f"out{i}" for i in range(len(outs))), *(f"s{pos[p]}_{d}" for p, d in em.strides),
                     "BLOCK_A: tl.constexpr", "BLOCK_B: tl.constexpr"])
    head = [f"pid = {start}",
            f"tiles_b = ({size_b} + BLOCK_B - 1) // BLOCK_B",
            f"tiles_a = ({size_a} + BLOCK_A - 1) // BLOCK_A",
            "ra = ((pid // tiles_b) % tiles_a) * BLOCK_A + tl.arange(0, BLOCK_A)[:, None]",
            "rb = (pid % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]",
            # a tile of the grid's index: an input read at the outer dims alone (one value per tile, as a per-channel
            # scale) is a tile of pointers, which a tile mask may guard (Triton refuses a mask on one pointer)
            "po = pid // (tiles_a * tiles_b) + ra * 0 + rb * 0",
            f"mask = (ra < {size_a}) & (rb < {size_b})"]
    source = _header(text, "pointwise, 2-D tiles across layouts") + \
        f"@triton.jit\ndef fxcc_tiled({sig}):\n{_indent([*head, *em.lines, *stores])}\n"
    outer = numel // (size_a * size_b)
    defaults = {"BLOCK_A": min(64, max(16, _pow2(size_a))), "BLOCK_B": min(64, max(16, _pow2(size_b))),
                "num_warps": 4}
    space = {"BLOCK_A": [16, 32, 64, 128], "BLOCK_B": [16, 32, 64, 128], "num_warps": [2, 4, 8]}
    alloc = [_allocator(o, []) for o in outs]
    strides_at = [(pos[p], d) for p, d in em.strides]

    def launcher(ns: dict, params: dict) -> KernelFn:
        fn = ns["fxcc_tiled"]
        meta = {"BLOCK_A": params["BLOCK_A"], "BLOCK_B": params["BLOCK_B"], "num_warps": params["num_warps"],
                **_EXACT}
        grid = (outer * _cdiv(size_a, params["BLOCK_A"]) * _cdiv(size_b, params["BLOCK_B"]),)

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            res = [a(inputs) for a in alloc]
            fn[grid](*(inputs[k] for k in used), *res, *(inputs[k].stride(d) for k, d in strides_at), **meta)
            return res
        return run

    return TritonProgram(source, space, defaults, launcher)


def pointwise_kernel(body: fx.GraphModule) -> KernelFn | None:
    """The kernel this backend generates for pointwise `body` at its default parameters: tiled where an input is
    read across the output's layout (a layout copy), else the 1-D one; None where neither lowers it. The layout
    pass times its candidate graphs with their copies run by it (fxcc.passes.layout.as_compiled)."""
    for make in (tiled_plan, pointwise_plan):
        try:
            plan = make(body, ir.kernel_text(body, "pointwise"))
        except Unsupported:
            continue
        return plan.launcher(_execute(plan.source, f"timed_{ir.fingerprint(plan.source)}"), plan.defaults)
    return None


# ---------------------------------------------------------------------------------------- reduction


def _anchor(body: fx.GraphModule, targets: set) -> fx.Node | None:
    found = [n for n in body.graph.nodes if n.op == "call_function" and n.target in targets]
    if len(found) > 1:
        raise Unsupported("more than one anchor in a body")
    return found[0] if found else None


# a row tile's elements one program holds in registers: rows longer than this are reduced in chunks (RBLOCK)
REGISTER_TILE = 32768


@dataclass
class _Rows:
    """A reduction body read as rows: a row is one index of the dims kept, its columns the reduced dims'
    elements. `outer`: the innermost dim is kept, so the tile runs columns x rows and consecutive lanes read
    consecutive rows (coalesced); else rows x columns."""

    body: fx.GraphModule
    placeholders: list[fx.Node]
    outs: list[fx.Node]
    anchors: list[fx.Node]
    x_shape: tuple
    dims: tuple[int, ...]
    kept: list[int]
    n: int
    rows: Any  # an int, or a sympy expression of the size arguments
    hint_rows: int
    sizes: list[tuple[str, int, int]]
    outer: bool
    int64: bool
    variances: dict[fx.Node, fx.Node]
    welford: bool  # a loop accumulates a mean and the squared deviations from it at once (settings().triton_welford)

    def vector(self, expr: str, columns: bool) -> str:
        """A 1-D index `expr` as the tile's column vector (`columns`) or its row vector."""
        return f"({expr})" + ("[None, :]" if columns != self.outer else "[:, None]")

    def emitter(self) -> Emitter:
        em = Emitter({p: f"in{k}" for k, p in enumerate(self.placeholders)}, "mask", not _interpreting())
        em.axis = 0 if self.outer else 1
        em.variances, em.welford = self.variances, self.welford
        return em


def _rows_of(body: fx.GraphModule) -> _Rows:
    placeholders, _, outs = body_nodes(body)
    anchors = [n for n in body.graph.nodes if n.op == "call_function" and n.target in REDUCTIONS]
    if not anchors or not placeholders:
        raise Unsupported("no reduction this backend lowers")
    domains = {reduction_domain(a) for a in anchors}
    if len(domains) > 1:
        raise Unsupported("reductions over different dims in one body")
    ((_, dims),) = domains
    x_shape = shape_of(reduction_input(anchors[0]))  # symbolic sizes as the kernel's size arguments
    if not x_shape:
        raise Unsupported("a reduction of a scalar")
    if any(not isinstance(o, fx.Node) for o in outs):
        raise Unsupported("a non-tensor output")
    kept = [d for d in range(len(x_shape)) if d not in dims]
    n, rows = math.prod(x_shape[d] for d in dims), math.prod(x_shape[d] for d in kept)
    if not isinstance(n, int):
        raise Unsupported("a reduction over a symbolic dimension")
    hint = hint_shape(reduction_input(anchors[0]))
    hint_rows = math.prod(hint[d] for d in kept) if len(hint) == len(x_shape) else rows
    return _Rows(body, placeholders, outs, anchors, x_shape, dims, kept, n, rows, hint_rows, size_args(body),
                 outer=len(x_shape) - 1 in kept, int64=_int64(placeholders, hint_rows * n), variances=variances(body),
                 welford=settings().triton_welford)


@dataclass
class _Targets:
    """What a row kernel has still to compute: anchors (their reductions accumulate as they are tried), row-shaped
    outputs (stored in the loop where they complete), reduction-shaped ones (tried in loops for the reductions
    they read, stored once per row after them)."""

    anchors: list[fx.Node]
    row_outs: list[int]
    red_outs: list[int]
    probes: list[int]

    def pending(self) -> bool:
        return bool(self.anchors or self.row_outs or self.probes)


def _targets(rd: _Rows) -> _Targets:
    # which outputs are (views of) row-shaped values, found at a stand-in index with an emitter of its own
    scratch = rd.emitter()
    fwd = _row_views(rd.body, scratch, rd.x_shape, tuple(f"x{d}" for d in range(len(rd.x_shape))))
    row_outs, red_outs = [], []
    red_shapes = (tuple(rd.x_shape[d] for d in rd.kept), tuple(1 if d in rd.dims else s for d, s in
                                                               enumerate(rd.x_shape)))
    for i, o in enumerate(rd.outs):
        shape = shape_of(o)
        if shape == rd.x_shape or o in fwd:  # row-shaped, or a view of a row-shaped value (a norm's view back)
            row_outs.append(i)
        elif shape in red_shapes:
            red_outs.append(i)
        else:
            raise Unsupported(f"output {o.name} is neither row- nor reduction-shaped")
    return _Targets(list(rd.anchors), row_outs, red_outs, list(red_outs))


def _row_index(rd: _Rows, shape: tuple, lead: tuple, full: tuple | None) -> tuple:
    """The index of a value of `shape` in the current row: a row-shaped one at `full`, a reduction-shaped one
    at the kept dims' index (keepdim: 0 in the reduced dims)."""
    if shape == rd.x_shape:
        return full
    if len(shape) == len(rd.kept):
        return lead
    return tuple("0" if d in rd.dims else lead[rd.kept.index(d)] for d in range(len(shape)))


def _attempt(em: Emitter, node: fx.Node, idx: tuple) -> Value | None:
    try:
        return em.value(node, idx)
    except Later:
        return None


def _columns(rd: _Rows, em: Emitter, lead: tuple, cols: str) -> tuple[tuple, dict]:
    """Point the emitter at the column vector `cols`: the reduced dims' index, the full index of a row-shaped
    value, and what row-shaped values (and views of them) are at."""
    em.cols = dict(zip(rd.dims, (em.index(e) for e in delinearize(cols, tuple(rd.x_shape[d] for d in rd.dims)))))
    full = tuple(em.cols[d] if d in rd.dims else lead[rd.kept.index(d)] for d in range(len(rd.x_shape)))
    em.zero = f"(rows * 0 + {cols} * 0)"
    return full, _row_views(rd.body, em, rd.x_shape, full)


def _row_store(rd: _Rows, em: Emitter, i: int, v: Value, idx: tuple, cols: str, mask: str) -> str:
    o = rd.outs[i]
    trailing = list(rd.dims) == list(range(len(rd.x_shape) - len(rd.dims), len(rd.x_shape)))
    if shape_of(o) == rd.x_shape and trailing and memory_order(o) is None:
        at = f"rows * {rd.n} + {cols}"
    else:
        at = em.index(store_offset(o, idx))
    return f"tl.store(out{i} + {at}, {v.name}.to({tl_dtype(dtype_of(o))}), mask={mask})"


def _red_stores(rd: _Rows, em: Emitter, todo: _Targets, lead: tuple, mask: str, lane: str = "") -> list[str]:
    """The stores of the reduction-shaped outputs, once per row (`lane`: what picks one lane of a whole-row tile)."""
    lines = []
    for i in todo.red_outs:
        o = rd.outs[i]
        at = _row_index(rd, shape_of(o), lead, None)
        v = em.value(o, at)
        off = "rows" if memory_order(o) is None else em.index(store_offset(o, at))
        lines.append(f"tl.store(out{i} + {off}{lane}, {v.name}.to({tl_dtype(dtype_of(o))}), mask={mask})")
    return lines


def _sweep(rd: _Rows, em: Emitter, lead: tuple, cols: str, todo: _Targets) -> bool:
    """Try everything still to compute at the columns `cols` (whole rows, or a loop's chunk): reductions whose
    inputs are ready accumulate, row-shaped outputs that complete are stored. Whether any output was stored."""
    full, fwd = _columns(rd, em, lead, cols)
    for a in list(todo.anchors):
        if _attempt(em, a, _row_index(rd, shape_of(a), lead, full)) is not None:
            todo.anchors.remove(a)
    for i in list(todo.probes):
        if _attempt(em, rd.outs[i], _row_index(rd, shape_of(rd.outs[i]), lead, full)) is not None:
            todo.probes.remove(i)
    stored = False
    for i in list(todo.row_outs):
        o = rd.outs[i]
        idx = full if shape_of(o) == rd.x_shape else fwd[o]
        if o in todo.anchors and idx == full:  # an anchor that just waited for a reduction waits again
            continue
        v = _attempt(em, o, idx)
        if v is not None:
            em.lines.append(_row_store(rd, em, i, v, idx, cols, em.mask))
            todo.row_outs.remove(i)
            stored = True
    return stored


def _kernel(name: str, sig: list[str], lines: list[str]) -> str:
    return f"@triton.jit\ndef {name}({', '.join(sig)}):\n{_indent(lines)}\n"


def _persistent_kernel(rd: _Rows) -> tuple[list[str], Emitter]:
    """Whole rows in registers, ROWS of them per program: every input element is read once, however many
    reductions depend on one another."""
    em = rd.emitter()
    head = [f"rows = {rd.vector(f'{_first_row(rd)} * ROWS + tl.arange(0, ROWS)', False)}",
            f"cols = {rd.vector('tl.arange(0, BLOCK_N)', True)}", f"mask = (rows < {code(rd.rows)}) & (cols < {rd.n})"]
    lead = tuple(em.index(e) for e in delinearize("rows", tuple(rd.x_shape[d] for d in rd.kept)))
    todo = _targets(rd)
    _sweep(rd, em, lead, "cols", todo)
    if todo.pending():
        raise Unsupported("a reduction the row kernel cannot compute in one pass")
    em.lines += _red_stores(rd, em, todo, lead, "mask & (cols == 0)", " + cols * 0")
    return [*head, *em.lines], em


def _first_row(rd: _Rows) -> str:
    """The program's first row, over ROWS (in int64 where an offset may pass 2^31)."""
    return "tl.program_id(0).to(tl.int64)" if rd.int64 else "tl.program_id(0)"


def _loop(rd: _Rows, em: Emitter, lead: tuple, todo: _Targets, k: int, first: str, extent: str,
          length: str) -> tuple[list[str], RowLoop | None]:
    """One loop over the columns `first` + [0, `extent`), RBLOCK at a time, `length` of them in the row: the code
    before it (accumulators, what does not vary in it) and the loop, and the loop (what accumulated in it); None
    where nothing needs a loop any more (all that was left reads finished reductions only)."""
    pre, body = [], []
    c, m = f"c{k}", f"m{k}"
    # the lanes past the row's end in a chunk are past it in every later one: lane j counts the columns j,
    # j + RBLOCK, ... below `length`
    lane = rd.vector("tl.arange(0, RBLOCK)", True)
    loop = RowLoop("[RBLOCK, ROWS]" if rd.outer else "[ROWS, RBLOCK]", pre, mask=m, ordinal=f"(r{k} // RBLOCK)",
                   lanes=f"((tl.maximum({length} - {lane}, 0) + RBLOCK - 1) // RBLOCK + rows * 0).to(tl.float32)")
    chunk = f"{first}r{k} + tl.arange(0, RBLOCK)"
    body += [f"{c} = {rd.vector(chunk, True)}{'.to(tl.int64)' if rd.int64 else ''}", f"{m} = rmask & ({c} < {rd.n})"]
    em.loop, em.hoisted, em.lines, em.variant, em.mask = loop, pre, body, {c, m, f"r{k}"}, m
    stored = _sweep(rd, em, lead, c, todo)
    em.variant = None
    if not loop.pending and not stored:
        if todo.pending():
            raise Unsupported("a reduction the looped row kernel cannot order")
        return pre, None  # what completed here does not vary over the columns: no loop
    return [*pre, f"for r{k} in range(0, {extent}, RBLOCK):", *(f"    {line}" for line in body)], loop


def _start(rd: _Rows, em: Emitter) -> tuple[list[str], tuple]:
    """A looped kernel's first lines (its rows, their mask) and the kept dims' index."""
    em.lines = [f"rows = {rd.vector(f'{_first_row(rd)} * ROWS + tl.arange(0, ROWS)', False)}",
                f"rmask = rows < {code(rd.rows)}"]
    return em.lines, tuple(em.index(e) for e in delinearize("rows", tuple(rd.x_shape[d] for d in rd.kept)))


_LOOPS = 16  # dependency levels a looped kernel may have (a softmax has two)


def _looped_kernel(rd: _Rows) -> tuple[list[str], Emitter]:
    """Rows reduced in chunks of RBLOCK columns: one loop per dependency level of the reductions (a softmax's
    max, then its sum), each computing the prologue again from the inputs, accumulating in fp32 (the inputs'
    compute dtype), and a last one storing row-shaped outputs; reduction-shaped outputs are stored once per row.
    A mean and the squared deviations from it are one level (Welford): var and std take one loop, a norm two."""
    em = rd.emitter()
    top, lead = _start(rd, em)
    todo = _targets(rd)
    for k in range(_LOOPS):
        if not todo.pending():
            break
        code, loop = _loop(rd, em, lead, todo, k, "", str(rd.n), str(rd.n))
        top += code
        em.lines = top
        if loop is not None:
            em.reduced.update(em.finish_rows({key: p[:3] for key, p in loop.pending.items()}, loop.means, loop.lanes))
    else:
        raise Unsupported(f"reductions depending on one another more than {_LOOPS} deep")
    em.loop, em.mask, em.zero = CLOSED, "rmask", "(rows * 0)"
    top += _red_stores(rd, em, todo, lead, "rmask")
    return top, em


@dataclass
class _Split:
    """Split kernels: each of `bodies` but the last reduces its rows' columns [pid * CHUNK, (pid + 1) * CHUNK) into
    partial results (`slots` per row, SPLIT each, fp32) that the kernels after it combine; the last stores the
    outputs (over all SPLIT programs where it stores row-shaped ones, `last_loops`)."""

    bodies: list[list[str]]
    slots: int
    last_loops: bool
    em: Emitter


def _split_kernels(rd: _Rows) -> _Split:
    """The looped kernel's loops as kernels of their own, each over (row block, split): for few long rows. A
    variance's partial sums and squared deviations combine as its lanes do, by Chan et al.'s formula."""
    em = rd.emitter()
    finished: dict[tuple, tuple[int, str, bool]] = {}  # reduction -> (slot, kind, propagate_nan)
    means: dict[tuple, tuple] = {}  # squared deviations -> their mean's sum and its shifts (RowLoop.means)
    todo, bodies = _targets(rd), []
    for k in range(_LOOPS + 1):
        em.reset()
        top, lead = _start(rd, em)
        top.append("pid = tl.program_id(1)")
        parts = rd.vector("tl.arange(0, SPLIT)", True)
        loaded = {key: (em.emit(f"tl.load(ws + (rows * SLOTS + {slot}) * SPLIT + {parts}, mask=rmask, other=0.0)"),
                        kind, nan) for key, (slot, kind, nan) in finished.items()}
        # the earlier kernels' partial results, combined; split j counted the columns [j * CHUNK, (j + 1) * CHUNK)
        counts = f"(tl.minimum(tl.maximum({rd.n} - {parts} * CHUNK, 0), CHUNK) + rows * 0).to(tl.float32)"
        em.reduced.update(em.finish_rows(loaded, means, counts))
        loop = None
        if todo.pending():
            code, loop = _loop(rd, em, lead, todo, k, "pid * CHUNK + ", "CHUNK",
                               f"tl.minimum(CHUNK, {rd.n} - pid * CHUNK)")
            top += code
            em.lines = top
        if loop is not None and loop.pending:
            for *_, dtype in loop.pending.values():
                if dtype != "tl.float32":
                    raise Unsupported(f"a split reduction accumulating in {dtype}")
            partial = em.finish_rows({key: p[:3] for key, p in loop.pending.items()}, loop.means, loop.lanes,
                                     partial=True)
            means.update(loop.means)
            for key, (_, kind, nan, _) in loop.pending.items():
                finished[key] = (len(finished), kind, nan)
                top.append(f"tl.store(ws + (rows * SLOTS + {finished[key][0]}) * SPLIT + pid, {partial[key]}, "
                           "mask=rmask)")
            bodies.append(top)
            continue
        # the interpreter takes no scalar condition in a mask
        em.loop, em.mask, em.zero = CLOSED, "rmask & (rows * 0 + pid == 0)", "(rows * 0)"
        top += _red_stores(rd, em, todo, lead, em.mask)
        bodies.append(top)
        return _Split(bodies, len(finished), loop is not None, em)
    raise Unsupported(f"reductions depending on one another more than {_LOOPS} deep")


def _optional_kernel(make: Callable[[], Any]) -> Any:
    try:
        return make()
    except Unsupported:
        return None


def _sm_count() -> int:
    """Streaming multiprocessors of the current GPU (an H100's 132 without one: the defaults' target)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


def row_defaults(rows: int, n: int, outer: bool, persistent: bool, split: bool, sms: int = 132,
                 budget: int = REGISTER_TILE, writes_rows: bool = False, one_pass: bool = False) -> dict:
    """Meta-parameters of a row reduction from its shape: whole rows in registers where they fit (every element
    read once), else chunks of RBLOCK columns; rows too few to fill `sms` multiprocessors (8 programs each)
    split their columns over SPLIT programs. Outer reductions put ROWS on the contiguous axis (16 or more).
    A tile stays within `budget` elements. `writes_rows`: an output as large as the input (a softmax, a norm).
    `one_pass`: a mean and its variance accumulate in one loop (Welford): split only below one program per
    multiprocessor, and long rows one at a time on 16 warps (an H100 sweep of LayerNorm over 256 rows of 524288,
    bf16: 0.345 ms looped so, against 0.571 split in 4 and 0.446 for the two-pass kernel split in 4)."""
    bn = _pow2(n)
    few = outer and not writes_rows
    if outer:
        # reduced outputs only (`few`): tiles of 16384 elements (32 rows at least, up to the budget whole) on 4
        # warps. H100 sweeps of sum, amax, var and std over dim 0 or 1 of [128, 1024, 2048] bf16 ran 1.1-1.75x
        # faster than with 64 rows on 8 warps or 16 on 16; a softmax over dim 1 (a row-sized output) the other way
        # round, 0.84 against 0.58 ms, so it keeps tiles of 8192 (16 rows at least, 16384 whole)
        least, target_tile, whole_tile = (32, 16384, budget) if few else (16, 8192, 16384)
        rows_p = max(1, min(_pow2(rows), max(least, target_tile // bn), 1024))
        whole = persistent and bn * rows_p <= whole_tile
        if not whole:
            rows_p = max(1, min(_pow2(rows), 64))
        chunk = max(1, min(bn, 4096 // rows_p, budget // rows_p))
    else:
        whole = persistent
        chunk = min(bn, 4096, budget)
        rows_p = max(1, min(_pow2(rows), 4096 // (bn if whole else chunk), 64))
    rblock, s = bn if whole else chunk, 1
    programs, target = _cdiv(rows, rows_p), 8 * sms
    # split only where it multiplies the programs by 4 or more: GroupNorm's 512 rows split in 2 (a combine kernel
    # and a workspace more) ran 0.60 ms against 0.48 looped on an H100
    long_rows = one_pass and not outer and not whole and n >= 64 * chunk  # looped one row at a time, 16 warps
    if split and (8 if one_pass else 4) * programs <= target and n >= 8 * chunk:
        most = min(target // programs, n // (2 * chunk), 1024)
        s = 1 << (most.bit_length() - 1)
        rblock = chunk
    elif long_rows:
        rows_p = 1
    elif not outer and not whole:  # looped rows two at a time: GroupNorm's 512 rows of 200704, 0.44 against 0.87 ms
        rows_p = max(1, min(_pow2(rows), 8192 // chunk, 64))
    tile = rows_p * rblock
    warps = 16 if tile >= 16384 or (long_rows and s == 1) else (8 if tile >= 4096 else 4)
    return {"ROWS": rows_p, "RBLOCK": rblock, "SPLIT": s, "num_warps": 4 if few else warps}


def reduction_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """Rows of the reductions' input, ROWS at a time (a row is one index of the dims kept, its columns the
    reduced dims' elements; a softmax's max and sum, a norm's mean and variance share the kernel when they
    reduce the same dims of the same shape), as one of three kernels the parameters choose:
    - persistent (RBLOCK covers a row, SPLIT 1): whole rows in registers, reduced at once;
    - looped (SPLIT 1): chunks of RBLOCK columns, one loop per dependency level of the reductions (a mean and
      the squared deviations from it, a variance's, accumulate in the same loop);
    - split (SPLIT > 1): each level's loop as a kernel over (row block, split) writing fp32 partial results,
      combined by the kernels after it: for rows too few to fill the GPU.
    Kept dims innermost in memory (a reduction over dim 0) put the rows on the tile's fast axis."""
    rd = _rows_of(body)
    bn = _pow2(rd.n)
    persistent = _optional_kernel(lambda: _persistent_kernel(rd)) if bn <= REGISTER_TILE else None
    try:
        looped = _looped_kernel(rd)
    except Unsupported:
        if persistent is None:
            raise
        looped = None
    split = _optional_kernel(lambda: _split_kernels(rd))
    layout = "columns x rows (kept dims contiguous)" if rd.outer else "rows x columns"
    sources, launches = [], {}

    def add(mode: str, names: list[str], bodies: list[list[str]], em: Emitter, ws: list[str], consts: list[str]):
        pos = {p: k for k, p in enumerate(rd.placeholders)}
        args, used = _signature(em, rd.placeholders, [])
        sig = [*args, *(f"out{i}" for i in range(len(rd.outs))), *ws, *(f"s{pos[p]}_{d}" for p, d in em.strides),
               *(s for s, _, _ in rd.sizes), *(f"{c}: tl.constexpr" for c in consts)]
        sources.extend(_kernel(f, sig, lines) for f, lines in zip(names, bodies))
        launches[mode] = (names, used, [(pos[p], d) for p, d in em.strides])
    if persistent is not None:
        add("persistent", ["fxcc_reduction"], [persistent[0]], persistent[1], [], ["ROWS", "BLOCK_N"])
    if looped is not None:
        add("looped", ["fxcc_reduction_looped"], [looped[0]], looped[1], [], ["ROWS", "RBLOCK"])
    if split is not None:
        add("split", [f"fxcc_reduction_split{j}" for j in range(len(split.bodies))], split.bodies, split.em, ["ws"],
            ["ROWS", "RBLOCK", "SPLIT", "CHUNK", "SLOTS"])
    if any("welford_combine" in src for src in sources):
        sources.insert(0, WELFORD_COMBINE)
    source = _header(text, f"reduction over dims {list(rd.dims)}, tile {layout}") + "\n\n".join(sources)

    writes_rows = any(math.prod(hint_shape(o)) >= rd.hint_rows * rd.n for o in rd.outs)
    defaults = row_defaults(rd.hint_rows, rd.n, rd.outer, persistent is not None, split is not None, _sm_count(),
                            REGISTER_TILE, writes_rows, one_pass=rd.welford and bool(rd.variances))
    top = min(bn, REGISTER_TILE)
    space = {"ROWS": [1 << k for k in range(11) if 1 << k <= max(64, defaults["ROWS"])],
             "RBLOCK": sorted({min(b, top) for b in (16, 64, 256, 1024, 2048, 4096, 8192, top)}),
             "num_warps": [1, 2, 4, 8, 16]}
    if split is not None:
        space["SPLIT"] = [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if s == 1 or s * 16 <= rd.n]
    alloc = [_allocator(o, rd.sizes) for o in rd.outs]
    x_size = shape_fn(reduction_input(rd.anchors[0]), rd.sizes)
    slots, last_loops = (split.slots, split.last_loops) if split is not None else (0, False)

    def launcher(ns: dict, params: dict) -> KernelFn:
        mode = row_mode(params, rd.n, persistent is not None, split is not None)
        fns, used, strides_at = launches[mode]
        kernels = [ns[f] for f in fns]
        block = bn if mode == "persistent" else min(params["RBLOCK"], bn)
        rows_p = max(1, min(params["ROWS"], REGISTER_TILE // block))  # the tile stays within the registers
        s = params.get("SPLIT", 1) if mode == "split" else 1
        meta = {"ROWS": rows_p, "num_warps": params["num_warps"], **_EXACT}
        meta.update({"BLOCK_N": bn} if mode == "persistent" else {"RBLOCK": block})
        if mode == "split":
            meta.update(SPLIT=s, CHUNK=_cdiv(_cdiv(rd.n, s), block) * block, SLOTS=max(1, slots))

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            res = [a(inputs) for a in alloc]
            shape = x_size(inputs)
            blocks = _cdiv(math.prod(shape[d] for d in rd.kept), rows_p)
            args = [*(inputs[k] for k in used), *res]
            rest = [*(inputs[k].stride(d) for k, d in strides_at), *(inputs[k].shape[d] for _, k, d in rd.sizes)]
            if mode != "split":
                kernels[0][(blocks,)](*args, *rest, **meta)
                return res
            ws = torch.empty(blocks * rows_p * max(1, slots) * s, dtype=torch.float32, device=res[0].device)
            for j, fn in enumerate(kernels):
                last = j == len(kernels) - 1
                fn[(blocks, s if not last or last_loops else 1)](*args, ws, *rest, **meta)
            return res
        return run

    return TritonProgram(source, space, defaults, launcher)


def row_mode(params: dict, n: int, persistent: bool, split: bool) -> str:
    """Which of a row reduction's kernels `params` run: "split", "persistent" or "looped"."""
    if split and params.get("SPLIT", 1) > 1:
        return "split"
    if persistent and params.get("RBLOCK", _pow2(n)) >= _pow2(n):
        return "persistent"
    return "looped"


def _row_views(body: fx.GraphModule, em: Emitter, x_shape: tuple[int, ...], full: tuple) -> dict:
    """node -> its index at the row kernel's (row, column), for row-shaped values and what one-to-one views
    and pointwise ops make of them; each view's way back is recorded, so reading it costs no index math."""
    fwd: dict[fx.Node, tuple] = {}
    for n in body.graph.nodes:
        if n.op not in ("placeholder", "call_function") or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        if shape_of(n) == x_shape:
            fwd[n] = full
        elif n.op == "call_function" and is_view(n) and n.args[0] in fwd:
            try:
                idx = tuple(em.index(e) for e in view_output_index(n, fwd[n.args[0]]))
            except Unsupported:
                continue
            em.view_back[(n, idx)] = fwd[n.args[0]]
            fwd[n] = idx
        elif n.op == "call_function" and n.target in RULES:
            src = next((x for x in n.all_input_nodes if x in fwd and shape_of(x) == shape_of(n)), None)
            if src is not None:
                fwd[n] = fwd[src]
    return fwd


# --------------------------------------------------------------------------------------------- gemm


@dataclass
class _Gemm:
    """A GEMM anchor read as out[m, n] = sum_k a[m, k] * b[k, n] (+ bias), with its operands' roles."""

    node: fx.Node
    a: fx.Node
    b: fx.Node
    bias: fx.Node | None
    b_is_nk: bool  # linear's weight is [N, K]
    m: int
    n: int
    k: int
    lead: tuple[int, ...]  # the output's leading dimensions (M = their product)


def _gemm(body: fx.GraphModule) -> _Gemm:
    node = _anchor(body, _GEMMS)
    if node is None:
        raise Unsupported("no GEMM this backend lowers")
    t, args = node.target, node.args
    if t is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise Unsupported("addmm with beta or alpha")
        bias, a, b, nk = args[0], args[1], args[2], False
    elif t is aten.linear.default:
        a, b, bias, nk = args[0], args[1], args[2] if len(args) > 2 else None, True
    else:
        a, b, bias, nk = args[0], args[1], None, False
    sa, sb = shape_of(a), shape_of(b)
    if len(sb) != 2 or len(sa) < 1 or (t is not aten.linear.default and t is not aten.matmul.default and len(sa) != 2):
        raise Unsupported("batched GEMM")
    if len(sa) == 1:
        raise Unsupported("matrix-vector product")
    for x in (a, b, bias):
        if isinstance(x, fx.Node) and x.op != "placeholder":
            raise Unsupported("a GEMM operand computed inside the kernel")
    n = sb[0] if nk else sb[1]
    k = sa[-1]
    if not dtype_of(node).is_floating_point:
        raise Unsupported("integer GEMM")
    return _Gemm(node, a, b, bias, nk, math.prod(sa[:-1]), n, k, tuple(sa[:-1]))


def _small_enough(outs: list[fx.Node]) -> None:
    """Template kernels index their outputs in int32."""
    if any(_extent(o) >= 2**31 - 1 for o in outs if isinstance(o, fx.Node)):
        raise Unsupported("an output of 2**31 elements or more")


def _epilogue(body: fx.GraphModule, anchor: fx.Node) -> list[fx.Node]:
    after, seen = [], False
    for node in body.graph.nodes:
        if node is anchor:
            seen = True
        elif seen and node.op == "call_function":
            after.append(node)
    return after


def _gemm_defaults(m: int, n: int, k: int) -> dict:
    """Measured on an H200 in CUDA graphs (bf16, Llama's shapes): weight streaming for a few rows,
    128 x 256 tiles for full ones (beating the library plus a separate residual add)."""
    bk = min(256 if m <= 16 else 64, max(16, _pow2(k)))
    if m <= 16:  # enough column blocks to cover the SMs, deep pipelining, few warps
        bn = next((b for b in (128, 64, 32) if _cdiv(n, b) >= 128), 16)
        return {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": 2 if bn <= 32 else 4,
                "num_stages": 5}
    if m <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    wide = n >= 256 and _shared_memory() >= 160 * 1024  # 3 stages of 128x64 + 64x256 bf16 tiles: 144 KiB
    return {"BLOCK_M": 128, "BLOCK_N": 256 if wide else 128, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 3}


def _shared_memory() -> int:
    """Shared memory a block may opt into on the current GPU (0 without one)."""
    if not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0))


_GEMM_SPACE = {"BLOCK_M": [16, 32, 64, 128], "BLOCK_N": [16, 32, 64, 128, 256], "BLOCK_K": [16, 32, 64, 128, 256],
               "GROUP_M": [1, 4, 8], "num_warps": [2, 4, 8], "num_stages": [2, 3, 4, 5]}


def gemm_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """A tiled GEMM whose epilogue (bias, activations, residual adds, casts, views) is applied to the
    accumulator tile before the one store of each output."""
    placeholders, _, outs = body_nodes(body)
    g = _gemm(body)
    _small_enough(outs)
    pos = {p: k for k, p in enumerate(placeholders)}
    em = Emitter({p: f"in{k}" for k, p in enumerate(placeholders)}, "mask", not _interpreting())
    out_dtype = dtype_of(g.node)
    acc = "acc"
    if g.bias is not None:  # the library adds a bias to the fp32 accumulator and rounds once
        bias = em.value(g.bias, broadcast_index(("mm", "nn"), (g.m, g.n), shape_of(g.bias)))
        acc = f"acc + {em.cast(bias, bias.dtype, torch.float32)}"
    anchor_idx = (*(em.index(e) for e in delinearize("mm", g.lead)), "nn")
    em.seed(g.node, anchor_idx, em.round(acc, out_dtype))
    values, offsets = _epilogue_stores(em, body, g.node, outs, "GEMM")
    fixed = [f"in{pos[g.a]}", f"in{pos[g.b]}"]
    args, used = _signature(em, placeholders, fixed)
    strides = [f"s{pos[p]}_{d}" for p, d in em.strides]
    dot = ', input_precision="ieee"' if dtype_of(g.a) == torch.float32 else ""
    source = _header(text, "GEMM with fused epilogue") + gemm_source(
        args=args, a=fixed[0], b=fixed[1], outs=[f"out{i}" for i in range(len(outs))], strides=strides,
        m=g.m, n=g.n, k=g.k, dot_options=dot, epilogue=_indent([*em.lines, *_stores(em, outs, values, offsets,
                                                                                       "mask", "mm * 0 + nn * 0")]))
    strides_at = [(pos[p], d) for p, d in em.strides]
    ka, kb_, extra = pos[g.a], pos[g.b], [k for k in used if k not in (pos[g.a], pos[g.b])]

    def launcher(ns: dict, params: dict) -> KernelFn:
        fn = ns["fxcc_gemm"]
        grid = (_cdiv(g.m, params["BLOCK_M"]) * _cdiv(g.n, params["BLOCK_N"]),)
        meta = {k: params[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}
        meta.update(_EXACT)
        meta["EVEN_K"] = g.k % params["BLOCK_K"] == 0
        meta["DOT_F32"] = _interpreting()

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            a, b = inputs[ka].reshape(g.m, g.k), inputs[kb_]
            sbk, sbn = (b.stride(1), b.stride(0)) if g.b_is_nk else (b.stride(0), b.stride(1))
            res = [_empty(o, a.device) for o in outs]
            fn[grid](a, b, *(inputs[k] for k in extra), *res, a.stride(0), a.stride(1), sbk, sbn,
                     *(inputs[k].stride(d) for k, d in strides_at), **meta)
            return res
        return run

    return TritonProgram(source, dict(_GEMM_SPACE), _gemm_defaults(g.m, g.n, g.k), launcher)


def _library_anchor(body: fx.GraphModule) -> fx.Node:
    """The GEMM, batched GEMM or convolution of a body, which the library runs as the torch call it is."""
    node = _anchor(body, ANCHORS)
    if node is None:
        raise Unsupported("no GEMM or convolution")
    if any(x.op != "placeholder" for x in node.all_input_nodes):
        raise Unsupported("an anchor operand computed inside the kernel")
    return node


# devices whose library convolution adds a bias in a pass of its own after it (ATen's cuDNN path: the convolution,
# then `add_` of the bias broadcast over the result, a strided elementwise kernel: 0.40 ms of conv2d_bias_relu's
# 1.28 on an H100, as much as the epilogue kernels together)
BIAS_APART = ("cuda",)


def _bias_apart(anchor: fx.Node) -> fx.Node | None:
    """The bias of a convolution anchor that the epilogue adds instead of the library (None for other anchors):
    a kernel input of the result's dtype, one value per output channel, under one group (ATen's depthwise
    kernels add the bias inside), on a device in `BIAS_APART`. Adding it in the epilogue's fp32 arithmetic and
    rounding once is what ATen's separate `add_` computes."""
    if anchor.target not in CONV:
        return None
    bias = anchor.args[2] if len(anchor.args) > 2 else anchor.kwargs.get("bias")
    at = 8 if anchor.target is aten.convolution.default else 6
    groups = anchor.args[at] if len(anchor.args) > at else anchor.kwargs.get("groups", 1)
    out, b = anchor.meta.get("val"), getattr(bias, "meta", {}).get("val")
    if (not isinstance(bias, fx.Node) or bias.op != "placeholder" or groups != 1 or not isinstance(out, torch.Tensor)
            or not isinstance(b, torch.Tensor) or b.dim() != 1 or out.dim() < 3 or b.shape[0] != out.shape[1]
            or b.dtype != out.dtype or out.device.type not in BIAS_APART):
        return None
    return bias


def _library_call(node: fx.Node, placeholders: list[fx.Node], nhwc: bool = False,
                  without_bias: bool = False) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The anchor as the torch call it is (cuBLAS / cuDNN on the GPU); with `nhwc`, a convolution on
    channels-last operands, its result left channels-last (fxcc.codegen.conv_layout); with `without_bias`, a
    convolution without its bias (`_bias_apart`: the epilogue adds it)."""
    pos = {p: k for k, p in enumerate(placeholders)}
    target = conv_layout.nhwc(node.target, restore=False) if nhwc else node.target
    args = [(pos[x] if isinstance(x, fx.Node) else None, x) for x in node.args]
    kwargs = dict(node.kwargs)
    if without_bias:
        if len(args) > 2:
            args[2] = (None, None)
        else:
            kwargs["bias"] = None

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        return target(*(inputs[k] if k is not None else x for k, x in args), **kwargs)
    return run


def _as_recorded(y: torch.Tensor, node: fx.Node) -> torch.Tensor:
    """`y` in the strides the IR records for `node` (eager's): the stride contract of a kernel output."""
    want = node.meta["val"].stride()
    if y.stride() == tuple(want):
        return y
    return torch.empty_strided(y.shape, want, dtype=y.dtype, device=y.device).copy_(y)


def library_epilogue_plan(body: fx.GraphModule, text: str, nhwc: bool = False, tiled: bool = False) -> TritonProgram:
    """The GEMM or convolution by the library torch links (cuBLAS, cuDNN), its epilogue as one generated
    pointwise kernel; with `nhwc`, a 2-D convolution run on channels-last operands; with `tiled`, the epilogue in
    2-D tiles (`tiled_plan`: it reads the library's result across the layout it writes, NHWC into NCHW)."""
    placeholders, _, outs = body_nodes(body)
    anchor = _library_anchor(body)
    if nhwc and not conv_layout.applies(body, "cuda"):
        raise Unsupported("no 2-D convolution to run channels-last")
    # everything but the anchor (whose operands are kernel inputs): its epilogue, and what fusion merged in
    # beside it (a cast of a residual)
    rest = [n for n in body.graph.nodes if n.op == "call_function" and n is not anchor]
    bias = _bias_apart(anchor)
    if bias is None and all(is_view(n) for n in rest):
        raise Unsupported("nothing to generate after the GEMM")
    # the epilogue as a body of its own: the GEMM result becomes one more input
    graph, env = fx.Graph(), {}
    for p in placeholders:
        env[p] = graph.placeholder(p.name)
        env[p].meta = dict(p.meta)
    env[anchor] = graph.placeholder("gemm")
    env[anchor].meta = dict(anchor.meta)
    if nhwc:  # the epilogue reads the convolution's result in the layout the library leaves it (its tiles follow it)
        v = anchor.meta["val"]
        env[anchor].meta["val"] = torch.empty(v.shape, dtype=v.dtype, device="meta", memory_format=torch.channels_last)
    if bias is not None:  # the convolution's value is the library's result plus the bias, per channel
        v = anchor.meta["val"]
        shape = [1, v.shape[1], *[1] * (v.dim() - 2)]
        per_channel = graph.call_function(aten.view.default, (env[bias], shape))
        per_channel.meta["val"] = torch.empty(shape, dtype=v.dtype, device="meta")
        env[anchor] = graph.call_function(aten.add.Tensor, (env[anchor], per_channel))
        env[anchor].meta["val"] = v  # as an output, it is written in eager's strides
    for node in rest:
        env[node] = graph.node_copy(node, lambda x: env[x])
    generated = [i for i, o in enumerate(outs) if o is not anchor or bias is not None]
    graph.output(tuple(env[outs[i]] for i in generated))
    plan = (tiled_plan if tiled else pointwise_plan)(fx.GraphModule(body, graph), text)
    gemm = _library_call(anchor, placeholders, nhwc, without_bias=bias is not None)

    def launcher(ns: dict, params: dict) -> KernelFn:
        epi = plan.launcher(ns, params)

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            y = gemm(inputs)  # the epilogue reads it with its run-time strides (channels-last with `nhwc`)
            res: list[torch.Tensor] = [_as_recorded(y, anchor)] * len(outs) if nhwc else [y] * len(outs)
            for i, r in zip(generated, epi([*inputs, y])):
                res[i] = r
            return res
        return run

    source = plan.source.replace("# fxcc generated Triton kernel: pointwise",
                                 f"# fxcc generated Triton kernel: epilogue of the library {anchor.target}", 1)
    return TritonProgram(source, plan.space, plan.defaults, launcher)


# ---------------------------------------------------------------------------------------- attention


def _attention(body: fx.GraphModule) -> fx.Node:
    node = _anchor(body, {tx.attention.default})
    if node is None:
        raise Unsupported("no attention")
    q, k, v = node.args[:3]
    if any(not isinstance(x, fx.Node) or x.op != "placeholder" or len(shape_of(x)) != 4 for x in (q, k, v)):
        raise Unsupported("attention operands are not 4-D kernel inputs")
    return node


def decode_attention_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """Flash-decoding for a decode step (one query token): the KV length split across programs and the
    chunks combined (codegen/triton_decode.py); batch and cache length are run-time sizes. Whatever the
    body computes around the attention runs as the torch calls it holds."""
    node = _attention(body)
    q, k, v, mask, scale, causal = node.args
    (_, hq, tq, d), (_, hk, _, dk), (_, _, _, dv) = shape_of(q), shape_of(k), shape_of(v)
    if tq != 1 or causal:
        raise Unsupported("not a decode step (one query token, no causal flag)")
    if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk or d != dk or d != dv or \
            d not in (16, 32, 64, 128, 256):
        raise Unsupported(f"head dim {d} / heads {hq}:{hk}")
    if dtype_of(q) not in (torch.float16, torch.bfloat16, torch.float32) or not dtype_of(q) == dtype_of(k) == \
            dtype_of(v):
        raise Unsupported("attention dtypes")
    mask_bool = None
    if isinstance(mask, fx.Node):
        mdt = mask.meta["val"].dtype
        if mask.op != "placeholder" or not (mdt == torch.bool or mdt.is_floating_point) or len(shape_of(mask)) > 4:
            raise Unsupported("attention mask")
        mask_bool = mdt == torch.bool
    source = _header(text, "flash-decoding attention, the KV length split") + decode.SOURCE
    defaults = {"BLOCK_N": 16 if _interpreting() else 64, "num_warps": 4}
    space = {"BLOCK_N": [16, 32, 64, 128], "num_warps": [1, 2, 4, 8]}
    target = 2 * torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4

    def launcher(ns: dict, params: dict) -> KernelFn:
        att = decode.launcher(ns, heads=hq, group=hq // hk, head_dim=d, scale=float(scale), mask_bool=mask_bool,
                              block_n=params["BLOCK_N"], num_warps=params["num_warps"], target=target)
        graph = fx.Graph()
        graph.output(graph.graph_copy(body.graph, {}))
        for n in graph.nodes:
            if n.op == "call_function" and n.target is tx.attention.default:
                n.target, n.args = att, n.args[:4]
            elif n.op == "call_function" and n.target in REFERENCE:
                n.target = REFERENCE[n.target]
        gm = fx.GraphModule(body, graph)

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(gm(*inputs))
        return run

    return TritonProgram(source, space, defaults, launcher)


def sdpa_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """The library's scaled_dot_product_attention with grouped-query heads passed as they are (no copies)."""
    node = _attention(body)
    if shape_of(node.args[0])[1] == shape_of(node.args[1])[1]:
        raise Unsupported("no grouped heads: the library call is extern's")
    graph = fx.Graph()
    graph.output(graph.graph_copy(body.graph, {}))
    for n in graph.nodes:  # tx ops call their reference implementation; attention the library's GQA path
        if n.op == "call_function" and n.target in REFERENCE:
            n.target = sdpa_gqa if n.target is tx.attention.default else REFERENCE[n.target]
    gm = fx.GraphModule(body, graph)
    source = (f"# fxcc: library attention (torch.nn.functional.scaled_dot_product_attention, enable_gqa)\n"
              f"{_header(text, 'none generated')}\n{gm.code}")

    def launcher(ns: dict, params: dict) -> KernelFn:
        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            return list(gm(*inputs))
        return run

    return TritonProgram(source, {}, {}, launcher)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
             is_causal: bool) -> torch.Tensor:
    """tx.attention through the library SDPA, which reads grouped kv heads itself."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=bool(k.shape[-3] != q.shape[-3]))


def attention_plan(body: fx.GraphModule, text: str) -> TritonProgram:
    """Flash attention: per (query block, batch*head), an online softmax over key blocks; causal blocks
    past the diagonal are skipped; the output tile goes through the body's epilogue views to its store."""
    placeholders, _, outs = body_nodes(body)
    node = _attention(body)
    _small_enough(outs)
    q, k, v, mask, scale, causal = node.args
    (b, hq, tq, d), (_, hk, tk, dk), (_, _, _, dv) = shape_of(q), shape_of(k), shape_of(v)
    if d != dk or d != dv or d not in (16, 32, 64, 128, 256) or hq % hk:
        raise Unsupported(f"head dim {d} / heads {hq}:{hk}")
    if dtype_of(q) not in (torch.float16, torch.bfloat16, torch.float32) or not (
            dtype_of(q) == dtype_of(k) == dtype_of(v)):
        raise Unsupported("attention dtypes")
    if causal and tq != tk:
        raise Unsupported("causal attention over unequal lengths")
    pos = {p: j for j, p in enumerate(placeholders)}
    em = Emitter({p: f"in{j}" for j, p in enumerate(placeholders)}, "mask", not _interpreting())
    has_mask = isinstance(mask, fx.Node)
    if has_mask:
        ms = shape_of(mask)
        if len(ms) > 4 or mask.op != "placeholder" or not (mask.meta["val"].dtype == torch.bool
                                                           or mask.meta["val"].dtype.is_floating_point):
            raise Unsupported("attention mask")
    em.seed(node, ("bz", "hz", "om", "od"), em.round("acc", dtype_of(node)))
    values, offsets = _epilogue_stores(em, body, node, outs, "attention")
    fixed = [f"in{pos[q]}", f"in{pos[k]}", f"in{pos[v]}"] + ([f"in{pos[mask]}"] if has_mask else [])
    args, used = _signature(em, placeholders, fixed)
    strides = [f"s{pos[p]}_{dd}" for p, dd in em.strides]
    mask_shape = (1,) * (4 - len(shape_of(mask))) + shape_of(mask) if has_mask else None
    source = _header(text, "flash attention") + attention_source(
        args=args, q=fixed[0], k=fixed[1], v=fixed[2], mask=fixed[3] if has_mask else None,
        mask_bool=has_mask and mask.meta["val"].dtype == torch.bool, outs=[f"out{i}" for i in range(len(outs))],
        strides=strides, heads=hq, group=hq // hk, tq=tq, tk=tk, d=d, scale=float(scale), causal=bool(causal),
        fp32=dtype_of(q) == torch.float32,
        epilogue=_indent([*em.lines, *_stores(em, outs, values, offsets, "mask", "om * 0 + od * 0")]))
    strides_at = [(pos[p], dd) for p, dd in em.strides]
    kq, kk, kv = pos[q], pos[k], pos[v]
    km = pos[mask] if has_mask else None
    extra = [j for j in used if j not in (kq, kk, kv, km)]
    big = tq >= 128
    # long queries: 64 x 64 tiles, 4 warps, 3 stages measured best on an H200 (causal, T=2048, D=128)
    defaults = {"BLOCK_M": 64 if big else 16, "BLOCK_N": 64 if big or tk >= 64 else 16, "num_warps": 4,
                "num_stages": 3 if big else 2}
    space = {"BLOCK_M": [16, 32, 64, 128], "BLOCK_N": [16, 32, 64, 128], "num_warps": [4, 8],
             "num_stages": [1, 2, 3, 4]}

    def launcher(ns: dict, params: dict) -> KernelFn:
        fn = ns["fxcc_attention"]
        bm, bn = params["BLOCK_M"], params["BLOCK_N"]
        if bm % bn and bn % bm:
            raise ValueError(f"BLOCK_M={bm} and BLOCK_N={bn}: one must divide the other")
        grid = (_cdiv(tq, bm), b * hq)
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": params["num_warps"], "num_stages": params["num_stages"],
                "DOT_F32": _interpreting()}

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            qt, kt, vt = inputs[kq], inputs[kk], inputs[kv]
            res = [_empty(o, qt.device) for o in outs]
            mt = []
            if km is not None:
                m = inputs[km]
                m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
                mt = [m, *(m.stride(i) if mask_shape[i] != 1 else 0 for i in range(4))]
            fn[grid](qt, kt, vt, *mt[:1], *(inputs[j] for j in extra), *res, *qt.stride(), *kt.stride(),
                     *vt.stride(), *mt[1:], *(inputs[j].stride(dd) for j, dd in strides_at), **meta)
            return res
        return run

    return TritonProgram(source, space, defaults, launcher)

