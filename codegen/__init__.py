"""fxcc.codegen: one module per backend; each turns a `kernel` op into candidate implementations.

A backend module is a `Backend`: `name`, `available(target) -> str | None` (None when usable, else why not),
`candidates(kb, target) -> list[Candidate]` and `load(kb, label, files, params) -> Built`, which rebuilds
a kernel from the files an earlier `Candidate.build` returned (the artifact cache) without generating code.
`BACKENDS` names them; `backend(name)` imports one on first use, so a CPU compile never imports Triton.
A `Candidate` is one implementation of one kernel op with its parameter space: the tuner searches `space`,
the selection (fxcc.autotune.select) builds `defaults` (or tuned parameters) and chooses by measurement.
Emission only: what to build is decided above this layer.
"""

from __future__ import annotations

import importlib
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
from fxcc import ir
from fxcc.watch import Snapshot
from torch import Tensor

KernelFn = Callable[[list[Tensor]], list[Tensor]]


def reusable(pool: list, j: int) -> bool:
    """Whether the tensor in pool[j] is held by nothing else, so a kernel may write its next result
    into it: no other Python reference (only the pool's, a local's and getrefcount's argument), no
    view of its memory (only the tensor's own and this check's storage object) and no holder of its storage
    object (`y.untyped_storage()` kept after `y` is dropped: that object is one per storage, and counts no
    use of it; unheld, its references are the local's, getrefcount's argument and the storage's own). Reusing an output buffer spares a fresh multi-megabyte allocation per call, whose page faults
    cost more than the op."""
    t = pool[j]
    if t is None or sys.getrefcount(pool[j]) != 3:
        return False
    s = t.untyped_storage()
    return torch._C._storage_Use_Count(s._cdata) == 2 and sys.getrefcount(s) == 3


def is_parameter(t: object) -> bool:
    """isinstance(t, nn.Parameter), without Parameter's own isinstance hook (about a microsecond) for a plain
    tensor or a parameter itself."""
    kind = type(t)
    return kind is torch.nn.Parameter or (kind is not Tensor and isinstance(t, torch.nn.Parameter))


def is_weight(t: object) -> bool:
    """A parameter, or a weight a pass made of the model's tensors (merged Q/K/V: fxcc.ir.computed_from)."""
    return is_parameter(t) or (type(t) is Tensor and ir.sources_of(t) is not None)


