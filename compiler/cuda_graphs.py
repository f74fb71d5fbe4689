"""CUDA graphs of compiled variants: one replay per call instead of one launch per kernel.

A graph reads its inputs from buffers it was captured on. The call's own inputs (token ids, masks) are
copied into those buffers, unless a call's input already is that buffer (same address, shape and strides);
tensors the graph reads and writes in place (a KV cache, a buffer the model updates) are captured as they
are, so a replay writes the caller's cache directly and nothing else is copied: such a graph serves the
tensors at the addresses (and with the shapes and strides) it was captured on. A server's every generate makes a
new cache, at other addresses: the last graph captured for those shapes (the adopter) keeps the memory it writes in
place, and once its caller has dropped that cache, a call with another cache of the same shapes is replayed with
its cache copied into that memory and back. Copies cost per call what a capture costs once, so a key copies only
until its copies' estimated time reaches the adopter's capture time, and is then captured itself (a short generate
copies, a long one captures; either way within twice the cheaper). One cache's memory per shapes is kept this way;
other graphs keep only addresses. A variant keeps at most MAX_GRAPHS captures and drops the one replayed least
recently for a new one.

Outputs are not cloned: a call returns new tensors over the graph's own output memory. Their lifetime is
eager's: a result the caller holds (or a view of it, or its storage) never changes under it. A replay
writes that memory again only when nothing of the last replay's outputs is held any more (their storages'
use counts are back to what the graph alone holds). While some are held, a second graph of the same call,
captured in its own memory pool the first time this happens, serves the call (a loop `y = f(x)` alternates
between the two); while the outputs of both are held (a caller keeping every result), the call runs
uncaptured, and that is logged once and counted (`overlapped`). Outputs that are the call's own inputs
(the cache it returns) are the caller's tensors, as before.
"""

from __future__ import annotations

import logging
import operator
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .measure import capture_graph, compare

log = logging.getLogger(__name__)


def _address(t: torch.Tensor) -> int:
    """Where `t`'s first element is, read without asking for write access (which would give a tensor the
    guards watch by copy-on-write a copy of its memory: fxcc.watch)."""
    return torch._C._data_address(t) + t.storage_offset() * t.element_size()

_BASE, _OFFSET, _ITEMSIZE = torch._C._data_address, torch.Tensor.storage_offset, torch.Tensor.element_size
_SHAPE = operator.attrgetter("shape")
_STRIDE = torch.Tensor.stride


