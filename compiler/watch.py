"""Has a tensor changed since fxcc derived something from it? The one test behind the runtime's guards on
weights folded into constants and the backends' packed-weight caches (fxcc.codegen.derived).

A version counter cannot answer it: `p.data.mul_(3)` writes through an alias with a counter of its own, and
`p.data = t` swaps the storage without a bump. Comparing contents on every call would cost a pass over the
weights. Instead a `Snapshot` is a copy-on-write clone of the tensor (`torch._lazy_clone`): it shares the
tensor's memory, and the first write to that memory through any alias (`.data`, a view, `copy_`, an optimizer)
gives the tensor a fresh buffer. So "the tensor's buffer is still the snapshot's" proves nothing was written:
one address compare per call. A different address means a write or a read that asked for a writable pointer
(DLPack, numpy); then the contents are compared bit for bit with the snapshot (still the old values), and
when they are equal the snapshot is taken again. A storage over memory torch did not allocate (mmapped
safetensors) is first moved, in place, to memory torch allocated (`own_memory`). Where a copy-on-write clone
still cannot be made (an exotic tensor type), the snapshot is a plain copy compared on every check.

Other code that asks the tensor for a writable pointer at every call without writing (another compiler's
kernels over the same model: torch.compile's launches call `data_ptr()`) breaks the copy-on-write share each
time: the tensor is copied to a fresh buffer by that request, and the snapshot taken again would be broken
again at the next one, a copy of the weight per call and a compare per check. After `BREAKS` such breaks with
the contents unchanged, the snapshot stops being copy-on-write: it keeps the memory the tensor left (a plain
copy, the tensor's size in memory) and compares contents at every check, so the other code keeps its buffer.
After `PATIENCE` checks it is copy-on-write again (the other code may have stopped), and the wait doubles
each time the share is broken again.

A copy a CUDA graph reads (`same(keep=True)`) stays a copy: the graph reads the memory the tensor left. The
tensor's new buffer is then watched by a copy-on-write clone of its own (`watch`), so while nothing asks for a
writable pointer again a check is one address compare, not a comparison of contents (a model run eagerly once
beside its compiled graph, the first call's check against eager). Each new request costs one comparison at the
next check; requests at every call get the policy above (a comparison per check, copy-on-write again after a wait).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_address = torch._C._data_address  # the storage's data pointer, read without asking for write access
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BREAKS = 2  # copy-on-write shares broken with the contents unchanged before a snapshot becomes a plain copy
PATIENCE = 16  # checks a plain copy (after BREAKS) waits before copy-on-write again; doubled at each return


class Snapshot:
    """What tensor `t` held when the snapshot was taken; `same(t)` says whether it still does."""

    __slots__ = ("address", "breaks", "calm", "copy", "cow", "kept", "layout", "patience", "watch", "watch_address")

    def __init__(self, t: torch.Tensor) -> None:
        self.breaks, self.calm, self.patience, self.kept = 0, 0, PATIENCE, False
        self.watch, self.watch_address = None, None
        self.take(t)

    def take(self, t: torch.Tensor) -> None:
        with torch.no_grad():
            try:
                self.copy, self.cow = _lazy_clone(t), True
            except (RuntimeError, TypeError, NotImplementedError) as e:
                log.debug("no copy-on-write snapshot of a %s (%s); comparing contents on each check", type(t), e)
                self.copy, self.cow = t.detach().clone(), False
        self.address = _address(t)
        self.layout = _layout(t)

    def same(self, t: torch.Tensor, keep: bool = False) -> bool:
        """True when `t` has the layout and the bits it had at the snapshot (for a tensor of the same identity).
        keep: where `t` left the snapshot's memory, keep that memory as a plain copy at once (a CUDA graph reads
        it there), and watch `t`'s new buffer apart (`_kept_same`)."""
        layout = _layout(t)
        if self.cow and _address(t) == self.address and layout == self.layout:
            return True
        if self.copy is None:  # let go (`let_go`) and the tensor moved since: its old bits are not here to compare
            return False
        if self.kept:
            return self._kept_same(t, layout)
        # the storage offset may differ: a tensor moved to other memory with its values (fxcc.ir.concat_rows
        # rebinding a weight's `.data` into a merged buffer, at a compile after this snapshot) holds what it held
        if layout[:2] + layout[3:] != self.layout[:2] + self.layout[3:] or not same_bits(t, self.copy):
            return False
        if self.cow:  # a request for a writable pointer gave `t` a new buffer, the same bits (or `t` moved)
            self.breaks += layout == self.layout  # a move to another offset (merged weights) is no such request
            if keep or self.breaks >= BREAKS:  # made again each time (see the module's doc): keep the old memory as a copy
                self.cow, self.address, self.layout, self.kept, self.calm = False, _address(t), layout, keep, 0
                if keep:  # the tensor's new buffer watched copy-on-write: the next checks compare addresses
                    self.breaks = 0
                    self._watch(t)
                else:
                    log.info("a watched %s tensor is asked for a writable pointer at every call; its snapshot is a "
                             "plain copy, compared at every check", tuple(t.shape))
                return True
        elif self.breaks and layout == self.layout:
            self.calm += 1  # a plain copy since other code broke the share: copy-on-write again after a while
            if self.calm >= self.patience:
                self.calm, self.patience = 0, self.patience * 2
                self.take(t)
            return True
        if self.cow or layout != self.layout:
            self.take(t)  # watch the new buffer (or, having moved, the tensor where it is now)
        return True

    def _kept_same(self, t: torch.Tensor, layout: tuple) -> bool:
        """`same` of a kept copy (a CUDA graph reads it): the tensor's own buffer, where it is now, is watched by
        a copy-on-write clone while nothing breaks it; each break costs one comparison with the copy, and after
        `BREAKS` of them the comparison is made at every check for `patience` checks before watching again."""
        if self.watch is not None and _address(t) == self.watch_address and layout == self.layout:
            return True
        if layout[:2] + layout[3:] != self.layout[:2] + self.layout[3:] or not same_bits(t, self.copy):
            return False
        self.layout = layout
        if self.watch is not None:  # asked for a writable pointer again (new buffer, the same bits)
            self.watch, self.breaks = None, self.breaks + 1
            if self.breaks <= BREAKS:
                self._watch(t)
            else:
                self.calm = 0
            return True
        self.calm += 1
        if self.calm >= self.patience:
            self.calm, self.patience = 0, self.patience * 2
            self._watch(t)
        return True

    def _watch(self, t: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                self.watch = _lazy_clone(t)
        except (RuntimeError, TypeError, NotImplementedError):
            self.watch = None  # compared at every check
            return
        self.watch_address = _address(t)

    def let_go(self, t: torch.Tensor) -> None:
        """Drop the copy-on-write clone, so that freeing `t`'s memory frees it (fxcc.held: a weight held as its packed
        copy alone). Until `take` is called again, `t` counts as unchanged while it stays where it is now and as
        changed once it moves."""
        self.copy, self.cow, self.kept, self.watch, self.watch_address = None, True, False, None, None
        self.address, self.layout = _address(t), _layout(t)

    def watching(self) -> bool:
        """Whether a check of an unchanged tensor is one address compare (`watched_at` the address)."""
        return self.cow or self.watch is not None

    def watched_at(self) -> int:
        return self.address if self.cow else self.watch_address

    def holds(self, address: int) -> bool:
        """Whether the snapshot's own memory is at `address` (a plain copy kept where the tensor was)."""
        return not self.cow and _address(self.copy) == address


def _lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy-on-write clone of `t`. A storage over memory torch did not allocate (weights `from_pretrained`
    mmapped from safetensors, `torch.frombuffer`) cannot be copy-on-write: it is first given memory of its own,
    in place (`own_memory`), once."""
    try:
        return torch._lazy_clone(t.detach())
    except RuntimeError:
        if not own_memory(t):
            raise
        return torch._lazy_clone(t.detach())


def own_memory(t: torch.Tensor) -> bool:
    """Back `t`'s storage with a copy of its bytes that torch allocated, swapped in place: every tensor sharing
    the storage (views, tied weights, a state_dict) keeps sharing it, with the same values; only the memory
    behind it moves (from a file mapping to the heap). False when the storage cannot be swapped."""
    storage = t.untyped_storage()
    try:
        fresh = storage.clone()
        storage._swap_data_ptr_(fresh)
    except (RuntimeError, AttributeError) as e:
        log.debug("cannot give a %s storage memory of its own: %s", t.device, e)
        return False
    log.debug("moved a %d-byte storage over foreign memory to torch's allocator to watch it", storage.nbytes())
    return True


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset(), t.dtype, t.device


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of one layout (NaN equals the same NaN; -0.0 differs from 0.0)."""
    with torch.no_grad():
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.dtype.is_floating_point:
            a, b = a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()])
        return torch.equal(a, b)


