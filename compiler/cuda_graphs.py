"""CUDA graphs of compiled variants: one replay per call instead of one launch per kernel.

A graph reads its inputs from buffers it was captured on. The call's own inputs (token ids, masks) are
copied into those buffers; tensors the graph reads and writes in place (a KV cache, a buffer the model
updates) are captured as they are, so a replay writes the caller's cache directly and nothing else is
copied: such a graph serves only while those tensors are the same (their addresses are checked). Outputs
are cloned out of the graph's memory, so a result stays valid after the next call, except outputs that
are the call's own inputs (the cache it returns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .measure import capture_graph, compare

log = logging.getLogger(__name__)


def _address(t: torch.Tensor) -> int:
    """Where `t`'s first element is, read without asking for write access (which would give a tensor the
    guards watch by copy-on-write a copy of its memory: fxcc.watch)."""
    return torch._C._data_address(t) + t.storage_offset() * t.element_size()

_WARMUP = 2  # runs before a capture (lazy initialisation, autotuning)
# a replay saves about one host launch per op and costs a copy of each input and a clone of each output:
# graphs whose copies would take longer than the launches they save are not captured at all (a large
# elementwise op), the rest are timed against running uncaptured (`pays`)
LAUNCH_S = 5e-6  # host time of one op's launch on a GPU, seconds
COPY_BYTES_PER_S = 2e12  # device copy bandwidth, bytes read + written per second (H100/H200: about 3e12)
MAX_GRAPHS = 8  # graphs kept per variant with symbolic sizes (one per concrete size that repeats)


class CudaGraph:
    """A variant's executable captured as one CUDA graph for one set of input shapes (and in-place inputs).

    Built by `capture`, which returns None (and logs why) when capturing fails; the variant then runs its
    executable as before.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, static: list[Any], outs: Any, inplace: frozenset[int],
                 keep: frozenset[int]):
        self.graph = graph
        self.static = static
        self.inplace = inplace
        self.copied = [i for i, x in enumerate(static) if isinstance(x, torch.Tensor) and i not in inplace]
        self.addresses = [(i, _address(static[i])) for i in sorted(inplace)]
        self.outs = outs
        self.keep = keep

    @staticmethod
    def capture(fn: Callable[..., Any], flat: list[Any], name: str, inplace: frozenset[int] = frozenset(),
                keep: frozenset[int] = frozenset()) -> CudaGraph | None:
        """Capture `fn` on buffers like `flat`, reading the inputs in `inplace` where they are; outputs in
        `keep` are not cloned at replay. The warm-up runs write into in-place inputs: they are restored."""
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

                graph, outs = capture_graph(run, warmup=_WARMUP)
                restore()  # capturing runs nothing on a GPU; a capture that ran (a stand-in) is undone too
        except Exception as e:  # an op that cannot be captured (a host sync, a CPU tensor): run uncaptured
            torch.cuda.synchronize()  # nothing of the failed warm-up (on a side stream) still runs on freed buffers
            if "saved" in locals():  # a run that stopped part-way may have written some of its in-place inputs
                with torch.inference_mode(any(flat[i].is_inference() for i in saved)):
                    for i, t in saved.items():
                        flat[i].copy_(t)
            log.warning("%s runs without a CUDA graph: capture failed (%s: %s)", name, type(e).__name__, e)
            return None
        return CudaGraph(graph, static, outs, inplace, keep)

    def __call__(self, flat: list[Any]) -> list[Any] | None:
        """Replay on these inputs; None when an in-place input is another tensor than the one captured."""
        if any(_address(flat[i]) != ptr for i, ptr in self.addresses):
            return None
        static = self.static
        for i in self.copied:
            static[i].copy_(flat[i])
        self.graph.replay()
        return [o.clone() if isinstance(o, torch.Tensor) and j not in self.keep else o
                for j, o in enumerate(self.outs)]


def copies_outweigh_launches(flat: list[Any], out_bytes: int, ops: int) -> str | None:
    """Why a graph of `ops` launches over these inputs and `out_bytes` of outputs costs more in copies than
    it saves in launches, or None."""
    in_bytes = sum(x.numel() * x.element_size() for x in flat if isinstance(x, torch.Tensor))
    copies = 2 * (in_bytes + out_bytes) / COPY_BYTES_PER_S
    if copies <= ops * LAUNCH_S:
        return None
    return (f"copying {in_bytes / 2**20:.0f} MiB of inputs in and cloning {out_bytes / 2**20:.0f} MiB of outputs "
            f"out (about {copies * 1e3:.2f} ms) costs more than the {ops} launches a replay saves")


def pays(graph: CudaGraph, flat: list[Any], plain: Callable[[], Any]) -> str | None:
    """None when replaying `graph` (input copies and output clones included) is not beaten by running its
    executable uncaptured (`plain`) beyond the noise; else why the graph is dropped. For graphs without
    in-place inputs: both runs are free of effects."""
    d = compare({"graph": lambda: graph(flat), "uncaptured": plain}, "graph", device="cuda", warmup=2, reps=10)
    return None if d.winner == "graph" else f"timed slower than running uncaptured: {d.summary()}"


class CudaGraphs:
    """The CUDA graphs of a variant whose calls vary (symbolic sizes, or a cache that may be replaced):
    one graph per input shapes, int inputs and in-place input addresses, captured the second time that key
    is seen.
    A static cache's decode step repeats its key every token; a growing cache's never does, and costs no
    capture."""

    def __init__(self, fn: Callable[..., Any], name: str, inplace: frozenset[int], keep: frozenset[int]):
        self.fn, self.name, self.inplace, self.keep = fn, name, inplace, keep
        self.graphs: dict[tuple, CudaGraph | None] = {}
        self.seen: dict[tuple, int] = {}

    def __call__(self, flat: list[Any]) -> list[Any] | None:
        key = (tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x if type(x) is int else None for x in flat),
               tuple(_address(flat[i]) for i in sorted(self.inplace)))
        graph = self.graphs.get(key)
        if graph is not None:
            return graph(flat)
        if key in self.graphs:  # capture failed for this key
            return None
        if len(self.seen) > 4 * MAX_GRAPHS:
            self.seen.clear()
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] < 2 or len(self.graphs) >= MAX_GRAPHS:
            return None
        self.graphs[key] = graph = CudaGraph.capture(self.fn, flat, self.name, self.inplace, self.keep)
        return graph(flat) if graph is not None else None
