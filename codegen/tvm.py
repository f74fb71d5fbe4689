"""tvm backend: kernels lowered to TIR with explicit schedules and built with LLVM for the host CPU.

Candidates per kernel: `tvm` (everything generated, GEMMs included) and, for GEMM and convolution kernels
with an epilogue, `tvm+extern` (the library GEMM or convolution torch links, with the generated code fused
around it) and
`tvm+onednn` (the same around a oneDNN GEMM whose weight is packed once: fxcc.codegen.onednn). The
codegen pass measures both against `extern` and keeps the fastest. Tensors cross into TVM through
DLPack without copies; views are read through their strides.

A kernel with symbolic sizes (fxcc.codegen.tvm_lower) takes them as trailing int64 arguments, read from its
inputs' sizes at each call; its spec records shapes, strides and extents as expressions of them, and it is
built twice, with its symbolic loops parallel (`main`) and serial (`serial`, for calls below the grain).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.codegen import (
    Built,
    KeptView,
    KernelFn,
    derived,
    extern,
    is_weight,
    linear_weight,
    onednn,
    patch_conv,
    reusable,
    store,
    tvm_omp,
)
from fxcc.dialects import ANCHORS, REFERENCE, KernelBody, classify

name = "tvm"


def available(target: str) -> str | None:
    if target != "cpu":
        return f"the TVM backend builds for the CPU (llvm), not {target!r}"
    if importlib.util.find_spec("tvm") is None:  # not imported here: a warm compile needs only its runtime
        return "apache-tvm is not installed (pip install 'fxcc[tvm]')"
    return None


def _threads_env() -> None:
    """TVM's thread pool reads these when it starts: as many threads as torch uses, and no spinning
    after a kernel (a spinning TVM worker would take a core from the torch ops that run next)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


@functools.cache
def _tvm():
    """Import TVM (the compiler: only needed to build, not to run what was built)."""
    _threads_env()
    import tvm
    return tvm


def host_target(threads: int | None = None) -> dict:
    """The LLVM target for this CPU, named as LLVM names it (never `native`)."""
    tvm = _tvm()
    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": threads or torch.get_num_threads()}


def set_threads(n: int) -> None:
    """Resize TVM's thread pool (used when kernels cannot run on torch's OpenMP threads: fxcc.codegen.tvm_omp)."""
    tvm = _tvm()
    tvm.get_global_func("runtime.config_threadpool")(0, n)


def _float_argument(n) -> bool:
    """A symbolic float argument of the graph in a kernel body: the 0-d float64 input fusion passes it as, read
    only with `item`, and that read (lowered as a scalar operand: tvm_lower._item)."""
    v = n.meta.get("val")
    if isinstance(v, torch.SymFloat):
        return True
    return (n.op == "placeholder" and isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.dim() == 0
            and bool(n.users) and all(u.target is torch.ops.aten.item.default for u in n.users))


def candidates(kb: KernelBody, target: str) -> list[TVMCandidate]:
    _tvm()
    from fxcc.codegen import tvm_lower as tl
    nodes = [n for n in kb.body.graph.nodes if n.op != "output" and not _float_argument(n)]
    vals = [n.meta.get("val") for n in nodes]
    vals = [v for v in vals if not isinstance(v, torch.SymInt)]  # a size read for a view's arguments
    if any(not isinstance(v, torch.Tensor) or (v.dtype.is_floating_point and v.dtype != torch.float32)
           for v in vals):
        return []  # the CPU path generates fp32 code; other types stay with torch
    if any(math.prod(ir.hints(v.shape)) == 0 for v in vals):
        return []  # a tensor of no elements (a batch of 0 rows): nothing to generate, torch's edge cases apply
    out = []
    try:
        tl.Lowering(kb.body).run()
        out.append(TVMCandidate(kb, "tvm", None))
        if any(s.lanes for s in tl.Lowering(kb.body, lanes=tl.ROW_DEFAULTS["tile_m"]).run().stages):
            out.append(TVMCandidate(kb, ROWS, None))
    except tl.Unsupported:
        pass
    anchor = next((n for n in kb.body.graph.nodes if n.op == "call_function" and n.target in ANCHORS), None)
    if anchor is not None and _has_epilogue(kb.body, anchor):
        try:
            tl.Lowering(kb.body, split=anchor).run()
            out.append(TVMCandidate(kb, "tvm+extern", anchor.name))
            if onednn.applies(anchor):  # the same generated code around a oneDNN GEMM on a packed weight
                out.append(TVMCandidate(kb, "tvm+onednn", anchor.name))
            if patch_conv.applies(anchor):  # ... around a patch convolution computed as one GEMM
                out.append(TVMCandidate(kb, PATCH, anchor.name))
        except tl.Unsupported:
            pass
        if _weight_first_applies(kb.body, anchor):
            try:
                tl.Lowering(kb.body, split=anchor, weight_first=True).run()
                out.append(TVMCandidate(kb, WXT, anchor.name))
            except tl.Unsupported:
                pass
    return out


