"""Triton launches that read the model's watched weights without copying them.

The runtime's guards watch a weight by a copy-on-write snapshot (fxcc.watch): the weight and the snapshot
share memory until something asks for a writable pointer. Triton's launcher asks every tensor argument for
`data_ptr()`, which is such a request: each launch would give the weight a fresh buffer (a copy of it),
move its address and so fail the next call's guard, on every call. A kernel launched through `ReadOnly`
gets, for a copy-on-write tensor, an object that gives Triton the tensor's address as it is (its dtype
and `data_ptr()`, all Triton reads of a pointer argument), so reading the weight copies nothing.
Tensors that are not copy-on-write (activations, outputs, packed weights) are passed as they are.
"""

from __future__ import annotations

from typing import Any

import torch

_address = torch._C._data_address  # the storage's address, read without asking for write access
_is_cow = getattr(torch._C, "_is_cow_tensor", None)


class _Pointer:
    """A pointer argument for Triton: the dtype and address of a tensor, read without materialising it."""

    __slots__ = ("address", "dtype")

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self.address = _address(t) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self.address


def argument(a: Any) -> Any:
    """`a` as a launch argument: a copy-on-write CUDA tensor as its address, anything else as it is."""
    if _is_cow is not None and isinstance(a, torch.Tensor) and a.is_cuda and _is_cow(a):
        return _Pointer(a)
    return a


class ReadOnly:
    """A Triton kernel launched as `kernel[grid](*args, **meta)` whose copy-on-write tensor arguments are
    passed by address (`argument`). Everything else is the kernel's own."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __getitem__(self, grid: Any) -> Any:
        launch = self.fn[grid]
        return lambda *args, **meta: launch(*map(argument, args), **meta)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)
