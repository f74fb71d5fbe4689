"""transformers' SDPA mask skip, taken in a captured graph where eager takes it.

Eager transformers builds no attention mask when nothing is padded (masking_utils._ignore_causal_mask_sdpa
reads the padding mask's values), and SDPA then runs with the attention module's own `is_causal`: a module
with is_causal=False (AIMv2's text tower, PaliGemma's Gemma) attends both ways. Under torch.export the values
are unknown, so transformers always builds the mask, and the captured graph attends causally where eager did
not: a model run without padding differed from eager. During capture fxcc keeps eager's decision instead:
without a padding mask it decides as eager does; with one it computes the skip condition in the graph, from
the same padding mask, and where the attention module would then attend to every key, opens the mask when
nothing is padded. A sliding window's part of the decision (fewer keys than the window) is computed in the graph
too where the keys' length is symbolic (a growing cache's), not guarded: one variant serves both sides of the
window (fxcc.sliding_window). Where the window is known to reach back to the first key for every query (a sliding
cache's decode step: the cache keeps no older key), it drops none, and the decision is the one without it: the
step runs without a mask on both sides of the window, where eager builds one past it whose window part is all
True. A mask transformers changes between building and attending (a copy, a slice) keeps the built mask, as
before; the first call's check against eager (fxcc.eager_check) sees any difference.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def _skip_flag(orig: Callable, mu: Any, padding_mask: torch.Tensor | None, q_length: Any, kv_length: Any,
               q_offset: Any, kv_offset: Any, local_attention_size: Any = None, sliding: bool = False
               ) -> bool | torch.Tensor:
    """Eager's decision: a bool where it reads no values, else a 0-d bool tensor computed from `padding_mask`
    (False where unknown: the mask is built, as export builds it). `sliding`: the mask is transformers' sliding-window
    causal mask, whose window (`local_attention_size`) drops only keys before it."""
    if sliding and local_attention_size is not None and _window_drops_none(q_length, q_offset, kv_offset,
                                                                           local_attention_size):
        local_attention_size = None
    # a sliding window's keys against its size (`kv_length >= local_attention_size`: eager builds the mask) where the
    # length is symbolic and either side possible (a growing cache's, min(seen, window - 1) + q): a flag computed in
    # the graph, not a guard on the side this call takes, which would compile a variant for each
    within = None
    if local_attention_size is not None and isinstance(kv_length, torch.SymInt) and not (
            statically_known_true(kv_length >= local_attention_size)
            or statically_known_true(kv_length < local_attention_size)):
        device = padding_mask.device if padding_mask is not None else "cpu"
        within = torch.full((), kv_length, dtype=torch.int64, device=device) < local_attention_size
        local_attention_size = None
    exporting = mu.is_torchdynamo_exporting
    mu.is_torchdynamo_exporting = lambda: False
    try:  # the decision eager makes without padding: sizes, offsets and window only
        static = orig(None, q_length, kv_length, q_offset, kv_offset, local_attention_size)
    finally:
        mu.is_torchdynamo_exporting = exporting
    if not static or padding_mask is None:
        return within if static and within is not None else bool(static)
    # as eager slices it where longer than the keys; where it is known to cover them from the offset on (a sliding
    # window's, growing or full), the same gather whatever the lengths, without a guard on which
    covers = isinstance(kv_offset, (int, torch.SymInt)) and statically_known_true(
        padding_mask.shape[-1] >= kv_length + kv_offset)
    if covers or padding_mask.shape[-1] > kv_length:
        padding_mask = padding_mask[:, torch.arange(kv_length, device=padding_mask.device) + kv_offset]
    flag = None
    if statically_known_true(q_length == 1) or statically_known_true(kv_length == q_length):
        flag = padding_mask.all()
    if isinstance(q_offset, int) and q_offset == 0 and statically_known_true(kv_length > q_length):
        prefix = padding_mask[:, :q_length].all() & (~padding_mask[:, q_length:]).all()
        flag = prefix if flag is None else flag | prefix
    if flag is not None and within is not None:
        flag = flag & within
    return False if flag is None else flag


def _window_drops_none(q_length: Any, q_offset: Any, kv_offset: Any, window: Any) -> bool:
    """Whether a sliding window keeps every key from `kv_offset` on for every query, statically: the last query's
    window (keys after `q_offset + q_length - 1 - window`) starts at or before the first key."""
    if not all(isinstance(x, (int, torch.SymInt)) for x in (q_length, q_offset, kv_offset, window)):
        return False  # a static cache's tensor offset
    return statically_known_true(kv_offset + window >= q_offset + q_length)


@contextlib.contextmanager
def eager_mask_skip() -> Iterator[None]:
    """While capturing with torch.export: transformers' SDPA masks skipped (or opened in the graph) where eager
    skips them. Does nothing without transformers or where its functions are not the ones this follows, nor
    where transformers is not imported (no model of it can be running: importing it would cost a second)."""
    if "transformers" not in sys.modules:
        yield
        return
    try:
        import transformers.masking_utils as mu
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        yield
        return
    orig_ignore = getattr(mu, "_ignore_causal_mask_sdpa", None)
    masks = getattr(getattr(mu, "AttentionMaskInterface", None), "_global_mapping", {})
    attns = AttentionInterface._global_mapping
    orig_mask, orig_attn = masks.get("sdpa"), attns.get("sdpa")
    if orig_ignore is None or orig_mask is None or orig_attn is None or not hasattr(mu, "is_torchdynamo_exporting"):
        yield
        return
    flags: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id of a built mask -> (it, "eager would have none")
    pending: list[torch.Tensor] = []
    orig_sliding = getattr(mu, "sliding_window_causal_mask_function", None)
    windows: dict[int, Callable] = {}  # id -> a mask function transformers made for a sliding window (kept alive)
    building: list[bool] = []  # per sdpa_mask call in progress: whether its mask function is one of `windows`

    def ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if not torch.compiler.is_exporting():
            return orig_ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)
        flag = _skip_flag(orig_ignore, mu, padding_mask, q_length, kv_length, q_offset, kv_offset,
                          local_attention_size, sliding=bool(building) and building[-1])
        if isinstance(flag, torch.Tensor):
            pending.append(flag)
            return False
        return flag

    def sliding_window_causal_mask_function(*args, **kwargs):
        fn = orig_sliding(*args, **kwargs)
        windows[id(fn)] = fn
        return fn

    def sdpa_mask(*args, **kwargs):
        pending.clear()
        building.append(id(kwargs.get("mask_function")) in windows)
        try:
            mask = orig_mask(*args, **kwargs)
        finally:
            building.pop()
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and pending:
            flags[id(mask)] = (mask, pending[-1].to(mask.device))  # a window's flag without padding: on the CPU
        pending.clear()
        return mask

    def sdpa_attention(module, query, key, value, attention_mask, *args, **kwargs):
        mask, flag = flags.get(id(attention_mask), (None, None))
        if mask is not None and mask is attention_mask:
            is_causal = kwargs.get("is_causal")
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            # without a mask eager runs SDPA with is_causal = (q_length > 1 and causal): the built causal mask
            # when nothing is padded; otherwise every key, which the mask opened by the flag gives
            q_length = query.shape[2]
            if not causal or statically_known_true(q_length == 1):
                attention_mask = attention_mask | flag
        return orig_attn(module, query, key, value, attention_mask, *args, **kwargs)

    mu._ignore_causal_mask_sdpa, masks["sdpa"], attns["sdpa"] = ignore, sdpa_mask, sdpa_attention
    if orig_sliding is not None:
        mu.sliding_window_causal_mask_function = sliding_window_causal_mask_function
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa, masks["sdpa"], attns["sdpa"] = orig_ignore, orig_mask, orig_attn
        if orig_sliding is not None:
            mu.sliding_window_causal_mask_function = orig_sliding
        flags.clear()
        windows.clear()
