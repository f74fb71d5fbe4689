"""Weights held once: a weight that the compiled kernels read only as a packed copy (oneDNN's blocked layout, TVM's
column panels) is held as that copy alone, where the compiled module is the only holder of the model.

A packed copy is as large as the weight, and the compiled module keeps the weight too: for its eager fallback, its
guards and `state_dict`. While the caller holds the model, the weight is the caller's and stays; once nothing but the
compiled module reaches the model, its submodules, parameters or any view or storage of them, the weight's memory is
let go (its storage emptied in place: every tensor over it keeps its identity, shape and strides) and the kernels go
on reading the packed copy. Whatever reads the model through the compiled module (`module` or any attribute,
`state_dict`, the eager fallback, a compile for new shapes, `generate`) first has the weights back (`Held.restore`):
oneDNN's reorder back to the plain layout or the panels transposed back, which move each element and compute
nothing, so they are the original bits (checked before a weight is let go). Restored, they stay until the model's
references drop again (or a new variant compiles).

Under tp-shard a rank's graph holds only its shards of the projections, and the whole weights they were sliced from
are read by nothing but what reads the model. Those are let go too, their bytes kept in a file on disk (`_Spill`):
no memory of one rank makes the whole weight again, and the eager fallback, which every rank runs on its own, needs
the whole model.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import tempfile
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import torch
import torch.fx as fx
from fxcc import codegen
from fxcc.autotune.select import copies
from fxcc.codegen import onednn
from fxcc.dialects import KERNEL_OPS
from fxcc.ir import fetch_attr, sources_of
from fxcc.watch import Snapshot, same_bits

log = logging.getLogger(__name__)

_address = torch._C._data_address


@dataclass
class Held:
    """Weights held as their packed copies alone: (weight, what makes its values again from a packed copy), and the
    snapshots (fxcc.watch) of every tensor over their memory, taken again when the weights come back."""

    weights: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = field(default_factory=list)
    snapshots: list[tuple[Snapshot, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w, _ in self.weights)

    def restore(self) -> None:
        """Give each weight its values back, in its own storage (the tensors over it see them again)."""
        for w, make in self.weights:
            w.untyped_storage()._swap_data_ptr_(make().untyped_storage())
        for s, t in self.snapshots:
            s.take(t)
        log.info("%d weights (%.1f MB) held again (from their packed copies, or read back from disk)", len(self.weights),
                 self.nbytes / 2**20)
        self.weights, self.snapshots = [], []


def packed_only(variants: list, decode_steps: bool) -> dict[int, tuple[torch.Tensor, set]]:
    """id -> (weight, the (store, key) pairs of the copies it is read through) of the weights every variant's
    kernels read only as a packed copy (oneDNN's blocked layout, TVM's column panels): graph constants (merged Q/K/V
    and gate/up, the model's parameters) that feed nothing but such kernel inputs, each one all of its storage, fp32
    or bf16. Empty where a variant is not a plain compiled graph (a DyCL program, a CUDA graph) or a compiled decode
    step reads the model too."""
    if decode_steps or not variants:
        return {}
    held: dict[int, tuple[torch.Tensor, set]] = {}
    read_else: set[int] = set()
    for v in variants:
        if v.executable is None or v.cuda_graph is not None or not isinstance(v.gm, fx.GraphModule):
            return {}
        for node in v.gm.graph.nodes:
            if node.op != "get_attr" or not isinstance(w := fetch_attr(v.gm, node.target), torch.Tensor):
                continue
            reads = _reads(v, node) if _whole(w) else None
            if reads is None:
                read_else.add(id(w))
            else:
                held.setdefault(id(w), (w, set()))[1].update(reads)
    # a tensor read otherwise by one graph, or sharing memory with one read otherwise (a merged weight's rows), stays
    other = {_address(t) for v in variants for n in v.gm.graph.nodes if n.op == "get_attr"
             if isinstance(t := fetch_attr(v.gm, n.target), torch.Tensor) and id(t) in read_else}
    return {k: e for k, e in held.items() if k not in read_else and _address(e[0]) not in other}


def _whole(w: torch.Tensor) -> bool:
    """A weight that is all of its storage: the packed copy gives back every byte there."""
    return w.dtype in (torch.float32, torch.bfloat16) and w.dim() == 2 and _all_of_storage(w)


def _all_of_storage(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and not w.is_mkldnn and w.is_contiguous() and w.storage_offset() == 0
            and w.untyped_storage().nbytes() == w.nbytes)


def sharded_away(variants: list, model: torch.nn.Module, decode_steps: bool) -> list[torch.Tensor]:
    """The model's parameters that tp-shard replaced by this rank's shards in every variant's graph: sources of a
    graph constant (`fxcc.ir.computed_from`) whose memory no graph reads, each one all of its storage, on the CPU.
    Empty where a variant did not run tp-shard or is not a plain compiled graph, or a compiled decode step reads the
    model too."""
    if decode_steps or not variants:
        return []
    read, sources = set(), set()
    for v in variants:
        if (v.executable is None or v.cuda_graph is not None or not isinstance(v.gm, fx.GraphModule)
                or not any(r.spec.startswith("tp-shard") for r in v.records)):
            return []
        for node in v.gm.graph.nodes:
            if node.op == "get_attr" and isinstance(t := fetch_attr(v.gm, node.target), torch.Tensor):
                read.add(_address(t))
                sources.update(id(r()) for r in sources_of(t) or () if r() is not None)
        read.update(_address(t) for t in v.bound if isinstance(t, torch.Tensor) and not t.is_mkldnn)
    return [p for p in model.parameters() if id(p) in sources and _address(p) not in read and _all_of_storage(p)]


class _Spill:
    """Weights' bytes in an unnamed file (gone when the last weight that needs it is restored, or the process ends)
    under the artifact cache's directory, read back bit for bit when the model is read again. Under tp-shard a rank's
    graph holds only its shard of a projection: the whole weight, which state_dict, attributes and the eager fallback
    read, can come back from no memory of this rank (and gathering it from the others would be a collective that
    every rank must join at once), so it comes back from disk. Not on a file system in memory (tmpfs), where the
    bytes would stay in memory."""

    def __init__(self, file: IO[bytes]):
        self.file = file

    @classmethod
    def of(cls, weights: list[torch.Tensor], directory: str) -> list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]:
        """(weight, what reads its values back) for each of `weights` written to a new file under `directory`; none
        where the directory is in memory or cannot take them (the weights then stay)."""
        if (why := _in_memory(directory)) is not None:
            log.info("%d sharded-away weights stay: %s", len(weights), why)
            return []
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            spill = cls(tempfile.TemporaryFile(dir=directory, prefix="held-"))
            out = [(w, spill._write(w)) for w in weights]
            spill.file.flush()
        except OSError as e:
            log.warning("the sharded-away weights stay in memory: writing them under %s failed (%s)", directory, e)
            return []
        log.info("%d sharded-away weights (%.1f MB) written under %s", len(out), sum(w.nbytes for w in weights) / 2**20,
                 directory)
        return out

    def _write(self, w: torch.Tensor) -> Callable[[], torch.Tensor]:
        at = self.file.seek(0, os.SEEK_END)
        self.file.write(_bytes(w))
        return functools.partial(self._read, at, tuple(w.shape), w.dtype)

    def _read(self, at: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        self.file.seek(at)
        if self.file.readinto(_bytes(out)) != out.nbytes:
            raise OSError(f"fxcc: the held weight file {self.file.name} ended early: a {tuple(shape)} weight cannot come "
                          "back")
        return out


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor `t`, in place."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _in_memory(directory: str) -> str | None:
    """Why `directory` keeps its files in memory (a tmpfs or ramfs mount) or cannot be told; None: on a disk."""
    path = os.path.realpath(directory)
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return "no /proc/mounts tells whether the artifact cache's directory is on a disk"
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    if best is None or best[1] in ("tmpfs", "ramfs"):
        return f"{directory} is on {best[1] if best else 'no known mount'}, in memory; set FXCC_CACHE_DIR to a disk"
    return None


def _reads(v, node: fx.Node) -> set | None:
    """The (store, key) pairs of the packed copies through which the kernels read the get_attr `node`: ("onednn",
    None) where a kernel's choice reads it only as the weight of its linears, packed by oneDNN; ("tvm-panels", tn) where
    a static TVM kernel reads it only as `tn`-column panels. None where anything reads it otherwise."""
    out = set()
    if not node.users:
        return None
    for user in node.users:
        if user.op != "call_function" or user.target not in KERNEL_OPS or node in user.kwargs.values():
            return None
        inputs, key = user.args[0], user.args[1]
        k = v.kernels.get(key)
        if k is None or k.choice is None or any(a is node for a in user.args[2:]):
            return None
        packed = {i for i, _, store in copies(k.body, k.choice.backend, k.choice.module) if store == "onednn"}
        panels = getattr(getattr(k.built, "fn", None), "panels", None) or {}
        places = [n for n in k.body.body.graph.nodes if n.op == "placeholder"]
        for i, a in enumerate(inputs):
            if a is not node:
                continue
            if i in panels:
                out.add(("tvm-panels", panels[i]))
            elif i in packed and all(u.target is torch.ops.aten.linear.default and u.args[1] is places[i]
                                     and places[i] is not u.args[0] and places[i] not in u.args[2:]
                                     for u in places[i].users):
                out.add(("onednn", None))
            else:
                return None
    return out


def _dense(w: torch.Tensor, reads: set) -> Callable[[], torch.Tensor] | None:
    """How to make `w`'s values again from a packed copy it is read through, where every such copy is current (a
    weight read as panels of one width only: the store keeps one); None otherwise."""
    make = None
    widths = {key for store, key in reads if store == "tvm-panels"}
    if len(widths) > 1:
        return None
    for tn in widths:
        panels = codegen.backend("tvm").kept_panels(w, tn)
        if panels is None:
            return None
        make = functools.partial(_from_panels, panels, tuple(w.shape))
    if ("onednn", None) in reads:
        packed = onednn.kept(w)
        if packed is None or packed.shape != w.shape:
            return None
        make = packed.to_dense
    return make


def _from_panels(panels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An [N, K] weight from its [N/tn, K, tn] column panels."""
    return panels.transpose(1, 2).reshape(shape).contiguous()