_STRIDE = torch.Tensor.stride
try:  # one C++ pass over many tensors (dispatch keys, dtype, device, sizes, strides): torch.compile's own guard
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - a torch without it: the comparisons below, in Python
    _TensorGuards = None


def tensor_guards(tensors: list[torch.Tensor]) -> object | None:
    if _TensorGuards is None or not tensors:
        return None
    try:  # both keywords are required (None: every size and stride is static)
        return _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except (TypeError, RuntimeError):
        return None


class Layouts:
    """The shapes, strides, dtypes and devices of a fixed list of tensors as taken; `same()` says whether every
    one still has its own (the tensors themselves are the same objects: the caller checks that).

    `same()` is on every call of a compiled module: torch's C++ tensor guard answers in one pass; it also compares
    the dispatch keys (inference mode, requires_grad), which a layout does not include, so where it fails the
    layouts are compared one by one and, when they are the same, the C++ guard is taken again under the
    current state."""

    __slots__ = ("tensors", "shapes", "strides", "dtypes", "devices", "_fast")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tuple(tensors)
        self.shapes = [t.shape for t in tensors]
        self.strides = list(map(_STRIDE, tensors))
        self.dtypes = [t.dtype for t in tensors]
        self.devices = [t.device for t in tensors]
        self._fast = tensor_guards(self.tensors)

    def same(self) -> bool:
        fast = self._fast
        if fast is not None and fast.check(*self.tensors):
            return True
        ts = self.tensors
        same = ([t.shape for t in ts] == self.shapes and list(map(_STRIDE, ts)) == self.strides
                and [t.dtype for t in ts] == self.dtypes and [t.device for t in ts] == self.devices)
        if same and fast is not None:
            self._fast = tensor_guards(ts)
        return same
