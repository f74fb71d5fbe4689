"""tvm backend: kernels lowered to TIR with explicit schedules and built with LLVM for the host CPU.

Candidates per kernel: `tvm` (everything generated, GEMMs included) and, for GEMM and convolution kernels
with an epilogue, `tvm+extern` (the library GEMM or convolution torch links, with the generated code fused
around it) and
`tvm+onednn` (the same around a oneDNN GEMM whose weight is packed once: fxcc.codegen.onednn). The
codegen pass measures both against `extern` and keeps the fastest. Tensors cross into TVM through
DLPack without copies; views are read through their strides.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from fxcc.codegen import Built, KernelFn, derived, onednn, reusable, tvm_omp
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


def candidates(kb: KernelBody, target: str) -> list[TVMCandidate]:
    _tvm()
    from fxcc.codegen import tvm_lower as tl
    vals = [n.meta.get("val") for n in kb.body.graph.nodes if n.op != "output"]
    if any(not isinstance(v, torch.Tensor) or (v.dtype.is_floating_point and v.dtype != torch.float32)
           for v in vals):
        return []  # the CPU path generates fp32 code; other types stay with torch
    if any(isinstance(d, torch.SymInt) for v in vals for d in (*v.shape, *v.stride())):
        return []  # TVM kernels are built for static shapes; a symbolic kernel runs its torch candidates
    if any(v.numel() == 0 for v in vals):
        return []  # a tensor of no elements (a batch of 0 rows): nothing to generate, torch's edge cases apply
    out = []
    try:
        tl.Lowering(kb.body).run()
        out.append(TVMCandidate(kb, "tvm", None))
    except tl.Unsupported:
        pass
    anchor = next((n for n in kb.body.graph.nodes if n.op == "call_function" and n.target in ANCHORS), None)
    if anchor is not None and _has_epilogue(kb.body, anchor):
        try:
            tl.Lowering(kb.body, split=anchor).run()
            out.append(TVMCandidate(kb, "tvm+extern", anchor.name))
            if onednn.applies(anchor):  # the same generated code around a oneDNN GEMM on a packed weight
                out.append(TVMCandidate(kb, "tvm+onednn", anchor.name))
        except tl.Unsupported:
            pass
    return out


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
        return {k: tl.DEFAULTS[k] for k in self.space}

    def _split_node(self) -> fx.Node | None:
        return next((n for n in self.kb.body.graph.nodes if n.name == self.split), None) if self.split else None

    def _lower(self, params: dict | None = None):
        from fxcc.codegen import tvm_lower as tl
        _tvm()
        p = {**tl.DEFAULTS, **(params or {})}
        return tl.Lowering(self.kb.body, split=self._split_node(), vec=p["vec"], tile_n=p["tile_n"]).run()

    def build(self, params: dict) -> Built:
        so, source, spec, mod = _compiled(self.kb.key, self.split, json.dumps(params, sort_keys=True), self)
        spec = {**spec, "backend": self.backend}
        files = {"kernel.so": so, "kernel.tir.py": source.encode(), "kernel.json": json.dumps(spec).encode()}
        return Built(_wrap(self.kb, spec, mod), source, files)

    def compile(self, params: dict) -> tuple[bytes, str, dict, object]:
        """Lower, schedule and build with LLVM: the shared library's bytes, its TIR, its spec, the loaded module."""
        from fxcc.codegen import tvm_lower as tl
        tvm = _tvm()
        lowered = self._lower(params)
        sch = tl.schedule(lowered, params)
        lib = tvm.compile(sch.mod, target=tvm.target.Target(host_target()))
        spec = self._spec(lowered, params)
        with tempfile.TemporaryDirectory(prefix="fxcc-tvm-") as d:
            path = os.path.join(d, "kernel.so")
            lib.export_library(path)
            so = Path(path).read_bytes()
            mod = _load_library(path)
        return so, sch.mod.script(), spec, mod

    def _spec(self, lowered, params: dict) -> dict:
        """What the runtime needs to call the built library, as JSON: no TVM needed to load it again."""
        placeholders = [n for n in self.kb.body.graph.nodes if n.op == "placeholder"]
        split = self._split_node()
        sources = [-1 if n is split else placeholders.index(n) for n in _input_nodes(self.kb.body, split)]
        ins = [[src, list(s.shape), list(s.stride), s.extent, s.pack] for src, s in zip(sources, lowered.inputs)]
        outs = [[list(o.shape), list(o.stride), str(o.dtype).removeprefix("torch."), list(o.order)]
                for o in lowered.outputs]
        return {"backend": self.backend, "split": self.split, "params": params, "inputs": ins, "outputs": outs,
                "target": host_target()}


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
    import tvm_ffi
    mod = tvm_ffi.load_module(path)
    tvm_omp.attach(path)  # its parallel loop on torch's OpenMP threads, not TVM's pool (fxcc.codegen.tvm_omp)
    return mod