class KeptView:
    """A view of one weight (`is_weight`) that a kernel keeps across calls (a view costs about a microsecond a
    call), held only while that weight lives: the kernel holds the weight weakly, and when it goes the view goes
    with it. A kernel built and timed on weight copies, or on a merged weight a later compile replaced, so pins
    neither the copy's memory nor what other kernels derived from it (`derived`, keyed by the weight's life). An
    activation is never kept: its view would pin a buffer the next call reuses."""

    __slots__ = ("address", "ref", "view")

    def __init__(self) -> None:
        self.ref, self.view, self.address = None, None, 0

    def get(self, t: Tensor) -> Tensor | None:
        """The view kept for `t` where `t` is the parameter it was made of and still in the same memory."""
        if self.ref is not None and self.ref() is t and torch._C._data_address(t) == self.address:
            return self.view
        return None

    def keep(self, t: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
        """`make(t)`, a view, kept if `t` is a weight. It is made of `t.detach()`: a view of `t` itself would
        hold `t` (its base) alive from C++, and the weak reference would never let go."""
        if not is_weight(t):
            return make(t)
        view = make(t.detach())
        self.ref, self.view, self.address = weakref.ref(t, self._gone), view, torch._C._data_address(t)
        return view

    def _gone(self, ref: weakref.ref) -> None:
        if ref is self.ref:
            self.ref, self.view = None, None


def linear_weight(node: torch.fx.Node) -> Tensor | None:
    """The (fake) value of a linear's weight when it is a 2-D kernel input, the case backends that keep a
    packed copy of the weight can serve; None for anything else."""
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
        return None
    w = node.args[1]
    val = w.meta.get("val") if isinstance(w, torch.fx.Node) and w.op == "placeholder" else None
    return val if isinstance(val, Tensor) and val.dim() == 2 else None


STORES: list[dict] = []  # every store of derived values (`store`), for what must find all of them (fxcc.held)


def store() -> dict:
    """A new, registered store for `derived`: id(weight) -> (weakref to it, snapshots, key, value)."""
    out: dict[int, tuple] = {}
    STORES.append(out)
    return out


def derived(store: dict, w: Tensor, key: object, make: Callable[[], object], sources: tuple = ()) -> object:
    """A value derived from weight `w` (and the tensors in `sources`, such as a bias packed with it): a packed or
    aligned copy, made once and again only when one of them changes (the one test of fxcc.watch, which sees
    writes through `.data` and swapped storage too) or `key` differs. `store` maps id(w) to
    (weakref to w, snapshots, key, value); an entry goes when its weight is collected."""
    hit = store.get(id(w))
    if hit is not None and hit[0]() is w and hit[2] == key and all(s.same(t) for t, s in zip((w, *sources), hit[1])):
        return hit[3]
    if hit is None or hit[0]() is not w:
        weakref.finalize(w, store.pop, id(w), None)
    value = make()
    store[id(w)] = (weakref.ref(w), [Snapshot(t) for t in (w, *sources)], key, value)
    return value


def readable(w: Tensor) -> Tensor:
    """`w` for a library routine that asks for a writable pointer although it only reads (oneDNN's and MKL's weight
    packing): a transient copy where `w`'s storage is shared copy-on-write (a merged weight, whose parts the runtime
    watches: fxcc.watch). Asked of `w` itself, the write access would move `w` to new memory and leave the watcher's
    snapshot holding the old: a second full copy of the weight, kept as long as the model lives."""
    return w.clone() if _is_cow(w) else w


_is_cow = getattr(torch._C, "_is_cow_tensor", lambda t: False)


@dataclass
class Built:
    """What building a candidate produced: the callable, its readable source and files for the cache."""

    fn: KernelFn
    source: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    inline: torch.fx.Graph | None = None  # torch calls the runtime may splice in place of calling `fn`


class Candidate(Protocol):
    """One candidate implementation of one kernel op.

    space: parameter name -> the values it may take (the tuner's search space; empty: nothing to tune).
    defaults: parameters that are good without tuning.
    build(params): generate and compile; raises on failure (the caller falls back and warns).
    """

    backend: str
    space: dict[str, list]
    defaults: dict

    def build(self, params: dict) -> Built: ...


class Backend(Protocol):
    """What a backend module provides (fxcc.codegen.extern, .tvm, .triton)."""

    name: str

    def available(self, target: str) -> str | None: ...

    def candidates(self, kb, target: str) -> list[Candidate]: ...

    def load(self, kb, label: str, files: dict[str, Path], params: dict) -> Built: ...


def check(label: str, got: list[torch.Tensor], ref: list[torch.Tensor], tol: float = 0.0) -> None:
    """Raise when a candidate's outputs differ from the reference beyond fp tolerance (the dtype's, or `tol` where
    larger); NaN and inf must sit where the reference has them."""
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if g.shape != r.shape or g.dtype != r.dtype:
            raise ValueError(f"output {i} is {g.dtype}{list(g.shape)}, expected {r.dtype}{list(r.shape)}")
        tol = max(tol, 1e-4 if r.dtype == torch.float32 else 2e-2)
        # absolute error on the output's scale: a long reduction summed in another order (a library GEMM
        # on packed weights) differs by far more than `tol` where its terms cancel; a wrong result by far more
        finite = r[torch.isfinite(r)] if r.dtype.is_floating_point else r
        scale = float(finite.abs().max()) if r.dtype.is_floating_point and finite.numel() else 0.0
        if r.dtype.is_floating_point and not torch.allclose(g, r, rtol=tol, atol=tol * max(1.0, scale),
                                                            equal_nan=True):
            bad = ~torch.isclose(g, r, rtol=tol, atol=tol * max(1.0, scale), equal_nan=True)
            raise ValueError(f"output {i} differs from the reference at {int(bad.sum())} of {r.numel()} places "
                             f"(e.g. {g[bad][0].item():.4g} vs {r[bad][0].item():.4g})")
        if not r.dtype.is_floating_point and not torch.equal(g, r):
            raise ValueError(f"output {i} differs from the reference")


# backend name -> module, imported on first use (`backend`)
BACKENDS = {"extern": "fxcc.codegen.extern", "tvm": "fxcc.codegen.tvm", "triton": "fxcc.codegen.triton"}


def backend(name: str) -> ModuleType:
    """The backend module `name` (a `Backend`); ImportError when its library is not installed."""
    return importlib.import_module(BACKENDS[name])


# the kernels of tx ops that name one (`impl`) are registered on their ops when fxcc.codegen is imported
from fxcc.codegen import allreduce_rmsnorm, quant  # noqa: E402, F401
