"""transformers' growing sliding-window cache layer, captured as one program for every length, without a copy.

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
Eager calls (and a layer recording its past for assisted decoding, a subclass, or a window of 1, where transformers
keeps everything) run transformers' own code.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch


def _window(t: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window - 1` positions of `t` along dim -2 past its first (all of them where fewer), as eager's
    `[:, :, -window + 1:]` of `t[:, :, 1:]`: a view of `t` that never starts at its beginning."""
    kept = torch.sym_min(t.shape[-2] - 1, window - 1)
    return t.narrow(-2, t.shape[-2] - kept, kept)


@contextlib.contextmanager
def branch_free_sliding_window() -> Iterator[None]:
    """While capturing with torch.export: transformers' DynamicSlidingWindowLayer updates and sizes its mask
    without branching on its lengths. Does nothing without transformers imported, or where the layer's methods
    are not the ones this follows."""
    if "transformers" not in sys.modules:
        yield
        return
    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer as layer
    except ImportError:
        yield
        return
    orig_update, orig_sizes = layer.__dict__.get("update"), layer.__dict__.get("get_mask_sizes")
    if orig_update is None or orig_sizes is None or list(inspect.signature(orig_sizes).parameters) != \
            ["self", "query_length"]:
        yield
        return

    def own(self: Any) -> bool:
        """Whether this call takes the branch-free path: exporting, a layer of this class itself (a subclass may keep
        its tensors otherwise) as this module knows it."""
        return (torch.compiler.is_exporting() and type(self) is layer and not getattr(self, "record_past", True)
                and isinstance(getattr(self, "cumulative_length", None), (int, torch.SymInt))
                and isinstance(getattr(self, "sliding_window", None), (int, torch.SymInt)) and self.sliding_window > 1)

    def window(self: Any) -> int:
        """The layer's window, a constant of the model: specialized (one guard on its value), so that its sizes and
        those of the mask built for it (transformers' window is the config's int) are compared statically
        (fxcc.mask_skip: a decode step's window reaches back to the first key it keeps)."""
        return int(self.sliding_window)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not own(self):
            return orig_update(self, key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        # a position before the cache's (any values: never read) keeps the kept window a view with gaps throughout
        keys = torch.cat([key_states[..., :1, :], self.keys, key_states], dim=-2)
        values = torch.cat([value_states[..., :1, :], self.values, value_states], dim=-2)
        self.keys, self.values = _window(keys, window(self)), _window(values, window(self))
        return keys[..., 1:, :], values[..., 1:, :]

    def get_mask_sizes(self, query_length: int) -> tuple[Any, Any]:
        if not own(self):
            return orig_sizes(self, query_length)
        seen = self.cumulative_length
        # eager: the offset `max(seen - window + 1, 0)`, the length `window - 1 + q` once `seen >= window`, else
        # `seen + q`: the kept keys `min(seen, window - 1)` and the new ones either way, the offset the rest of `seen`
        kept = torch.sym_min(seen, window(self) - 1)
        return kept + query_length, seen - kept

    layer.update, layer.get_mask_sizes = update, get_mask_sizes
    try:
        yield
    finally:
        layer.update, layer.get_mask_sizes = orig_update, orig_sizes