@functools.cache
def _runtime() -> None:
    """Load TVM's runtime library (the thread pool built kernels call into), not its compiler."""
    _threads_env()
    import tvm_ffi  # noqa: F401  (libtvm_runtime links against it)
    if "tvm" in sys.modules:
        return
    lib = Path(importlib.util.find_spec("tvm").origin).parent / "lib" / "libtvm_runtime.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _wrap(kb: KernelBody, spec: dict, mod) -> KernelFn:
    """The kernel as fxcc calls it: inputs re-strided only if they differ from what was compiled.
    The closure keeps `mod` alive: its functions do not hold the loaded library open."""
    fn = mod["main"]
    split = next((n for n in kb.body.graph.nodes if n.name == spec["split"]), None) if spec["split"] else None
    pre = _prefix(kb.body, split, packed=spec["backend"] == "tvm+onednn") if split is not None else None
    ins = [(src, tuple(shape), tuple(stride), extent, pack) for src, shape, stride, extent, pack, *_ in
           (e + [0] if len(e) == 4 else e for e in spec["inputs"])]  # entries of older builds have no pack
    outs = []
    for shape, stride, dtype, order in spec["outputs"]:
        phys = tuple(shape[d] for d in order)
        outs.append((tuple(shape), tuple(stride), getattr(torch, dtype), phys,
                     torch.empty(phys, device="meta").stride()))

    local = threading.local()  # per thread: the last outputs, reused once nothing else holds them

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        mid = pre(*inputs) if pre is not None else None
        args = []
        for src, shape, stride, extent, pack in ins:
            t = mid if src < 0 else inputs[src]
            if pack:
                t = _packed(t, pack)
            elif t.stride() != stride or (_address(t) + t.storage_offset() * t.element_size()) % 64:  # TVM: aligned
                t = _aligned(t, shape, stride)
            args.append(t.as_strided((extent,), (1,)))
        pool = getattr(local, "pool", None)
        if pool is None:
            pool = local.pool = [None] * len(outs)
        res = []
        for j, (shape, stride, dt, _, _) in enumerate(outs):
            if not reusable(pool, j):
                pool[j] = torch.empty_strided(shape, stride, dtype=dt)
            res.append(pool[j])
        fn(*args, *(r.as_strided(phys, pst) for r, (_, _, _, phys, pst) in zip(res, outs)))
        return res
    run.module = mod
    return run


_address = torch._C._data_address  # read without asking for write access (fxcc.watch)
# aligned copies of weights that arrive misaligned (mmapped checkpoints), made again only when the weight changes
_ALIGNED: dict[int, tuple] = {}
# linear weights packed in column panels for generated GEMMs (fxcc.codegen.tvm_lower), again when it changes
_PANELS: dict[int, tuple] = {}


def _packed(w: torch.Tensor, tn: int) -> torch.Tensor:
    """The [N, K] weight `w` as [N/tn, K, tn] panels (64-byte aligned): made once for a parameter (again when
    it changes), per call for anything else (an activation used as a weight)."""
    n, k = w.shape
    return _per_weight(_PANELS, w, tn, lambda: w.detach().reshape(n // tn, tn, k).transpose(1, 2).contiguous())


def _per_weight(store: dict, t: torch.Tensor, key: object, make) -> torch.Tensor:
    """make(): once for a parameter, again when it changes (fxcc.codegen.derived), once per call for anything
    else (an activation: the next call brings another)."""
    if t.is_inference() or not (t.requires_grad or isinstance(t, torch.nn.Parameter)):
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


def _input_nodes(body: fx.GraphModule, split: fx.Node | None) -> list[fx.Node]:
    """The nodes that become TVM inputs, in the order the lowering declares them."""
    from fxcc.codegen import tvm_lower as tl
    needed = tl._needed(list(body.graph.nodes), split)
    return [n for n in body.graph.nodes if (n.op == "placeholder" or n is split) and n in needed]


def _prefix(body: fx.GraphModule, split: fx.Node, packed: bool = False):
    """A callable computing `split` (the library GEMM, without its bias) from the kernel inputs.

    A linear of two kernel inputs runs as `torch.mm` into a scratch buffer the kernel keeps (per
    thread): the product never escapes the kernel, and a fresh multi-megabyte buffer per call costs
    page faults; with `packed`, on oneDNN with the weight packed once. Anything else runs as the torch
    calls of the body."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    x, w = split.args[0], split.args[1]
    if split.target is torch.ops.aten.linear.default and x in placeholders and w in placeholders:
        ix, iw = placeholders.index(x), placeholders.index(w)
        if packed:
            return lambda *inputs: onednn.linear(inputs[ix], inputs[iw])
        shape = tuple(split.meta["val"].shape)
        k, n = int(w.meta["val"].shape[1]), int(w.meta["val"].shape[0])
        local = threading.local()

        def gemm(*inputs):
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = torch.empty(math.prod(shape) // n, n, dtype=split.meta["val"].dtype)
            torch.mm(inputs[ix].reshape(-1, k), inputs[iw].t(), out=buf)
            return buf.view(shape)
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
    if split_bias(split) is not None:
        env[split].args = env[split].args[:2]
        env[split].kwargs = {k: v for k, v in env[split].kwargs.items() if k != "bias"}
    graph.output(env[split])
    return fx.GraphModule(body, graph)
