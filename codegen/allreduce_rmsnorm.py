"""Fused all-reduce + residual add + RMSNorm (TokenWeave-style), and its token-split form.

The kernels of two tx ops (defined in fxcc.dialects), each returning (normed, new_residual):
- `tx.all_reduce_rms_norm(x, residual, weight, eps, group, impl, site)`:
  s = all_reduce(x) + residual; y = rms_norm(s) * weight.
- `tx.linear_all_reduce_rms_norm(a, w, residual, weight, eps, group, impl, site, ratio)`: the same after
  a row-parallel projection x = a @ w.T. With ratio > 0 on CUDA the tokens are split in two (wave-aware:
  whole 128-row GEMM tiles) and the first part's all-reduce + norm runs on a second stream while the
  second part's projection computes; ratio 0 runs it whole.

Implementations (`impl`): "reference" (tx.all_reduce, add, tx.rms_norm: the definition);
"symm" (CUDA: partial sums in torch symmetric memory, one barrier, then ONE Triton kernel that reads every
rank's buffer over NVLink peer loads, sums, adds the residual and normalises; no multicast / multimem);
"nccl" (CUDA: NCCL all-reduce, then a fused residual + RMSNorm Triton kernel); "auto" (symm where
symmetric memory works, else nccl; on the CPU a gloo all-reduce and the fused residual-RMSNorm in torch).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fxcc.dialects import all_reduce_rms_norm, linear_all_reduce_rms_norm, rms_norm
from torch import Tensor

log = logging.getLogger(__name__)

TILE_M = 128  # GEMM row tile: split points are multiples of it, so no half runs a partial wave of tiles


def _dist_group(group: str) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    pg = dist.group.WORLD if group in ("", "world") else group
    if isinstance(pg, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        pg = _resolve_process_group(pg)
    return pg if dist.get_world_size(pg) > 1 else None


def residual_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                      out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """s = x + residual; (rms_norm(s) * weight, s) with the rounding of the unfused ops. Triton on CUDA."""
    if x.is_cuda and _kernel_ok(x, residual, weight):
        return _triton_residual_rms_norm(x, residual, weight, eps, out)
    s = x + residual
    return rms_norm(s, weight, eps), s


def _kernel_ok(x: Tensor, residual: Tensor, weight: Tensor | None) -> bool:
    """The Triton kernels keep one dtype throughout and a row in registers; other cases run in torch."""
    return (x.shape[-1] <= 16384 and x.dtype == residual.dtype and x.shape == residual.shape
            and (weight is None or weight.dtype == x.dtype))


def all_reduce_rms_norm_impl(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, group: str,
                             impl: str, site: int, half: int = 0,
                             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The implementation `impl` of tx.all_reduce_rms_norm; writes into `out` (y, s) where it can."""
    if impl == "reference":
        return all_reduce_rms_norm._init_fn(x, residual, weight, eps, group, impl, site)
    pg = _dist_group(group)
    if pg is None:
        return residual_rms_norm(x, residual, weight, eps, out)
    if x.is_cuda and impl in ("auto", "symm") and _kernel_ok(x, residual, weight) and symm_available(pg):
        return _symm_all_reduce_rms_norm(x, residual, weight, eps, pg, (site, half), out)
    if impl == "symm":
        raise RuntimeError("fxcc: tx.all_reduce_rms_norm impl='symm' needs CUDA tensors and torch symmetric "
                           "memory; use impl='auto' to fall back to NCCL")
    import torch.distributed as dist

    red = x.contiguous().clone()
    dist.all_reduce(red, group=pg)  # NCCL on CUDA, gloo on the CPU
    return residual_rms_norm(red, residual, weight, eps, out)


def split_rows(rows: int, ratio: float) -> int:
    """Rows of the first part: about `ratio` of them, rounded to whole 128-row tiles; 0 means no split."""
    if ratio <= 0 or rows < 2 * TILE_M:
        return 0
    m = int(round(rows * ratio / TILE_M)) * TILE_M
    return m if 0 < m < rows else 0


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _comm_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
    return _STREAMS[device]


def linear_all_reduce_rms_norm_impl(a: Tensor, w: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                                    group: str, impl: str, site: int, ratio: float) -> tuple[Tensor, Tensor]:
    """The implementation of tx.linear_all_reduce_rms_norm: projection, then all-reduce + residual + norm.

    On the symmetric-memory path the projection writes its partial sums straight into the symmetric
    buffer (no copy). With a split, part 1's all-reduce + norm run on a side stream during part 2's GEMM.
    """
    rows, h = a.numel() // a.shape[-1], w.shape[0]
    pg = _dist_group(group) if impl != "reference" else None
    symm = (pg is not None and a.is_cuda and impl in ("auto", "symm") and w.dtype == a.dtype
            and _kernel_ok(residual, residual, weight) and symm_available(pg))
    m = split_rows(rows, ratio) if a.is_cuda and impl != "reference" else 0
    a2, r2 = a.reshape(rows, a.shape[-1]), residual.reshape(rows, h)

    def part(lo: int, hi: int, half: int, out: Any) -> Callable[[], tuple[Tensor, Tensor]]:
        """Run this part's GEMM now; return what finishes it (all-reduce + residual + norm)."""
        if symm:
            slot, shape = _symm_stage((site, half), (hi - lo, h), a.dtype, a.device, pg)
            torch.mm(a2[lo:hi], w.t(), out=slot.buf[:(hi - lo) * h].view(shape))
            return lambda: _symm_finish(slot, r2[lo:hi], weight, eps, pg, out)
        p = F.linear(a2[lo:hi], w)
        return lambda: all_reduce_rms_norm_impl(p, r2[lo:hi], weight, eps, group, impl, site, half, out)

    if m == 0:
        y, s = part(0, rows, 0, None)()
        return y.view(residual.shape), s.view(residual.shape)
    y, s = torch.empty_like(r2), torch.empty_like(r2)
    main, side = torch.cuda.current_stream(a.device), _comm_stream(a.device)
    for half, (lo, hi) in enumerate([(0, m), (m, rows)]):
        finish = part(lo, hi, half, (y[lo:hi], s[lo:hi]))  # GEMM on the compute stream
        side.wait_stream(main)
        with torch.cuda.stream(side):  # all-reduce + norm of this part, during the next part's GEMM
            yp, sp = finish()
            if yp.data_ptr() != y[lo:hi].data_ptr():
                y[lo:hi].copy_(yp)
                s[lo:hi].copy_(sp)
    # the join comes before any tensor used on the side stream is freed: its memory is reused only after it
    main.wait_stream(side)
    return y.view(residual.shape), s.view(residual.shape)


