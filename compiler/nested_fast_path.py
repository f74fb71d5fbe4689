"""nn.TransformerEncoder's nested-tensor fast path and nn.TransformerEncoderLayer's own fast path, taken in a captured
graph where eager takes them.

Eager `nn.TransformerEncoder.forward` (eval, no gradients, a `src_key_padding_mask` and no `mask`) turns its
input into a nested tensor: padded positions are dropped, every layer runs on the real tokens only, and the
output is padded back with zeros (before the final norm). Under torch.export it never does (`mask_check` refuses
while compiling; the nested conversion cannot be traced), so a captured graph ran the ordinary path, whose rows
at padded positions are not zero: a later call with padding differed from eager. During capture fxcc decides as
eager does instead: the conditions that read no tensor values are decided at capture (module config and
training are guarded by the runtime; gradients and `torch.backends.mha` are checked at every call by
`untaken`), and the one that reads the mask (`mask_check`: padding only at the end of each row) is computed in
the graph, which then zeroes the padded rows. A float mask drops every key whose entry is not zero, as the
nested tensor and each layer's own fast path do (not as a bias).

Each nn.TransformerEncoderLayer's own fast path (`torch._transformer_encoder_layer_fwd`, eval and no gradients, on
a batch-first layer of the shapes it supports) is not taken under torch.export either (its tensors have a torch
function there). It reads its masks, merged as `MultiheadAttention.merge_masks` does, as bool: a key is dropped
where the merged entry is not zero (a finite float mask is no bias there), and a query whose keys are all dropped
gives NaN in its whole row (the ordinary path gives a finite row; `_no_key_left_gives_nan`); it ignores
`is_causal` (the ordinary path may take it for the mask, and without a mask raises). The captured graph
does the same where eager would take it; calls where it would not (gradients, `torch.backends.mha`) run eagerly
(`untaken`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812 - torch's own name for it

FastPath = nn.TransformerEncoder | nn.TransformerEncoderLayer


def _tensor_args(m: FastPath) -> tuple[torch.Tensor | None, ...]:
    """The layer's weights (an encoder's: its first layer's) that eager's decision reads (`requires_grad` with
    gradients enabled)."""
    layer = m.layers[0] if isinstance(m, nn.TransformerEncoder) else m
    attn = layer.self_attn
    return (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, layer.norm1.weight,
            layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
            layer.linear2.weight, layer.linear2.bias)


def fast_paths(module: nn.Module) -> tuple[FastPath, ...]:
    """The modules in `module` whose fast path a captured graph can take: encoders built with the nested-tensor
    one (`use_nested_tensor`), and encoder layers whose configuration allows their own."""
    return tuple(m for m in module.modules()
                 if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and len(m.layers)
                 or isinstance(m, nn.TransformerEncoderLayer) and not _layer_config_why_not(m))


def untaken(mods: tuple[FastPath, ...]) -> str | None:
    """Why eager would not take the fast path that a captured graph of `mods` takes, at this call (None: it
    would, as far as the caller's torch state goes): the graph cannot see the caller's grad mode or mha flag."""
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() is False"
    if torch.is_grad_enabled():
        for m in mods:
            if any(t is not None and t.requires_grad for t in _tensor_args(m)):
                which = "nested-tensor fast path" if isinstance(m, nn.TransformerEncoder) else "fast path"
                return f"gradients are enabled and the weights of {type(m).__name__} require them, so eager skips its {which}"
    return None


def _why_not(enc: nn.TransformerEncoder, src: torch.Tensor, mask: Any, padding: Any) -> str:
    """Eager's reasons against the fast path that read no tensor values, in its order ('' where none holds), for a
    call without gradients and with the fast path enabled (`untaken` sends other calls to eager)."""
    if not getattr(enc, "use_nested_tensor", False):
        return "use_nested_tensor is False"
    if enc.layers[0].training:
        return "training"
    if src.dim() != 3:
        return "input not batched"
    if padding is None:
        return "no src_key_padding_mask"
    if src.is_nested:
        return "nested input"
    if mask is not None:
        return "src_key_padding_mask and mask both given"
    if torch.is_autocast_enabled():
        return "autocast"
    # not read: `has_torch_function` (true for every tensor under export's torch-function mode; a compiled call
    # gets plain tensors)
    if src.device.type not in ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name):
        return "device"
    return ""


def _layer_config_why_not(layer: nn.TransformerEncoderLayer) -> str:
    """The reasons against a layer's own fast path that its configuration gives, in eager's order ('' where none
    holds)."""
    attn = layer.self_attn
    if not attn.batch_first:
        return "self_attn.batch_first was not True"
    if attn.in_proj_bias is None:
        return "self_attn was passed bias=False"
    if not attn._qkv_same_embed_dim:
        return "self_attn._qkv_same_embed_dim was not True"
    if not getattr(layer, "activation_relu_or_gelu", 0):
        return "activation_relu_or_gelu was not True"
    if layer.norm1.eps != layer.norm2.eps:
        return "norm1.eps is not equal to norm2.eps"
    if attn.num_heads % 2 == 1:
        return "num_head is odd"
    return ""


def _layer_why_not(layer: nn.TransformerEncoderLayer, src: torch.Tensor) -> str:
    """Eager's reasons against a layer's own fast path that read no tensor values ('' where none holds), for a
    call without gradients and with the fast path enabled (`untaken` sends other calls to eager)."""
    if src.dim() != 3:
        return "input not batched"
    if layer.training:
        return "training is enabled"
    if why := _layer_config_why_not(layer):
        return why
    if torch.is_autocast_enabled():
        return "autocast is enabled"
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return "forward pre-/hooks are attached to the module"
    # not read: `has_torch_function` (true for every tensor under export), `src.is_nested` (not under export)
    if src.device.type not in ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name):
        return "device"
    return ""


@functools.cache
def _no_key_left_gives_nan() -> bool:
    """Whether the fast path's masked softmax gives NaN for a row whose keys are all masked (as torch's does at the
    time of writing; pytorch/pytorch#190486 would give zeros, as the ordinary path's SDPA does, and then the two
    paths agree there)."""
    scores, mask = torch.zeros(1, 1, 2), torch.ones(1, 1, 2, dtype=torch.bool)
    return bool(torch._masked_softmax(scores, mask, 2).isnan().all())


def _layer_forward(orig: Any, nan_rows: bool) -> Any:
    def forward(self: nn.TransformerEncoderLayer, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not torch.compiler.is_exporting() or _layer_why_not(self, src):
            return orig(self, src, src_mask, src_key_padding_mask, is_causal)
        if src_mask is None and src_key_padding_mask is None:  # `is_causal` is no hint to the fast path
            return orig(self, src, None, None, False)
        padding = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                    other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                    target_type=src.dtype)
        mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        merged, mask_type = self.self_attn.merge_masks(mask, padding, src)
        dropped = merged != 0  # how `_transformer_encoder_layer_fwd` reads a float mask: as bool
        if mask_type == 1:  # (batch, keys)
            out = orig(self, src, None, dropped, False)
            dead = dropped.all(-1)[:, None, None]
        else:  # (batch, heads, queries, keys); the ordinary path takes it as (batch * heads, queries, keys)
            b, h, q, k = dropped.shape
            out = orig(self, src, dropped.reshape(b * h, q, k), None, False)  # `is_causal` is no hint there
            dead = dropped.all(-1).any(1)[..., None]
        # a query with no key left: NaN in its whole row (whichever head it is in)
        return out.masked_fill(dead, float("nan")) if nan_rows else out

    return forward


def _left_aligned(keep: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every row of `keep` (True: a real token) is real tokens, then padding."""
    return (keep[:, 1:] <= keep[:, :-1]).all()