def _pick(positions: list[int]) -> Callable[[list[Any]], tuple]:
    """A function giving the items of a list at `positions`, as a tuple (one C call)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda xs: (xs[positions[0]],)) if positions else (lambda xs: ())


_WARMUP = 2  # runs before a capture (lazy initialisation, autotuning)
# a replay saves about one host launch per op and costs a copy of each input that is not already in the graph's
# buffer: graphs whose copies would take longer than the launches they save are not captured at all (a large
# elementwise op), the rest are timed against running uncaptured (`pays`)
LAUNCH_S = 5e-6  # host time of one op's launch on a GPU, seconds
COPY_BYTES_PER_S = 2e12  # device copy bandwidth, bytes read + written per second (H100/H200: about 3e12)
MAX_GRAPHS = 8  # captures kept per variant with symbolic sizes (a call's second graph counts as one)
_THRASH = 8  # replays under which a dropped graph did not pay for its capture (about 4 calls' time)
_use_count = torch._C._storage_Use_Count  # references to a storage: tensors over it (views too), storage objects


def _storages(outs: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[torch.UntypedStorage]:
    """The storages of `outs`, once each, but those of the caller's tensors `theirs` (an in-place input: what a
    replay writes there changes under the caller in eager too)."""
    skip = {t.untyped_storage()._cdata for t in theirs}
    found: dict[int, torch.UntypedStorage] = {}
    for t in outs:
        st = t.untyped_storage()
        if st._cdata not in skip:
            found.setdefault(st._cdata, st)
    return list(found.values())


class _Capture:
    """One captured graph: the buffers it reads, the outputs it writes (in its own memory pool), and the use
    count of each output storage while nothing of it is handed out."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static: list[Any], outs: list[Any], inplace: frozenset[int],
                 keep: frozenset[int]):
        self.copied = [(i, x, _address(x), x.shape, x.stride()) for i, x in enumerate(static)
                       if isinstance(x, torch.Tensor) and i not in inplace]
        self.given = [j for j, o in enumerate(outs) if isinstance(o, torch.Tensor) and j not in keep]
        # inference tensors (captured in inference mode for a cache made there) leave it as copies, as eager's
        # outputs of a call outside inference mode are normal tensors
        self.inference = any(outs[j].is_inference() for j in self.given)
        self.storages = _storages([outs[j] for j in self.given], [static[i] for i in inplace])
        # the caller's in-place tensors are not held (their memory is, while this graph adopts: below). An output
        # that is one of them is the call's tensor at that position, found by identity at capture.
        self.returned = [(j, next((i for i in inplace if static[i] is outs[j]), None)) for j in keep
                         if j < len(outs) and isinstance(outs[j], torch.Tensor)]
        self.placed = [(i, _address(static[i])) for i in sorted(inplace)]
        # the memory the graph reads and writes in place, kept (its storages) while this graph is its call's
        # adopter (CudaGraphs), with a weak reference to the caller's tensor over it: once the caller drops them,
        # the graph serves another cache of the same shapes, copied into that memory and back (`adopt`)
        ours = {st._cdata for st in (static[i].untyped_storage() for i in inplace)}
        aliased = any(outs[j].untyped_storage()._cdata in ours for j in self.given)  # an output is a view of it
        self.memory = None if aliased else [
            (i, weakref.ref(static[i]), static[i].untyped_storage(), static[i].storage_offset(), static[i].shape,
             static[i].stride(), static[i].dtype) for i in sorted(inplace)]
        self.buffers: list[tuple[int, torch.Tensor]] | None = None  # tensors over that memory, made at first use
        self.expected: list[tuple[int, int]] = []  # per storage of it: its use count when only this graph holds it
        outs = list(outs)
        for j, i in self.returned:
            if i is not None:
                outs[j] = None
        static = [None if i in inplace else x for i, x in enumerate(static)]
        self.graph, self.static, self.outs = graph, static, outs
        self.unheld = self._counts()  # nothing handed out yet (and no other reference to a storage object here)
        self.copies = 0  # inputs copied into the buffers (tests count them)
        self.copy_host_s = 0.0  # host seconds the last `adopt` spent issuing its copies

    def _counts(self) -> list[tuple[int, int]]:
        """Per output storage: the tensors (views too) over it, and the holders of its storage object (one
        object per storage while the storage lives: a caller's `y.untyped_storage()` is this one)."""
        return [(_use_count(s._cdata), sys.getrefcount(s)) for s in self.storages]

    def free(self) -> bool:
        """Whether nothing of the last replay's outputs is held: a replay may write them again."""
        return all(n <= m and r <= q for (n, r), (m, q) in zip(self._counts(), self.unheld))

    def release(self) -> None:
        """No longer keep the in-place memory (another graph of the same shapes adopts calls now)."""
        self.memory = self.buffers = None

    def private(self) -> bool:
        """Whether the in-place memory is this graph's alone: the caller's tensors over it are gone and no view of
        it is left anywhere (its storages' use counts are this graph's own references)."""
        if self.memory is None or any(ref() is not None for _, ref, *_ in self.memory):
            return False
        if self.buffers is None:
            with torch.inference_mode(True):  # a cache made in inference mode has inference tensors
                self.buffers = [(i, torch.empty(0, dtype=dtype, device=st.device).set_(st, off, shape, stride))
                                for i, _, st, off, shape, stride, dtype in self.memory]
            mine: dict[int, int] = {}
            for _, b in self.buffers:
                c = b.untyped_storage()._cdata
                mine[c] = mine.get(c, 1) + 1  # the storage object, and each buffer over it
            self.expected = list(mine.items())
        return all(_use_count(c) == n for c, n in self.expected)

    def adopt(self, flat: list[Any]) -> list[Any]:
        """Replay for a call whose in-place inputs are other tensors of the captured shapes and strides: they are
        copied into the graph's in-place memory, and back after the replay (`private()` must hold)."""
        # one multi-tensor copy each way: a cache holds two tensors per layer, and a launch per tensor cost more
        # than the bytes (96 copies of a 16-layer decode step)
        mine, theirs = [b for _, b in self.buffers], [flat[i] for i, _ in self.buffers]
        t0 = time.perf_counter()
        with torch.inference_mode(True):  # in-place writes to inference and normal tensors alike
            torch._foreach_copy_(mine, theirs)
        t1 = time.perf_counter()
        outs = self.replay(flat)
        t2 = time.perf_counter()
        with torch.inference_mode(True):
            torch._foreach_copy_(theirs, mine)
        self.copy_host_s = (t1 - t0) + (time.perf_counter() - t2)
        return outs

    def replay(self, flat: list[Any]) -> list[Any]:
        for i, buf, at, shape, stride in self.copied:
            x = flat[i]
            if _address(x) != at or x.stride() != stride or x.shape != shape:  # the input moved
                buf.copy_(x)
                self.copies += 1
        self.graph.replay()
        outs = list(self.outs)
        for j, i in self.returned:
            if i is not None:
                outs[j] = flat[i]
        if self.inference and not torch.is_inference_mode_enabled():
            for j in self.given:
                outs[j] = outs[j].clone()
        else:
            for j in self.given:
                outs[j] = outs[j].detach()  # a new tensor over the graph's memory, which the use count sees
        return outs


