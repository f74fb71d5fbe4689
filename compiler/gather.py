"""Ops that compute each output element from a few input elements at computed indices (pooling windows,
padding, roll, concatenation), their arguments read once for every backend that generates them.

Fusion treats them as pointwise (fxcc.passes.fuse): a backend (fxcc.codegen.tvm_lower, triton_gen) evaluates
an output element by reading the producer's value at the source index, so what precedes them fuses in and
they cost no copy of their own. Windows are unrolled, so only small ones are generated (`MAX_WINDOW`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

MAX_POOL = {aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3}
AVG_POOL = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
PADS = {aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad1d.default,
        aten.reflection_pad2d.default, aten.reflection_pad3d.default, aten.replication_pad1d.default,
        aten.replication_pad2d.default, aten.replication_pad3d.default}
COPIES = PADS | {aten.roll.default, aten.cat.default}  # read each source element about once
OPS = set(MAX_POOL) | set(AVG_POOL) | COPIES
MAX_WINDOW = 64  # window elements a generated pooling reads per output element (unrolled)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _ints(v, k: int, default) -> tuple[int, ...]:
    v = default if v is None or (isinstance(v, (list, tuple)) and not v) else v
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(x) for x in (v * k if len(v) == 1 else v))


@dataclass(frozen=True)
class Pool:
    """A max or average pooling over the last `len(kernel)` dims."""

    kind: str  # max | avg
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    count_include_pad: bool = True
    divisor: int | None = None  # divisor_override; else the window's extent clipped to the padded input
                                # (count_include_pad) or to the input

    def taps(self) -> list[tuple[int, ...]]:
        """Every offset of the window, in row-major order."""
        out = [()]
        for k in self.kernel:
            out = [(*o, i) for o in out for i in range(k)]
        return out


def pool(node: fx.Node) -> Pool:
    t = node.target
    k = MAX_POOL.get(t) or AVG_POOL[t]
    kernel = _ints(_arg(node, 1, "kernel_size"), k, None)
    stride = _ints(_arg(node, 2, "stride"), k, kernel)
    padding = _ints(_arg(node, 3, "padding"), k, 0)
    if t in MAX_POOL:
        return Pool("max", kernel, stride, padding, _ints(_arg(node, 4, "dilation"), k, 1))
    return Pool("avg", kernel, stride, padding, (1,) * k, bool(_arg(node, 5, "count_include_pad", True)),
                _arg(node, 6, "divisor_override"))


@dataclass(frozen=True)
class Pad:
    """Padding of the last dims: `before`/`after` per padded dim (outermost first), and the mode."""

    mode: str  # constant | reflect | replicate | circular
    before: tuple[int, ...]
    after: tuple[int, ...]
    value: float = 0.0


def pad(node: fx.Node) -> Pad:
    t = node.target
    widths = list(node.args[1])
    if t is aten.constant_pad_nd.default:
        mode, value = "constant", _arg(node, 2, "value", 0)
    elif t is aten.pad.default:
        mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value")
    else:
        mode, value = ("reflect" if "reflection" in t.__name__ else "replicate"), 0
    pairs = [(widths[i], widths[i + 1]) for i in range(0, len(widths), 2)][::-1]  # torch lists the last dim first
    return Pad(mode, tuple(b for b, _ in pairs), tuple(a for _, a in pairs), float(value or 0))


def generated(node: fx.Node) -> bool:
    """Whether a backend generates this gather op (windows small enough to unroll, known pad modes)."""
    t = node.target
    if t in MAX_POOL or t in AVG_POOL:
        p = pool(node)
        return math.prod(p.kernel) <= MAX_WINDOW and (p.kind == "max" or p.divisor is None or p.divisor > 0)
    if t in PADS:
        return pad(node).mode in ("constant", "reflect", "replicate", "circular")
    if t is aten.cat.default:  # a cat with an empty operand (a cache's first update) stays a library call
        return all(isinstance(x, fx.Node) and x.meta["val"].numel() > 0 for x in node.args[0])
    return t in OPS
