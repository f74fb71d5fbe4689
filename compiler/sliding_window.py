"""transformers' sliding-window cache layers, captured as one program for every length.

`DynamicSlidingWindowLayer` (the layers a DynamicCache gives Gemma-2/3, OLMo-3, Cohere-2, EXAONE-4, gpt-oss, and
Mistral, whose default window is 4096) keeps the last `sliding_window - 1` keys and values, and sizes the attention
mask with Python branches on its lengths: `full[:, :, -window + 1:]` (shorter than the window or not),
`cumulative_length >= window` and `max(cumulative_length - window + 1, 0)`. torch.export records each branch as a
guard on the symbolic lengths, and the kept keys are the whole concatenation while the window fills but a view with
gaps once it slides: another layout class for the next step. A generate compiled its prefill once per side of the
window and its decode step once per case (growing, filling, sliding), each new prompt length meeting another.

While fxcc captures, the layer computes the same values without branching: the window's start and the mask's sizes
as `torch.sym_min` of the lengths (no guard; the window itself, a constant of the model, is
specialized), and the kept keys and values a view of the concatenation, as eager's. The concatenation starts with
one position more, before the cache (a copy of the first new key: never read), so the kept window never starts at
its beginning: a view with gaps at every step, growing or sliding, of one layout class ("row-major with gaps", its
row stride a symbol of its own), and no guard on whether the view is contiguous. The keys returned for attention are
the concatenation past that position. No copy beyond the concatenation eager makes too (one position longer). The
caller's cache holds eager's values and sizes, in views whose head stride is one position longer than eager's.

`StaticSlidingWindowLayer` (a static cache's, where the window is shorter than the cache) branches the same way on
its Python counter `cumulative_length_int`: a cache that fills (`index_copy_` at the counter, its whole static
length returned), one that becomes full (the kept and new positions concatenated) and one that is full (rolled by
one, or concatenated); so do its mask sizes. A generate compiled its decode step once while the window filled and
once when full, and a prompt longer than the window its prefill again. While fxcc captures it, one gather from the
cache followed by the new positions gives eager's keys in every case, `max(kept + new, window)` long (the kept
positions, the new ones, and while the window fills the static rest past them), and a second gather their last
`window`, written into the cache in place (eager's values, in the caller's tensors); the mask is sized as eager's.
Gathers, not slices: a piece or view of a symbolic length would guard on whether it is empty, of one position or
contiguous. The tensor counter advances as eager's, only while the window fills. A layer as long as its whole
cache (`is_croppable`: it never slides) keeps transformers' code, whose branches then go one way for every length.

Eager calls (and a layer recording its past for assisted decoding, a subclass, or a window of 1, where transformers
keeps everything) run transformers' own code.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def _window(t: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window - 1` positions of `t` along dim -2 past its first (all of them where fewer), as eager's
    `[:, :, -window + 1:]` of `t[:, :, 1:]`: a view of `t` that never starts at its beginning."""
    kept = torch.sym_min(t.shape[-2] - 1, window - 1)
    return t.narrow(-2, t.shape[-2] - kept, kept)


def _ints(*xs: Any) -> bool:
    return all(isinstance(x, (int, torch.SymInt)) for x in xs)


def _dynamic_own(layer: Any) -> bool:
    """A DynamicSlidingWindowLayer this module follows: not recording its past, a window of 2 or more."""
    return (not getattr(layer, "record_past", True) and _ints(getattr(layer, "cumulative_length", None),
                                                               getattr(layer, "sliding_window", None))
            and layer.sliding_window > 1)


def _dynamic_window(layer: Any) -> int:
    """The layer's window, a constant of the model: specialized (one guard on its value), so that its sizes and those
    of the mask built for it (transformers' window is the config's int) are compared statically (fxcc.mask_skip: a
    decode step's window reaches back to the first key it keeps)."""
    return int(layer.sliding_window)