def release(root: object, weights: dict[int, tuple[torch.Tensor, set]], watched: list,
            sharded: list[torch.Tensor] = (), spill_dir: str | None = None) -> Held | None:
    """Hold `weights` (`packed_only`) as their packed copies alone, and `sharded` (`sharded_away`) as their bytes in a
    file under `spill_dir` (`_Spill`), where nothing but `root` (the compiled module; its `_model` the model) reaches
    the model, its submodules, parameters and buffers, those weights or their memory; None (nothing let go)
    otherwise. `watched`: the (tensor, snapshot) pairs of the runtime's guards."""
    pairs = [(w, make) for w, reads in weights.values() if (make := _dense(w, reads)) is not None]
    spill = list(sharded) if spill_dir is not None else []
    if not pairs and not spill:
        return None
    ws = [w for w, _ in pairs] + spill
    mine = [weights, *weights.values(), pairs, *pairs, sharded, spill]
    if (why := _held_elsewhere(root, ws, mine)) is not None:
        if why.startswith(_PLAIN):  # no garbage explains it: the caller holds the model
            log.debug("the weights stay beside their packed copies: %s", why)
            return None
        gc.collect()  # garbage that reaches the model (an export wrapper of an earlier compile, in a cycle) holds nothing
        if (why := _held_elsewhere(root, ws, mine)) is not None:
            log.debug("the weights stay beside their packed copies: %s", why)
            return None
    del mine
    del ws
    if spill:  # written only now: while the caller holds the model, nothing is written
        pairs += _Spill.of(spill, spill_dir)
    del spill
    held = Held([(w, make) for w, make in pairs if same_bits(make(), w)])  # else that weight stays
    cdata = {w.untyped_storage()._cdata for w, _ in held.weights}
    over = [(s, t) for t, s in _snapshots(watched) if t.untyped_storage()._cdata in cdata]
    for s, t in over:  # first: a check that runs meanwhile finds the weight changed, not its memory gone
        s.let_go(t)
    for w, _ in held.weights:  # the memory goes with the empty storage it is swapped into
        w.untyped_storage()._swap_data_ptr_(torch.UntypedStorage(0, device=w.device))
    for s, t in over:  # where the tensors are now: unchanged from here on
        s.let_go(t)
    held.snapshots = over
    if not held.weights:
        return None
    log.info("%d weights (%.1f MB) let go: held as their packed copies or shards alone", len(held.weights),
             held.nbytes / 2**20)
    return held