# ------------------------------------------------------------------------ the ops' kernels


@all_reduce_rms_norm.register_kernel(("cpu", "cuda"))
def _(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, group: str, impl: str,
      site: int) -> tuple[Tensor, Tensor]:
    return all_reduce_rms_norm_impl(x, residual, weight, eps, group, impl, site)


@linear_all_reduce_rms_norm.register_kernel(("cpu", "cuda"))
def _(a: Tensor, w: Tensor, residual: Tensor, weight: Tensor | None, eps: float, group: str, impl: str,
      site: int, ratio: float) -> tuple[Tensor, Tensor]:
    return linear_all_reduce_rms_norm_impl(a, w, residual, weight, eps, group, impl, site, ratio)


# ----------------------------------------------------------------------------- symmetric memory


_SYMM_OK: dict[str, bool] = {}


def symm_available(pg: Any) -> bool:
    """Whether torch symmetric memory can be set up for this group (checked once per group, collectively)."""
    name = pg.group_name
    if name not in _SYMM_OK:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, a no-op after
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    symm_mem.enable_symm_mem_for_group(name)
            t = symm_mem.empty(16, dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
            symm_mem.rendezvous(t, name)
            _SYMM_OK[name] = True
        except Exception as e:  # noqa: BLE001 - any failure means: use NCCL
            log.warning("torch symmetric memory unavailable (%s: %s); fused all-reduce uses NCCL",
                        type(e).__name__, e)
            _SYMM_OK[name] = False
    return _SYMM_OK[name]


class _Slot:
    """One call site's symmetric buffer: this rank's partial sums land here and every peer reads them."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, group_name: str):
        import torch.distributed._symmetric_memory as symm_mem

        self.numel = numel
        self.buf = symm_mem.empty(numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buf, group_name)
        self.ptrs = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64, device=device)


_SLOTS: dict[tuple, _Slot] = {}
_KEEP: list[_Slot] = []  # replaced slots stay alive: CUDA graphs captured earlier still point at them
_LAST: list[Any] = [None]


def _slot(key: tuple, numel: int, dtype: torch.dtype, device: torch.device, pg: Any) -> _Slot:
    k = (pg.group_name, dtype, device, key)
    slot = _SLOTS.get(k)
    if slot is None or slot.numel < numel:
        if slot is not None:
            _KEEP.append(slot)
        slot = _SLOTS[k] = _Slot(numel, dtype, device, pg.group_name)
    return slot


def _symm_stage(key: tuple, shape: tuple, dtype: torch.dtype, device: torch.device, pg: Any) -> tuple[_Slot, tuple]:
    """The call site's symmetric buffer, ready to be written (partial sums go to its first numel elements).

    Each call site has its own buffer, so a rank can write the next site's partials while a slow peer
    still reads this one's; two calls of one site are always separated by another site's barrier, except
    when a graph has a single site: then a barrier is added before the write.
    """
    numel = 1
    for d in shape:
        numel *= d
    slot = _slot(key, numel, dtype, device, pg)
    if _LAST[0] == (pg.group_name, key):
        slot.handle.barrier(channel=1)
    _LAST[0] = (pg.group_name, key)
    return slot, tuple(shape)


def _symm_finish(slot: _Slot, residual: Tensor, weight: Tensor | None, eps: float, pg: Any,
                 out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Barrier (every rank's partials are written), then one kernel: peer loads + sum + residual + norm."""
    slot.handle.barrier(channel=0)
    return _triton_symm_kernel(slot, residual, residual, weight, eps, pg.size(), out)


def _symm_all_reduce_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, pg: Any,
                              key: tuple, out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Partial sums copied into symmetric memory, then `_symm_finish`."""
    slot, shape = _symm_stage(key, tuple(x.shape), x.dtype, x.device, pg)
    slot.buf[:x.numel()].view(shape).copy_(x)
    return _symm_finish(slot, residual, weight, eps, pg, out)


# -------------------------------------------------------------------------------- Triton kernels


def _triton_residual_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, out: Any):
    from fxcc.codegen import allreduce_rmsnorm_triton as k

    return k.residual_rms_norm(x, residual, weight, eps, out)


def _triton_symm_kernel(slot: _Slot, x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, world: int,
                        out: Any):
    from fxcc.codegen import allreduce_rmsnorm_triton as k

    return k.symm_all_reduce_rms_norm(slot.ptrs, x, residual, weight, eps, world, out)
