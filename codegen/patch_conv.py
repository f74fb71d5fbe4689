"""Patch convolutions as one GEMM: a convolution whose stride equals its kernel (no padding, no dilation, one
group) reads each input element once, in non-overlapping patches (a ViT's or an MLP-Mixer's patch embedding,
ConvNeXt's stem, a strided 1-D downsampling). It is `weight[O, C*k] @ patches[C*k, n]`, with the patches a
reshape and permute of the input (one copy) and the result written straight into eager's NCHW layout.

On the CPU, torch runs such a convolution through oneDNN, whose per-call set-up dominates at small sizes: a
1x3x32x32 input with 8x8 patches to 32 channels costs about 43 us there and 16 us as this GEMM; at
1x3x224x224 with 16x16 patches to 768 channels the two are level, and with 4x4 patches oneDNN is faster
(2 cores, torch 2.13). So it is one more candidate of a kernel holding such a convolution, on the extern path
(`patch`) and around a generated epilogue (`tvm+patch`), kept only where it is measured faster and checked
against the reference like every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
name = "patch"
_PLAIN = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


def _spec(target: Any, args: Sequence[Any], kwargs: dict) -> tuple[Any, Any, Any, list[int]] | None:
    """(input, weight, bias, kernel) of a call of `target` that is a patch convolution, else None."""
    if target in _PLAIN:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        vals = [args[i] if i < len(args) else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]
        x, w, b, stride, padding, dilation, groups = vals
        transposed = False
    elif target is aten.convolution.default and len(args) >= 9:
        x, w, b, stride, padding, dilation, transposed, _, groups = args[:9]
    else:
        return None
    if transposed or groups != 1 or not hasattr(w, "shape") or w.dim() < 3:
        return None
    kernel = [int(k) for k in w.shape[2:]]
    dims = len(kernel)

    def each(v: Any) -> list[int] | None:
        v = [v] * dims if isinstance(v, int) else list(v)
        v = v * dims if len(v) == 1 else v
        return v if len(v) == dims and all(isinstance(i, int) for i in v) else None

    if each(stride) != kernel or each(padding) != [0] * dims or each(dilation) != [1] * dims:
        return None
    return x, w, b, kernel


def _node_spec(node: fx.Node) -> tuple[Any, Any, Any, list[int]] | None:
    """`_spec` of a graph node, on its operands' recorded values."""
    if node.op != "call_function":
        return None
    vals = ([a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args],
            {k: a.meta.get("val") if isinstance(a, fx.Node) else a for k, a in node.kwargs.items()})
    return _spec(node.target, *vals)


def applies(node: fx.Node) -> bool:
    """A patch convolution of static sizes over floating operands, input batched (N, C, *spatial)."""
    spec = _node_spec(node)
    if spec is None:
        return False
    x, w = spec[0], spec[1]
    return (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dtype.is_floating_point
            and x.dim() == w.dim() and all(isinstance(d, int) for d in (*x.shape, *w.shape))
            and x.is_contiguous()  # eager's result is then contiguous too: the layout the GEMM writes
            and all(s >= k for s, k in zip(x.shape[2:], spec[3])))


def body_applies(body: fx.GraphModule, target: str) -> bool:
    """A CPU kernel body holding a patch convolution."""
    return target == "cpu" and any(applies(n) for n in body.graph.nodes)


def conv(node: fx.Node) -> Callable[..., torch.Tensor]:
    """The call of `node`, a patch convolution (`applies`), computed as one GEMM. Its kernel is read here, once:
    parsing the arguments at every call cost about 4 us, an eighth of a small patch embedding's call."""
    kernel = _node_spec(node)[3]

    def run(x: torch.Tensor, w: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return patch_gemm(x, w, args[0] if args else kwargs.get("bias"), kernel)

    run.__name__ = f"patch_{getattr(node.target, '__name__', 'conv')}"
    return run


def patch_gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kernel: list[int]) -> torch.Tensor:
    """The patch convolution of `x` (N, C, *spatial) by `w` (O, C, *kernel): out (N, O, *grid), contiguous."""
    n, c, *space = x.shape
    o, dims = w.shape[0], len(kernel)
    grid = [s // k for s, k in zip(space, kernel)]
    for d, (g, k) in enumerate(zip(grid, kernel)):  # a remainder past the last whole patch is not read
        if g * k != space[d]:
            x = x.narrow(2 + d, 0, g * k)
    split = [n, c] + [v for g, k in zip(grid, kernel) for v in (g, k)]
    order = [0, 1, *(3 + 2 * i for i in range(dims)), *(2 + 2 * i for i in range(dims))]
    cols = x.reshape(split).permute(order).reshape(n, c * math.prod(kernel), math.prod(grid))
    wm = w.reshape(o, -1)
    if n == 1:
        out = torch.mm(wm, cols[0]) if b is None else torch.addmm(b[:, None], wm, cols[0])
    else:
        out = torch.matmul(wm, cols) if b is None else torch.baddbmm(b[:, None], wm.expand(n, -1, -1), cols)
    return out.view(n, o, *grid)