def _capture(fn: Callable[..., Any], flat: list[Any], name: str, inplace: frozenset[int],
             keep: frozenset[int]) -> _Capture | None:
    """`fn` captured on buffers like `flat`, reading the inputs in `inplace` where they are; None (logged)
    when capturing fails. The warm-up runs write into in-place inputs: they are restored."""
    try:
        with torch.inference_mode(False):  # buffers a later call outside inference mode may copy into
            static = [x if i in inplace else
                      torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
                      if isinstance(x, torch.Tensor) else x for i, x in enumerate(flat)]
            saved = {i: flat[i].clone() for i in inplace}
        # in-place inputs made under inference mode (a cache built inside `torch.inference_mode()`) may be
        # written only there: capture in the mode they need (a replay writes them in any mode)
        infer = any(flat[i].is_inference() for i in inplace)
        with torch.inference_mode(infer), torch.no_grad():
            runs = [0]

            def restore() -> None:
                for i, t in saved.items():
                    flat[i].copy_(t)

            def run() -> Any:
                out = fn(*static)
                runs[0] += 1
                if runs[0] <= _WARMUP:  # a warm-up run: undo its writes
                    restore()
                return out

            graph, outs = capture_graph(run, warmup=_WARMUP)  # a new graph: its own memory pool
            restore()  # capturing runs nothing on a GPU; a capture that ran (a stand-in) is undone too
    except Exception as e:  # an op that cannot be captured (a host sync, a CPU tensor): run uncaptured
        torch.cuda.synchronize()  # nothing of the failed warm-up (on a side stream) still runs on freed buffers
        if "saved" in locals():  # a run that stopped part-way may have written some of its in-place inputs
            with torch.inference_mode(any(flat[i].is_inference() for i in saved)):
                for i, t in saved.items():
                    flat[i].copy_(t)
        log.warning("%s runs without a CUDA graph: capture failed (%s: %s)", name, type(e).__name__, e)
        return None
    return _Capture(graph, static, list(outs), inplace, keep)


class CudaGraph:
    """A variant's executable captured as a CUDA graph for one set of input shapes (and in-place inputs), and
    a second capture of it for calls made while the caller holds the first one's outputs.

    Built by `capture`, which returns None (and logs why) when capturing fails; the variant then runs its
    executable as before. A call returns None where it does not replay: the variant runs uncaptured.
    """

    def __init__(self, first: _Capture, fn: Callable[..., Any], name: str, inplace: frozenset[int],
                 keep: frozenset[int]):
        self.captures = [first]
        self.fn, self.name, self.inplace, self.keep = fn, name, inplace, keep
        self.addresses = first.placed
        self.second = True  # a second capture may still be taken
        self.used = self.hits = 0  # CudaGraphs' tick at this graph's last replay, and its replays there
        self.capture_s = 0.0  # seconds its capture took (warm-up runs included)
        self.overlapped = 0  # calls run uncaptured because the outputs of every capture were held

    @staticmethod
    def capture(fn: Callable[..., Any], flat: list[Any], name: str, inplace: frozenset[int] = frozenset(),
                keep: frozenset[int] = frozenset()) -> CudaGraph | None:
        """Capture `fn` on buffers like `flat`, reading the inputs in `inplace` where they are; outputs in
        `keep` (the call's own inputs) are handed back as they are."""
        first = _capture(fn, flat, name, inplace, keep)
        return CudaGraph(first, fn, name, inplace, keep) if first is not None else None

    def __call__(self, flat: list[Any], room: Callable[[], bool] = lambda: True,
                 placed: bool = False) -> list[Any] | None:
        """Replay on these inputs, into a capture whose outputs the caller no longer holds; None when an
        in-place input is another tensor than the one captured, or when every capture's outputs are held.
        `room`: whether a second capture may be taken now; `placed`: the in-place inputs' addresses were found
        to be the captured ones already (CudaGraphs keys its graphs by them)."""
        if not placed and any(_address(flat[i]) != ptr for i, ptr in self.addresses):
            return None
        for c in self.captures:
            if c.free():
                return c.replay(flat)
        if self.second and room():
            self.second = False
            c = _capture(self.fn, flat, self.name, self.inplace, self.keep)
            if c is not None:
                self.captures.append(c)
                return c.replay(flat)
        self.overlapped += 1
        if self.overlapped == 1:
            log.info("%s runs uncaptured while the caller holds the outputs of each of its CUDA graphs' last "
                     "replays (a replay would overwrite them); counted in `fxcc explain`", self.name)
        return None