def _dynamic_update(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    layer.cumulative_length += key_states.shape[-2]
    window = _dynamic_window(layer)
    # a position before the cache's (any values: never read) keeps the kept window a view with gaps throughout
    keys = torch.cat([key_states[..., :1, :], layer.keys, key_states], dim=-2)
    values = torch.cat([value_states[..., :1, :], layer.values, value_states], dim=-2)
    layer.keys, layer.values = _window(keys, window), _window(values, window)
    return keys[..., 1:, :], values[..., 1:, :]


def _dynamic_sizes(layer: Any, query_length: Any) -> tuple[Any, Any]:
    """eager: the offset `max(seen - window + 1, 0)`, the length `window - 1 + q` once `seen >= window`, else
    `seen + q`: the kept keys `min(seen, window - 1)` and the new ones either way, the offset the rest of `seen`."""
    seen = layer.cumulative_length
    kept = torch.sym_min(seen, _dynamic_window(layer) - 1)
    return kept + query_length, seen - kept


def _static_own(layer: Any) -> bool:
    """A StaticSlidingWindowLayer shorter than its cache (one that slides), with a window of 2 or more."""
    return (getattr(layer, "_is_croppable", True) is False
            and _ints(getattr(layer, "cumulative_length_int", None), getattr(layer, "max_cache_len", None))
            and layer.max_cache_len > 1)


def _static_lengths(layer: Any, new: Any) -> tuple[Any, int, Any, Any]:
    """Positions seen, the window (the layer's length: the config's window, the cache being longer; specialized as the
    growing layer's), the positions kept (`min(seen, window - 1)`) and the length of the keys eager attends over with
    `new` more: `max(kept + new, window)` (its static length while the window fills, then the kept and new ones)."""
    seen, window = layer.cumulative_length_int, int(layer.max_cache_len)
    kept = torch.sym_min(seen, window - 1)
    return seen, window, kept, torch.sym_max(kept + new, window)


def _static_update(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    new = key_states.shape[-2]
    seen, window, kept, length = _static_lengths(layer, new)
    layer.cumulative_length_int = seen + new
    # eager advances its tensor counter (the index it writes at) only while the window fills: `seen + new <= window`
    layer.cumulative_length.add_(new * (1 - torch.sym_min(torch.sym_max(seen + new - window, 0), 1)))
    # eager's keys, positions of the cache followed by the new ones: the kept positions (from the second once full:
    # eager's roll), the new ones, and the cache past them while the window fills (eager's static length after its
    # index_copy_). One gather whatever the case: pieces of symbolic lengths would guard on which are empty or of one
    at = torch.arange(length, device=key_states.device)
    at = torch.where(at < kept, at + (torch.sym_min(seen, window) - kept),
                     torch.where(at < kept + new, at - kept + window, at))
    last = at.narrow(0, length - window, window)  # the last `window`: eager's cache (gathered: a view of eager's keys
    # would guard on whether its rows are contiguous, `length == window`). A decode step's keys are the window itself
    # (`length == window` for one new position, known without a guard): the cache, as eager returns it
    whole = statically_known_true(length == window)
    out = []
    for cache, states in ((layer.keys, key_states), (layer.values, value_states)):
        both = torch.cat([cache, states], dim=-2)
        cache.copy_(both.index_select(-2, last))
        out.append(cache if whole else both.index_select(-2, at))
    return out[0], out[1]


def _static_sizes(layer: Any, query_length: Any) -> tuple[Any, Any]:
    """eager's: the length its update returns, the offset `max(seen - window + 1, 0)`."""
    seen, _, kept, length = _static_lengths(layer, query_length)
    return length, seen - kept


# the layer's class name in transformers.cache_utils -> (whether a layer takes the branch-free path, its update, its
# mask sizes)
_LAYERS: dict[str, tuple[Callable, Callable, Callable]] = {
    "DynamicSlidingWindowLayer": (_dynamic_own, _dynamic_update, _dynamic_sizes),
    "StaticSlidingWindowLayer": (_static_own, _static_update, _static_sizes),
}


def _branch_free(layer: type, own: Callable, update: Callable, sizes: Callable, orig_update: Callable,
                 orig_sizes: Callable) -> tuple[Callable, Callable]:
    """`layer`'s update and get_mask_sizes: `update` and `sizes` while exporting, for a layer of this class itself (a
    subclass may keep its tensors otherwise) that `own` accepts; transformers' otherwise."""
    def taken(self: Any) -> bool:
        return torch.compiler.is_exporting() and type(self) is layer and own(self)

    def update_(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not taken(self):
            return orig_update(self, key_states, value_states, *args, **kwargs)
        return update(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[Any, Any]:
        return sizes(self, query_length) if taken(self) else orig_sizes(self, query_length)

    return update_, get_mask_sizes


@contextlib.contextmanager
def branch_free_sliding_window() -> Iterator[None]:
    """While capturing with torch.export: transformers' sliding-window cache layers update and size their masks
    without branching on their lengths. Does nothing without transformers imported, and leaves a layer class alone
    where its methods are not the ones this follows."""
    if "transformers" not in sys.modules:
        yield
        return
    try:
        import transformers.cache_utils as cu
    except ImportError:
        yield
        return
    saved = []
    for name, (own, update, sizes) in _LAYERS.items():
        layer = getattr(cu, name, None)
        orig_update, orig_sizes = (vars(layer).get(m) if layer else None for m in ("update", "get_mask_sizes"))
        if orig_update is None or orig_sizes is None or list(inspect.signature(orig_sizes).parameters) != \
                ["self", "query_length"]:
            continue
        saved.append((layer, orig_update, orig_sizes))
        layer.update, layer.get_mask_sizes = _branch_free(layer, own, update, sizes, orig_update, orig_sizes)
    try:
        yield
    finally:
        for layer, orig_update, orig_sizes in saved:
            layer.update, layer.get_mask_sizes = orig_update, orig_sizes