def _snapshots(watched: list) -> Iterator[tuple[torch.Tensor, Snapshot]]:
    """The runtime's guards' snapshots and those of the backends' derived values (fxcc.codegen.derived)."""
    yield from watched
    for store in codegen.STORES:
        for ref, snaps, _, _ in list(store.values()):
            w = ref()
            if w is not None:
                yield w, snaps[0]  # the weight's own; a source packed with it (a bias, scales) is not a weight


def _held_elsewhere(root: object, weights: list[torch.Tensor], mine: list) -> str | None:
    """Why something other than `root` may reach its model (`root._model`) or `weights` (None: nothing does). Every
    reference to the model, its submodules, parameters, buffers and `weights` must come from an object reachable from
    `root` (not through a function's globals, a class or a module: the interpreter's globals would count the caller's
    own references) or from this check's own containers (`weights`, those in `mine`), and every tensor over a weight's
    memory must be reachable from `root`. A reference no object shows (a frame's local, C++) counts as held elsewhere."""
    if (why := _model_held_plainly(root._model)) is not None:  # the common case, told without walking `root`
        return why
    reach, tensors = _reachable(root)
    targets = _targets(root._model, weights)
    # a weak reference to the model or a submodule is a way back to the weights no count shows (fxcc holds none);
    # the keys of weak dictionaries and sets are not (torch's compiler keeps every module made after it loads as one)
    if any(not _weak_key(r) for m in root._model.modules() for r in weakref.getweakrefs(m)):
        return "a weak reference to the model or a submodule"
    if any(id(t) not in reach for t in targets):
        return "the compiled module does not reach all of the model"
    inside = _references(targets, reach | {id(targets), id(weights), id(mine), *map(id, mine)})
    for t in targets:  # uncounted references here: `t` and getrefcount's argument
        if sys.getrefcount(t) - 2 != inside[id(t)]:
            return f"something else holds a {type(t).__name__} of the model"
    for w in weights:
        s = w.untyped_storage()
        over = sum(1 for at, cdata in tensors if at == _address(w) and cdata == s._cdata)
        # `s` itself is one use; its references: `s`, getrefcount's argument and the storage's own (as
        # fxcc.codegen.reusable counts them)
        if torch._C._storage_Use_Count(s._cdata) != over + 1 or sys.getrefcount(s) != 3:
            return f"something else holds the memory of a {tuple(w.shape)} weight (a view of it, its storage)"
    return None