def _encoder_forward(orig: Any) -> Any:
    def forward(self: nn.TransformerEncoder, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        if not torch.compiler.is_exporting() or _why_not(self, src, mask, src_key_padding_mask):
            return orig(self, src, mask, src_key_padding_mask, is_causal)
        padding = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=None,
                                    other_name="mask", target_type=src.dtype)
        keep = padding.logical_not()  # as eager's nested tensor reads it: a key is kept where its entry is 0
        if getattr(self, "mask_check", True):  # the fast path only for masks that pad at the end of each row
            fast = _left_aligned(keep)
        else:  # any mask: the nested tensor takes the first `keep.sum()` positions of each row
            fast = None
            keep = torch.arange(keep.shape[-1], device=keep.device) < keep.sum(-1, keepdim=True)
        if src_key_padding_mask.dtype != torch.bool or fast is None:
            # a float mask drops every key whose entry is not zero, as the nested tensor and each layer's own fast
            # path (`_transformer_encoder_layer_fwd`, taken without it) do
            padding = torch.zeros_like(padding).masked_fill(~keep, float("-inf"))
        out = src
        for layer in self.layers:  # without a mask, `_detect_is_causal_mask` returns the hint as given
            out = layer(out, src_mask=None, is_causal=is_causal is True, src_key_padding_mask=padding)
        padded = ~keep if fast is None else ~keep & fast
        out = out.masked_fill(padded.unsqueeze(-1), 0.0)  # the nested tensor padded back with zeros
        if self.norm is not None:
            out = self.norm(out)
        return out

    return forward


@contextlib.contextmanager
def eager_fast_path() -> Iterator[None]:
    """While capturing with torch.export: nn.TransformerEncoder decides on its nested-tensor fast path, and
    nn.TransformerEncoderLayer on its own, as eager does, and where eager takes one, the graph gives its result
    (padded rows zero; a mask read as bool)."""
    encoder, layer = nn.TransformerEncoder.forward, nn.TransformerEncoderLayer.forward
    nn.TransformerEncoder.forward = _encoder_forward(encoder)
    nn.TransformerEncoderLayer.forward = _layer_forward(layer, _no_key_left_gives_nan())  # asked before the trace
    try:
        yield
    finally:
        nn.TransformerEncoder.forward, nn.TransformerEncoderLayer.forward = encoder, layer
