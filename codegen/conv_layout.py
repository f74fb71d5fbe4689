"""Channels-last convolutions: a 2-D convolution run by the library on NHWC copies of its operands.

On a GPU, cuDNN's fast 16-bit convolutions read and write NHWC. Handed NCHW tensors, torch either converts
them around each call inside cuDNN or, for a depthwise convolution, runs its own generic NCHW kernel:
about 4x slower than cuDNN's NHWC kernel on an H200 (a ConvNeXt 7x7 depthwise, bf16: 1.34 ms against
0.27 ms; MobileNetV2's 3x3 ones: 1.48 ms against 0.39 ms in all; `benchmarks/gpu_kernels.py`). `nhwc(target)` wraps a convolution op so
its input and weight go in channels-last and its result comes back in the layout eager gives (NCHW unless an
operand was channels-last): the same convolution, another algorithm. It is offered as one more candidate
of a kernel holding a 4-D convolution (`applies`), on the extern and the Triton-epilogue paths, and kept
only where it is measured faster and checked against the reference like every candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from fxcc.dialects import CONV

name = "nhwc"
_CL = torch.channels_last


def _four_d(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.dtype.is_floating_point


def applies(body: fx.GraphModule, target: str) -> bool:
    """A GPU kernel body holding a convolution over 4-D (N, C, H, W) operands."""
    return target == "cuda" and any(n.op == "call_function" and n.target in CONV and _four_d(n.args[0])
                                    and _four_d(n.args[1]) for n in body.graph.nodes)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=_CL)


def nhwc(target: Callable[..., torch.Tensor], restore: bool = True) -> Callable[..., torch.Tensor]:
    """`target` (a convolution op taking input and weight first) on channels-last copies of both; its
    result in eager's layout (channels-last when an operand already was, else NCHW), or with `restore`
    False left channels-last for a consumer that reads any strides (a generated epilogue)."""

    def conv(x: torch.Tensor, w: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() != 4 or w.dim() != 4:
            return target(x, w, *args, **kwargs)
        eager_cl = _channels_last(x) or _channels_last(w)
        y = target(x.contiguous(memory_format=_CL), w.contiguous(memory_format=_CL), *args, **kwargs)
        return y if eager_cl or not restore else y.contiguous()

    conv.__name__ = f"nhwc_{getattr(target, '__name__', 'conv')}"
    return conv