_PLAIN = "plainly: "  # how `_model_held_plainly`'s reasons start


def _model_held_plainly(model: torch.nn.Module) -> str | None:
    """Why the model is held elsewhere, where that shows at once: a module's globals hold it (a script's `model`), or
    more references than the objects referring to it hold (a running function's local, C++). None: look closer."""
    holders = gc.get_referrers(model)
    if any(type(r) is dict and "__builtins__" in r and "__name__" in r for r in holders):
        return _PLAIN + "a module's globals hold the model"
    shown = sum(1 for r in holders for x in gc.get_referents(r) if x is model)
    del holders
    if sys.getrefcount(model) - 2 > shown:  # uncounted: `model` here and getrefcount's argument
        return _PLAIN + "a reference no object shows holds the model (a running function's local)"
    return None


def _weak_key(r: weakref.ref) -> bool:
    """Whether weak reference `r` is a key of a weak dictionary or set (Python's, torch's `ExactWeakKeyDictionary`), by
    the callback they give it."""
    name = getattr(r.__callback__, "__qualname__", "") or ""
    return "WeakKeyDictionary." in name or "WeakSet." in name


def _references(targets: list, holders: set[int]) -> dict[int, int]:
    """id of each of `targets` -> how many references to it the objects whose ids are in `holders` hold."""
    inside = dict.fromkeys(map(id, targets), 0)
    for r in gc.get_referrers(*targets):
        if id(r) in holders:
            for x in gc.get_referents(r):
                if id(x) in inside:
                    inside[id(x)] += 1
    return inside


def _targets(model: torch.nn.Module, weights: list[torch.Tensor]) -> list:
    return list({id(t): t for t in (model, *model.modules(), *model.parameters(), *model.buffers(), *weights)}
                .values())


_LEAVES = (type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def _reachable(root: object) -> tuple[set[int], list[tuple[int, int]]]:
    """The ids of the objects reachable from `root` through containers, instances, bound methods and closures (not a
    function's globals, classes or modules), and the memory (address, storage) of the CPU tensors among them."""
    seen, todo, tensors = {id(root)}, [root], []
    while todo:
        o = todo.pop()
        if isinstance(o, types.FunctionType):
            nxt = [c.cell_contents for c in o.__closure__ or () if _filled(c)] + list(o.__defaults__ or ())
        else:
            nxt = gc.get_referents(o)
        for x in nxt:
            if id(x) in seen or isinstance(x, _LEAVES):
                continue
            seen.add(id(x))
            if type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu" and not x.is_mkldnn:
                tensors.append((_address(x), x.untyped_storage()._cdata))
            todo.append(x)
    return seen, tensors


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True