WXT = "tvm+wxt"  # the generated epilogue around the library GEMM computed as weight @ input.T
# everything generated, each linear weight read as it is and the activation packed per call (fxcc.codegen.tvm_lower
# `lanes`): no copy of the weight kept, where `tvm` keeps its column panels
ROWS = "tvm+rows"
PATCH = "tvm+patch"  # the generated epilogue around a patch convolution computed as one GEMM (codegen.patch_conv)


def _weight_first_applies(body: fx.GraphModule, anchor: fx.Node) -> bool:
    """Whether `anchor` is a linear of two kernel inputs, a 2-D weight and an activation of static sizes, whose
    product the generated code can read as `weight @ input.T` leaves it (`weight_first_strides`)."""
    if anchor.target is not torch.ops.aten.linear.default or linear_weight(anchor) is None:
        return False
    x, v = anchor.args[0], anchor.meta.get("val")
    return (isinstance(x, fx.Node) and x.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() >= 2
            and all(isinstance(d, int) for d in (*v.shape, *x.meta["val"].shape)))


def weight_first_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a linear's [*rows, N] result as `weight @ input.T` writes it: an [N, rows] matrix, each
    output column contiguous. On the CPU, at tens of rows, MKL packs the second operand of a GEMM at every call:
    `x @ w.T` re-packs the whole weight each time, `w @ x.T` only the small activation, so the weight is read
    in its own layout with no copy kept (what `tvm+onednn` and `mkl` keep a packed copy beside it for)."""
    *lead, n = shape
    out, step = [], 1
    for d in reversed(lead):
        out.append(step)
        step *= d
    return (*reversed(out), step)


def copies(kb: KernelBody, label: str) -> list[tuple[int, int, str]]:
    """(placeholder index, bytes, store) of every weight copy candidate `label` keeps across calls: `tvm` reads each
    packable linear weight as column panels (fxcc.codegen.tvm_lower), `tvm+onednn` its GEMM's weight in oneDNN's
    blocked layout; `tvm+extern` and `tvm+wxt` read their inputs as they are. Answered from the graph alone, without
    importing the lowering (TVM's compiler: seconds of a warm compile that measures an unsettled choice again)."""
    nodes = list(kb.body.graph.nodes)
    places = [n for n in nodes if n.op == "placeholder"]
    if label not in ("tvm", "tvm+onednn") or not any(linear_weight(n) is not None for n in nodes):
        return []
    if label == "tvm":
        used = needed(nodes, None)
        weights = dict.fromkeys(n.args[1] for n in nodes if n in used and packable(n))
    elif label == "tvm+onednn":
        anchor = next((n for n in nodes if n.op == "call_function" and n.target in ANCHORS), None)
        weights = dict.fromkeys([anchor.args[1]] if anchor is not None and onednn.applies(anchor) else [])
    store = "tvm-panels" if label == "tvm" else "onednn"
    return [(places.index(w), onednn.copy_bytes(w.meta["val"]), store) for w in weights if w in places]


def _has_epilogue(body: fx.GraphModule, anchor: fx.Node) -> bool:
    """Whether anything after the GEMM computes (views alone are free in torch); a bias counts, since
    the generated code adds it while writing the result instead of the library copying it first."""
    if split_bias(anchor) is not None:
        return True
    after = False
    for n in body.graph.nodes:
        if n is anchor:
            after = True
        elif after and n.op == "call_function" and classify(n)[0] != "view":
            return True
    return False


@dataclass
class TVMCandidate:
    """A kernel lowered to TIR; `split` names the GEMM node run by the library (tvm+extern) or is None."""

    kb: KernelBody
    backend: str
    split: str | None

    @functools.cached_property
    def space(self) -> dict[str, list]:
        from fxcc.codegen import tvm_lower as tl
        return tl.space(self._lower())

    @property
    def defaults(self) -> dict:
        from fxcc.codegen import tvm_lower as tl
        return {k: (tl.ROW_DEFAULTS if self.backend == ROWS else tl.DEFAULTS)[k] for k in self.space}

    def _split_node(self) -> fx.Node | None:
        return next((n for n in self.kb.body.graph.nodes if n.name == self.split), None) if self.split else None

    def _lower(self, params: dict | None = None):
        from fxcc.codegen import tvm_lower as tl
        _tvm()
        rows = self.backend == ROWS
        p = {**(tl.ROW_DEFAULTS if rows else tl.DEFAULTS), **(params or {})}
        return tl.Lowering(self.kb.body, split=self._split_node(), vec=p["vec"], tile_n=0 if rows else p["tile_n"],
                           weight_first=self.backend == WXT, lanes=p["tile_m"] if rows else 0).run()

    def build(self, params: dict) -> Built:
        split = {WXT: f"{self.split}:wxt", ROWS: ":rows"}.get(self.backend, self.split)  # these generate their own
        so, source, spec, mod = _compiled(self.kb.key, split, json.dumps(params, sort_keys=True), self)
        spec = {**spec, "backend": self.backend}
        files = {"kernel.so": so, "kernel.tir.py": source.encode(), "kernel.json": json.dumps(spec).encode()}
        return Built(_wrap(self.kb, spec, mod), source, files)

    def compile(self, params: dict) -> tuple[bytes, str, dict, object]:
        """Lower, schedule and build with LLVM: the shared library's bytes, its TIR, its spec, the loaded module."""
        from fxcc.codegen import tvm_lower as tl
        tvm = _tvm()
        lowered = self._lower(params)
        if lowered.sizes:  # symbolic: parallel and serial variants, the caller picks by each call's sizes
            funcs = {"main": tl.schedule(lowered, params, parallel=True).mod["main"],
                     "serial": tl.schedule(lowered, params, parallel=False).mod["main"]}
            mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
        else:
            mod = tl.schedule(lowered, params).mod
        lib = _build(tvm, mod)
        spec = self._spec(lowered, params)
        with tempfile.TemporaryDirectory(prefix="fxcc-tvm-") as d:
            path = os.path.join(d, "kernel.so")
            lib.export_library(path)
            so = Path(path).read_bytes()
            source = mod.script()
            mod = _load_library(path)
        return so, source, spec, mod

    def _spec(self, lowered, params: dict) -> dict:
        """What the runtime needs to call the built library, as JSON: no TVM needed to load it again."""
        from fxcc.codegen import tvm_lower as tl
        placeholders = [n for n in self.kb.body.graph.nodes if n.op == "placeholder"]
        split = self._split_node()
        sources = [-1 if n is split else placeholders.index(n) for n in _input_nodes(self.kb.body, split)]
        ins = [[src, _sizes(s.shape), _sizes(s.stride), _sizes([s.extent])[0], s.pack]
               for src, s in zip(sources, lowered.inputs)]
        outs = [[_sizes(o.shape), _sizes(o.stride), str(o.dtype).removeprefix("torch."), list(o.order)]
                for o in lowered.outputs]
        return {"backend": self.backend, "split": self.split, "params": params, "inputs": ins, "outputs": outs,
                "target": host_target(), "sizes": [list(a) for a in lowered.sizes], "grain": tl.PARALLEL_GRAIN}


def _build(tvm, mod):
    """tvm.compile for the host CPU, with expression lets stored (fxcc.codegen.tvm_lets: a build time linear in
    the kernel). TVM's common-subexpression pass can hoist an index expression (the fused
    row loop's `// 2`) where LLVM finds it does not dominate a use, in a vectorised epilogue that reads a
    broadcast input: LLVM's verifier rejects the module. That build is tried again without the pass, which
    only names shared expressions (LLVM finds most of them again). TVM's loop vectoriser fails its own check
    ("Let cannot bind the same var to two different values") on a vectorised loop whose let chain is scalar
    (silu of an operand broadcast along the vector axis, times a vector): that build is tried again with its
    loops left scalar, and measured against the other candidates as it is."""
    from fxcc.codegen import tvm_lets

    target = host_target()
    try:
        return tvm_lets.build(tvm, mod, target)
    except Exception as e:  # TVM raises its InternalError (a RuntimeError) from the C++ side
        if "LLVM module verification failed" in str(e):
            config = {"tirx.disable_cse_tir": True}
        elif "Let cannot bind the same var to two different values" in str(e):
            config = {"tirx.disable_vectorize": True}
        else:
            raise
    with tvm.transform.PassContext(config=config):
        return tvm_lets.build(tvm, mod, target)


def _sizes(values) -> list[int | str]:
    """Sizes for the spec (JSON): ints, and symbolic ones as expressions of the size arguments (`64*sym0`)."""
    return [int(v) if isinstance(v, int) or v.is_Integer else str(v) for v in values]


_BUILDS: dict[tuple, tuple] = {}  # the last few builds, by (kernel key, split, parameters)


def _compiled(key: str, split: str | None, params: str, kernel: TVMCandidate) -> tuple[bytes, str, dict, object]:
    """One build per kernel, split and parameters: `tvm+extern` and `tvm+onednn` share their generated code."""
    k = (key, split, params)
    if k not in _BUILDS:
        if len(_BUILDS) >= 16:
            _BUILDS.pop(next(iter(_BUILDS)))
        _BUILDS[k] = kernel.compile(json.loads(params))
    return _BUILDS[k]


def load(kb: KernelBody, label: str, files: dict[str, Path], params: dict) -> Built:
    """A kernel built earlier, from its files: only the TVM runtime is loaded, not the compiler."""
    spec = json.loads(files["kernel.json"].read_text())
    if spec.get("backend") != label:
        raise ValueError(f"cache entry holds a {spec.get('backend')!r} build, not {label!r}")
    mod = _load_library(str(files["kernel.so"]))
    source = files["kernel.tir.py"].read_text() if "kernel.tir.py" in files else ""
    return Built(_wrap(kb, spec, mod), source, {})


def _load_library(path: str):
    _runtime()
    tvm_ffi = sys.modules["tvm_ffi"]
    mod = tvm_ffi.load_module(path)
    tvm_omp.attach(path)  # its parallel loop on torch's OpenMP threads, not TVM's pool (fxcc.codegen.tvm_omp)
    return mod


@functools.cache
def _runtime() -> None:
    """Load TVM's runtime library (the thread pool built kernels call into), not its compiler."""
    _threads_env()
    _import_ffi()  # libtvm_runtime links against it
    if "tvm" in sys.modules:
        return
    lib = Path(importlib.util.find_spec("tvm").origin).parent / "lib" / "libtvm_runtime.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _import_ffi() -> None:
    """Import tvm_ffi (what loads and calls a built kernel) without ml_dtypes where nothing imported it yet. tvm_ffi
    imports ml_dtypes, when it can, only for tables of its numpy types (bfloat16, float8, int4); a kernel takes
    torch tensors through DLPack and never meets them, tvm_ffi still converts those types by their names, and the
    import takes about a second (numpy 2.4, ml_dtypes 0.7: most of a warm compile that loads every kernel from the
    cache). TVM's compiler, imported to build, imports ml_dtypes itself."""
    if "tvm_ffi" in sys.modules or "ml_dtypes" in sys.modules:
        import tvm_ffi  # noqa: F401
        return
    sys.modules["ml_dtypes"] = None  # `import ml_dtypes` raises ImportError, which tvm_ffi takes as not installed
    try:
        import tvm_ffi  # noqa: F401
    finally:
        if sys.modules.get("ml_dtypes", 0) is None:
            del sys.modules["ml_dtypes"]


def _wrap(kb: KernelBody, spec: dict, mod) -> KernelFn:
    """The kernel as fxcc calls it: inputs re-strided only if they differ from what was compiled.
    The closure keeps `mod` alive: its functions do not hold the loaded library open."""
    fn = mod["main"]
    split = next((n for n in kb.body.graph.nodes if n.name == spec["split"]), None) if spec["split"] else None
    pre = (_prefix(kb.body, split, packed=spec["backend"] == "tvm+onednn", weight_first=spec["backend"] == WXT,
                   patch=spec["backend"] == PATCH)
           if split is not None else None)
    ins = [(src, tuple(shape), tuple(stride), extent, pack) for src, shape, stride, extent, pack, *_ in
           (e + [0] if len(e) == 4 else e for e in spec["inputs"])]  # entries of older builds have no pack
    outs = []
    for shape, stride, dtype, order in [] if spec.get("sizes") else spec["outputs"]:  # symbolic: per call
        phys = tuple(shape[d] for d in order)
        outs.append((tuple(shape), tuple(stride), getattr(torch, dtype), phys,
                     torch.empty(phys, device="meta").stride()))

    local = threading.local()  # per thread: the last outputs, reused once nothing else holds them
    sizes = [(k, d) for _, k, d in spec.get("sizes") or []]
    evaluate = _evaluator(spec) if sizes else None
    serial, grain, fallback = (mod["serial"], spec["grain"], []) if sizes else (None, 0, [])
    seen: dict[tuple[int, ...], tuple] = {}  # a symbolic kernel's entries per sizes met

    # per input of a static kernel: the flat view of a parameter read as it is (no packed or aligned copy), kept
    # across calls while the parameter lives (an in-place change shows through it, new memory makes another)
    params = [KeptView() for _ in ins] if evaluate is None else None
    # static outputs the kernel writes in their own shape and strides: handed over as they are (a view costs a
    # microsecond, a few percent of a small kernel's call)
    dense = ([(shape, stride) == (phys, pst) for shape, stride, _, phys, pst in outs] if evaluate is None
             else [False] * len(spec["outputs"]))
    every = evaluate is None and all(dense)
    # a static kernel whose library product comes in the layout its generated code reads: the prefix hands over
    # its buffer's flat view, kept with the buffer (no view, stride or alignment check per call: torch's CPU
    # allocator aligns to 64 bytes, as TVM assumes)
    flat = getattr(pre, "flat", None) if evaluate is None else None
    mids = [(stride, extent, pack) for src, _, stride, extent, pack in ins if src < 0]
    if flat is not None and mids and all((stride, extent) == flat[1:] and not pack for stride, extent, pack in mids):
        pre = flat[0]
        ins = [(PRODUCT if src < 0 else src, *rest) for src, *rest in ins]

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        call, syms, now_ins, now_outs = fn, (), ins, outs
        if evaluate is not None:  # symbolic: this call's sizes, and the serial variant below the grain
            syms = tuple(inputs[k].shape[d] for k, d in sizes)
            known = seen.get(syms)
            if known is None:  # evaluated once per sizes (a decode loop's steps repeat theirs)
                if len(seen) >= 64:
                    seen.clear()
                now_ins, now_outs = evaluate(syms)
                empty = any(i[3] <= 0 for i in now_ins) or any(0 in o[0] for o in now_outs)
                small = max((math.prod(o[0]) for o in now_outs), default=0) < grain
                known = seen[syms] = (now_ins, now_outs, empty, small)
            now_ins, now_outs, empty, small = known
            if empty:  # no elements: torch's edge cases
                if not fallback:
                    fallback.append(extern.Extern(kb).build({}).fn)
                return fallback[0](inputs)
            if small:
                call = serial
        mid = pre(*inputs) if pre is not None else None
        args = []
        for i, (src, shape, stride, extent, pack) in enumerate(now_ins):
            if src == PRODUCT:
                args.append(mid)
                continue
            t = mid if src < 0 else inputs[src]
            kept = params[i] if params is not None and is_weight(t) else None
            if kept is not None and (view := kept.get(t)) is not None:
                args.append(view)
                continue
            if pack:  # a 3-D input is already the panels: a constant held only as them (`hold_panels`)
                t = t if t.dim() == 3 else _packed(t, pack)
            elif t.stride() != stride or (_address(t) + t.storage_offset() * t.element_size()) % 64:  # TVM: aligned
                t = _aligned(t, shape, stride)
            elif kept is not None:  # a weight read as it is: a flat alias of its memory is kept
                args.append(kept.keep(t, lambda p, e=extent: _read_alias(p, e)))
                continue
            args.append(t.as_strided((extent,), (1,)))
        pool = getattr(local, "pool", None)
        if pool is None:
            pool = local.pool = [None] * len(spec["outputs"])
        res = []
        for j, (shape, stride, dt, _, _) in enumerate(now_outs):
            if not reusable(pool, j) or (evaluate is not None and pool[j].shape != shape):  # static: one shape
                pool[j] = torch.empty_strided(shape, stride, dtype=dt)
            res.append(pool[j])
        if every:
            call(*args, *res)
        else:
            call(*args, *(r if same else r.as_strided(phys, pst) for r, (_, _, _, phys, pst), same in
                          zip(res, now_outs, dense)), *syms)
        return res
    run.module = mod
    if evaluate is None:  # static: every call's outputs have these strides (fxcc.codegen.executable.layout_kept)
        run.strides = [stride for _, stride, _, _, _ in outs]
    if evaluate is None and pre is None:  # inputs read only as panels, by position: their panel width
        packs: dict[int, set] = {}
        for src, _, _, _, pack in ins:
            packs.setdefault(src, set()).add(pack)
        run.panels = {src: p.pop() for src, p in packs.items() if src >= 0 and len(p) == 1 and 0 not in p}
    return run


PRODUCT = -2  # an input entry's source: the library product, flat as the prefix hands it over (`_wrap`)
_SIZE_EXPR = re.compile(r"(sym\d+|\d+|[-+*() ])+")


def _evaluator(spec: dict):
    """For a symbolic kernel: a function of the size arguments' values giving the inputs' and outputs' entries
    (as `_wrap` keeps them) at those sizes. The spec's expressions are checked to be arithmetic on the size
    arguments before they are compiled (a spec is data from the artifact cache)."""
    names = [name for name, _, _ in spec["sizes"]]
    seqs = [seq for src, shape, stride, extent, *_ in spec["inputs"] for seq in (shape, stride, [extent])]
    seqs += [seq for shape, stride, *_ in spec["outputs"] for seq in (shape, stride)]
    for e in (e for seq in seqs for e in seq if isinstance(e, str)):
        if not _SIZE_EXPR.fullmatch(e) or not set(re.findall(r"sym\d+", e)) <= set(names):
            raise ValueError(f"kernel spec holds a size that is not arithmetic on its size arguments: {e!r}")
    code = compile("(" + "".join("(" + "".join(f"{e}, " for e in seq) + "), " for seq in seqs) + ")",
                   "<fxcc-tvm-sizes>", "eval")
    ins = [(src, pack) for src, _, _, _, pack, *_ in (e + [0] if len(e) == 4 else e for e in spec["inputs"])]
    outs = [(getattr(torch, dtype), tuple(order)) for _, _, dtype, order in spec["outputs"]]

    def evaluate(values: tuple[int, ...]) -> tuple[list, list]:
        v = eval(code, {"__builtins__": {}}, dict(zip(names, values)))
        now_ins = [(src, v[3 * i], v[3 * i + 1], v[3 * i + 2][0], pack) for i, (src, pack) in enumerate(ins)]
        base, now_outs = 3 * len(ins), []
        for j, (dt, order) in enumerate(outs):
            shape, stride = v[base + 2 * j], v[base + 2 * j + 1]
            phys = tuple(shape[d] for d in order)
            now_outs.append((shape, stride, dt, phys, _contiguous(phys)))
        return now_ins, now_outs
    return evaluate


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


_address = torch._C._data_address  # read without asking for write access (fxcc.watch)


def _read_alias(t: torch.Tensor, extent: int) -> torch.Tensor:
    """A flat tensor over the `extent` elements of `t` from its offset, made from their address, which TVM is
    handed instead of `t`: handing over a tensor (DLPack) asks for a writable pointer, and a storage a
    copy-on-write snapshot shares (the parts of a merged weight, watched by the runtime: fxcc.watch) is then
    copied, at every call, and the snapshot ends up a full copy of the weight kept beside it. The alias owns
    nothing: `KeptView` hands it out only while `t` lives at that address."""
    size = extent * t.element_size()
    memory = (ctypes.c_byte * size).from_address(_address(t) + t.storage_offset() * t.element_size())
    return torch.frombuffer(memory, dtype=t.dtype, count=extent)


# aligned copies of weights that arrive misaligned (mmapped checkpoints), made again only when the weight changes
_ALIGNED: dict[int, tuple] = store()
# linear weights packed in column panels for generated GEMMs (fxcc.codegen.tvm_lower), again when it changes
_PANELS: dict[int, tuple] = store()


def _packed(w: torch.Tensor, tn: int) -> torch.Tensor:
    """The [N, K] weight `w` as [N/tn, K, tn] panels (64-byte aligned): made once for a parameter (again when
    it changes), per call for anything else (an activation used as a weight)."""
    n, k = w.shape
    return _per_weight(_PANELS, w, tn, lambda: w.detach().reshape(n // tn, tn, k).transpose(1, 2).contiguous())


def kept_panels(w: torch.Tensor, tn: int) -> torch.Tensor | None:
    """The `tn`-column panels of `w` made before, where `w` has not changed since; None where there are none."""
    hit = _PANELS.get(id(w))
    if hit is None or hit[0]() is not w or hit[2] != tn or not hit[1][0].same(w):
        return None
    return hit[3]


def hold_panels(gm: fx.GraphModule, executable: fx.GraphModule, bound: list, kernels: dict,
                callers: set[int] = frozenset()) -> int:
    """Replace in `bound` each constant that only static TVM kernels read, all as column panels of one width, by
    those panels: the f32 copy is dropped (the graph's attribute becomes a meta tensor of its shape, so running
    `gm` with it fails rather than reading other values). Only for a graph whose constants nothing else reads:
    a model loaded from a checkpoint (no eager module, so no eager fallback or check; no graph cache; a recompile
    reads the checkpoint again; the kernels are static, so no extern fallback for empty sizes). A tensor of a
    caller's state dict, whose storage the graph holds as it is (`callers`: their addresses), is kept: the caller
    may still change it, and dropping it would free nothing. Returns the bytes of f32 constants dropped."""
    from fxcc.codegen.executable import KernelCall

    places = [n for n in executable.graph.nodes if n.op == "placeholder"][-len(bound):] if bound else []
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    dropped, made = 0, {}  # made: panels by id of the weight (a tied weight the graph reads twice)
    for i, (place, attr) in enumerate(zip(places, attrs)):
        w, widths = bound[i], set()
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.float32 and w.is_contiguous()
                and not isinstance(w, torch.nn.Parameter) and ir.sources_of(w) is not None and place.users
                and w.untyped_storage().data_ptr() not in callers):
            continue
        for user in place.users:
            fn = getattr(kernels.get(getattr(user.target, "key", None)), "built", None)
            panels = getattr(getattr(fn, "fn", None), "panels", None)
            if not isinstance(user.target, KernelCall) or panels is None or place in user.kwargs.values():
                break
            at = [j for j, a in enumerate(user.args[0]) if a is place]
            if len(user.args) != 1 or not at or any(j not in panels for j in at):
                break
            widths |= {panels[j] for j in at}
        else:
            if len(widths) == 1 and w.shape[0] % (tn := widths.pop()) == 0:
                if (id(w), tn) not in made:
                    made[id(w), tn] = _packed(w, tn)
                    _PANELS.pop(id(w), None)  # the kernels take the panels themselves from now on
                    dropped += w.nbytes
                bound[i] = made[id(w), tn]
                stub = torch.empty(w.shape, dtype=w.dtype, device="meta")  # computed from what `w` was (the guards)
                ir.set_attr(gm, attr.target, ir.computed_from(stub, *filter(None, (r() for r in ir.sources_of(w)))))
    return dropped


def _per_weight(store: dict, t: torch.Tensor, key: object, make) -> torch.Tensor:
    """make(): once for a parameter or a weight a pass made (merged Q/K/V, one loaded from a checkpoint: plain
    tensors the graph holds), again when it changes (fxcc.codegen.derived), once per call for anything else (an
    activation: the next call brings another). Codegen times the graph's weights as parameters (their copies
    made once), as MKL's and oneDNN's packed copies of them are kept."""
    if t.is_inference() or not (t.requires_grad or isinstance(t, torch.nn.Parameter)
                                or ir.sources_of(t) is not None):
        return make()
    return derived(store, t, key, make)


def _aligned(t: torch.Tensor, shape: tuple, stride: tuple) -> torch.Tensor:
    """`t` copied into a 64-byte aligned tensor with the compiled strides; a weight is copied only once
    (and again when it changes: fxcc.codegen.derived)."""
    return _per_weight(_ALIGNED, t, stride, lambda: _strided_copy(t.detach(), shape, stride))


def _strided_copy(t: torch.Tensor, shape: tuple, stride: tuple) -> torch.Tensor:
    """`t` in a fresh (aligned) tensor with the compiled strides. A broadcast (stride-0) dimension is one
    slice in memory: the compiled code reads index 0 of it, so that slice is what is copied."""
    out = torch.empty_strided(shape, stride, dtype=t.dtype)
    at = tuple(0 if s == 0 and n > 1 else slice(None) for n, s in zip(shape, stride))
    out[at].copy_(t[at])
    return out


def split_bias(node: fx.Node) -> fx.Node | None:
    """The bias of a library GEMM with a generated epilogue: added by the epilogue, which passes over
    the result anyway, rather than copied into the output by the library before the product."""
    if node.target is torch.ops.aten.linear.default:
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return b if isinstance(b, fx.Node) else None
    return None


def packable(node: fx.Node) -> bool:
    """A linear whose weight the kernel can read packed: a 2-D contiguous fp32 kernel input."""
    v = linear_weight(node)
    return v is not None and v.dtype == torch.float32 and v.is_contiguous() and v.numel() < 2**31


def needed(nodes: list[fx.Node], split: fx.Node | None) -> set[fx.Node]:
    """Nodes the outputs depend on, not looking through `split` (its producers run elsewhere). Here, not in the
    lowering, so that sizing a candidate's weight copies (`copies`) does not import TVM's compiler."""
    out = next(n for n in nodes if n.op == "output")
    seen, stack = set(), list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not split:
            stack.extend(n.all_input_nodes)
        elif split_bias(n) is not None:
            stack.append(split_bias(n))
    return seen


def _input_nodes(body: fx.GraphModule, split: fx.Node | None) -> list[fx.Node]:
    """The nodes that become TVM inputs, in the order the lowering declares them."""
    used = needed(list(body.graph.nodes), split)
    return [n for n in body.graph.nodes if (n.op == "placeholder" or n is split) and n in used]


def _prefix(body: fx.GraphModule, split: fx.Node, packed: bool = False, weight_first: bool = False,
            patch: bool = False):
    """A callable computing `split` (the library GEMM, without its bias) from the kernel inputs.

    A linear of two kernel inputs runs as `torch.mm` into a scratch buffer the kernel keeps (per
    thread): the product never escapes the kernel, and a fresh multi-megabyte buffer per call costs
    page faults; with `packed`, on oneDNN with the weight packed once; with `weight_first`, as `weight @ x.T`
    into an [N, rows] buffer, returned in `weight_first_strides` (the generated code reads it so). Anything
    else runs as the torch calls of the body; with `patch`, a patch convolution as one GEMM
    (fxcc.codegen.patch_conv)."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    x, w = split.args[0], split.args[1]
    if split.target is torch.ops.aten.linear.default and x in placeholders and w in placeholders:
        ix, iw = placeholders.index(x), placeholders.index(w)
        if packed:
            return lambda *inputs: onednn.linear(inputs[ix], inputs[iw])
        k, n = int(w.meta["val"].shape[1]), int(w.meta["val"].shape[0])
        local = threading.local()
        kept = KeptView()  # the weight's transposed view

        dt, sizes = split.meta["val"].dtype, split.meta["val"].shape

        def buffer(rows: int, cols: int) -> torch.Tensor:
            """The kernel's product buffer (per thread), made again only for another row count; its flat view
            (what the generated code reads) is made with it."""
            buf = getattr(local, "buf", None)
            if buf is None or buf.shape != (rows, cols):
                buf = local.buf = torch.empty(rows, cols, dtype=dt)
                local.flat = buf.view(-1)
            return buf

        if weight_first:  # static sizes (`_weight_first_applies`)
            shape = tuple(int(d) for d in sizes)
            rows, stride = math.prod(shape[:-1]), weight_first_strides(shape)

            def gemm_t_flat(*inputs):
                torch.mm(inputs[iw], inputs[ix].reshape(rows, k).t(), out=buffer(n, rows))
                return local.flat

            def gemm_t(*inputs):
                return gemm_t_flat(*inputs).as_strided(shape, stride)
            gemm_t.flat = (gemm_t_flat, stride, n * rows)
            return gemm_t

        def gemm_flat(*inputs):
            x, w = inputs[ix], inputs[iw]
            wt = kept.get(w)
            if wt is None:
                wt = kept.keep(w, torch.t)
            buf = buffer(x.numel() // k, n)  # this call's row count: a symbolic kernel's varies
            torch.mm(x if x.dim() == 2 else x.reshape(-1, k), wt, out=buf)
            return local.flat

        def gemm(*inputs):
            gemm_flat(*inputs)
            x = inputs[ix]
            return local.buf if x.dim() == 2 else local.buf.view(*x.shape[:-1], n)
        if all(isinstance(d, int) for d in sizes):
            gemm.flat = (gemm_flat, _contiguous(tuple(sizes)), math.prod(sizes))
        return gemm
    graph, env = fx.Graph(), {}
    for n in placeholders:
        env[n] = graph.placeholder(n.name)
    need, stack = set(), [split]
    while stack:
        n = stack.pop()
        if n not in need and n.op != "placeholder":
            need.add(n)
            stack.extend(n.all_input_nodes)
    for n in body.graph.nodes:
        if n in need:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if env[n].target in REFERENCE:
                env[n].target = REFERENCE[env[n].target]
            elif patch and n is split:
                env[n].target = patch_conv.conv(n)
    if split_bias(split) is not None:
        env[split].args = env[split].args[:2]
        env[split].kwargs = {k: v for k, v in env[split].kwargs.items() if k != "bias"}
    graph.output(env[split])
    return fx.GraphModule(body, graph).forward  # its code, without nn.Module's call (a microsecond and a half)