def copies_outweigh_launches(flat: list[Any], ops: int) -> str | None:
    """Why a graph of `ops` launches over these inputs costs more in copies than it saves in launches, or None.
    Every input is counted (a caller's tensor is rarely the graph's own buffer); outputs cost nothing (handed
    out without copies)."""
    in_bytes = sum(x.numel() * x.element_size() for x in flat if isinstance(x, torch.Tensor))
    copies = 2 * in_bytes / COPY_BYTES_PER_S
    if copies <= ops * LAUNCH_S:
        return None
    return (f"copying {in_bytes / 2**20:.0f} MiB of inputs in (about {copies * 1e3:.2f} ms) costs more than the "
            f"{ops} launches a replay saves")


def pays(graph: CudaGraph, flat: list[Any], plain: Callable[[], Any]) -> str | None:
    """None when replaying `graph` (input copies included; its outputs are handed out without copies) is not
    beaten by running its executable uncaptured (`plain`) beyond the noise; else why the graph is dropped.
    For graphs without in-place inputs: both runs are free of effects."""
    d = compare({"graph": lambda: graph(flat), "uncaptured": plain}, "graph", device="cuda", warmup=2, reps=10)
    return None if d.winner == "graph" else f"timed slower than running uncaptured: {d.summary()}"


class CudaGraphs:
    """The CUDA graphs of a variant whose calls vary (symbolic sizes, or a cache that may be replaced):
    one graph per input shapes, int and float inputs and in-place input addresses, captured the second time that key
    is seen; at MAX_GRAPHS captures the one replayed least recently makes room (`evicted` counts them).
    A static cache's decode step repeats its key every token; a growing cache's never does, and costs no
    capture."""

    def __init__(self, fn: Callable[..., Any], name: str, inplace: frozenset[int], keep: frozenset[int]):
        self.fn, self.name, self.inplace, self.keep = fn, name, inplace, keep
        self.graphs: dict[tuple, CudaGraph | None] = {}
        self.seen: dict[tuple, int] = {}
        self._places = sorted(inplace)
        self._types: list[type] | None = None  # the flat inputs' types, and where the tensors and ints are among them
        self._layouts: dict[tuple, int] = {}  # each sequence of types seen -> its number, part of the key
        self._layout = -1
        self._tensors = self._ints = self._inplace = _pick([])
        self._tick = 0  # replays so far: each graph keeps the tick of its last (`used`), the least recent goes first
        self.evicted = 0  # graphs dropped for room (the least recently used)
        self.wasted = 0  # of those, dropped after fewer than _THRASH replays
        self.adopters: dict[tuple, CudaGraph] = {}  # per key less the in-place addresses: the graph calls adopt
        self.copy_s: dict[tuple, float] = {}  # per key: estimated seconds of in-place copies spent adopting
        self.adoptions = 0  # calls replayed with their in-place inputs copied in and back

    @property
    def overlapped(self) -> int:
        return sum(g.overlapped for g in self.graphs.values() if g is not None)

    def _room(self) -> bool:
        """Whether another capture fits within MAX_GRAPHS."""
        return sum(len(g.captures) for g in self.graphs.values() if g is not None) < MAX_GRAPHS

    def _key(self, flat: list[Any]) -> tuple:
        """What selects a graph: the inputs' types, every tensor input's shape, every int and float input, every
        in-place input's address (`_address`) and strides. Built in C-level passes over positions found once per sequence of
        types."""
        types = list(map(type, flat))
        if types != self._types:
            self._types = types
            self._layout = self._layouts.setdefault(tuple(types), len(self._layouts))
            self._tensors = _pick([i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)])
            # a float input too: a replay would run with the value its capture baked into the launches
            self._ints = _pick([i for i, t in enumerate(types) if t is int or t is float])
            self._inplace = _pick(self._places)
        ins = self._inplace(flat)
        return (self._layout, tuple(map(_SHAPE, self._tensors(flat))), self._ints(flat), tuple(map(_STRIDE, ins)),
                tuple(map(operator.add, map(_BASE, ins), map(operator.mul, map(_OFFSET, ins), map(_ITEMSIZE, ins)))))

    def __call__(self, flat: list[Any]) -> list[Any] | None:
        key = self._key(flat)
        graph = self.graphs.get(key)
        if graph is not None:
            self._touch(graph)
            return graph(flat, self._room, placed=True)
        if key in self.graphs:  # capture failed for this key
            return None
        if len(self.seen) > 4 * MAX_GRAPHS:
            self.seen.clear()
        self.seen[key] = self.seen.get(key, 0) + 1
        outs = self._adopted(key, flat)
        if outs is not None:
            return outs
        if self.seen[key] < 2:
            return None
        if not self._evict():
            return None
        t0 = time.perf_counter()
        self.graphs[key] = graph = CudaGraph.capture(self.fn, flat, self.name, self.inplace, self.keep)
        if graph is None:
            return None
        self._touch(graph, hit=False)
        graph.capture_s = time.perf_counter() - t0
        if self.inplace:
            was = self.adopters.get(key[:-1])
            if was is not None and was is not graph:
                for c in was.captures:
                    c.release()
            self.adopters[key[:-1]] = graph
        return graph(flat, self._room)

    def _adopted(self, key: tuple, flat: list[Any]) -> list[Any] | None:
        """The call replayed by the graph of its shapes whose in-place memory the last caller dropped (a new
        cache per generate), its in-place inputs copied in and back; None where none can. Copies cost per call
        what a capture costs once: a key copies until its copies' estimated time reaches the adopter's capture
        time, then is captured (as renting before buying, within twice the better of the two). A call's copies
        are estimated from their bytes and the host time spent issuing them."""
        graph = self.adopters.get(key[:-1]) if self.inplace else None
        if graph is None or graph.captures[0].memory is None:
            return None
        c = graph.captures[0]
        spent = self.copy_s.get(key, 0.0)
        if spent >= graph.capture_s or not c.free() or not c.private():
            return None
        if len(self.copy_s) > 4 * MAX_GRAPHS:
            self.copy_s.clear()
        nbytes = sum(flat[i].numel() * flat[i].element_size() for i in self.inplace)
        self._touch(graph)
        self.adoptions += 1
        outs = c.adopt(flat)
        # the device's time for the bytes (in and back, each read and written) and the host's for issuing the
        # copies, measured: a cache of many small tensors (two per layer) costs more in launches than in bytes
        self.copy_s[key] = spent + 4 * nbytes / COPY_BYTES_PER_S + c.copy_host_s
        return outs

    def _touch(self, graph: CudaGraph, hit: bool = True) -> None:
        """`graph` replayed now (the least recently replayed is evicted first); `hit`: a replay of a kept graph."""
        self._tick += 1
        graph.used = self._tick
        graph.hits += hit

    def _evict(self) -> bool:
        """Room for one more capture, or False: the graphs replayed least recently are dropped (their memory pools
        with them; outputs a caller still holds keep their memory), and their keys need two calls again. Keys
        that take turns beyond MAX_GRAPHS would capture at every turn: once MAX_GRAPHS
        graphs were dropped after fewer than _THRASH replays each, no graph is dropped any more."""
        while not self._room():
            if self.wasted >= MAX_GRAPHS:
                if self.wasted == MAX_GRAPHS:
                    self.wasted += 1
                    log.info("%s: more call shapes take turns than %d CUDA graphs hold; the graphs it has stay, "
                             "other shapes run uncaptured", self.name, MAX_GRAPHS)
                return False
            old = min((k for k, g in self.graphs.items() if g is not None), key=lambda k: self.graphs[k].used)
            gone = self.graphs.pop(old)
            self.wasted += gone.hits < _THRASH
            if self.adopters.get(old[:-1]) is gone:
                del self.adopters[old[:-1]]
            self.seen.pop(old, None)
            self.evicted += 1
        return True
