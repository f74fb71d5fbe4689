"""nn.TransformerEncoder's nested-tensor fast path, taken in a captured graph where eager takes it.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812 - torch's own name for it


def _tensor_args(enc: nn.TransformerEncoder) -> tuple[torch.Tensor | None, ...]:
    """The first layer's weights that eager's decision reads (`requires_grad` with gradients enabled)."""
    first = enc.layers[0]
    attn = first.self_attn
    return (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, first.norm1.weight,
            first.norm1.bias, first.norm2.weight, first.norm2.bias, first.linear1.weight, first.linear1.bias,
            first.linear2.weight, first.linear2.bias)


def encoders(module: nn.Module) -> tuple[nn.TransformerEncoder, ...]:
    """The encoders in `module` that can take the fast path (built with it, `use_nested_tensor`)."""
    return tuple(m for m in module.modules()
                 if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and len(m.layers))


def untaken(encs: tuple[nn.TransformerEncoder, ...]) -> str | None:
    """Why eager would not take the fast path that a captured graph of `encs` takes, at this call (None: it
    would, as far as the caller's torch state goes): the graph cannot see the caller's grad mode or mha flag."""
    if not torch.backends.mha.get_fastpath_enabled():
        return "torch.backends.mha.get_fastpath_enabled() is False"
    if torch.is_grad_enabled():
        for enc in encs:
            if any(t is not None and t.requires_grad for t in _tensor_args(enc)):
                return (f"gradients are enabled and the weights of {type(enc).__name__} require them, so eager "
                        "skips its nested-tensor fast path")
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
    """While capturing with torch.export: nn.TransformerEncoder decides on its nested-tensor fast path as eager
    does, and where eager takes it, the graph gives its result (padded rows zero)."""
    orig = nn.TransformerEncoder.forward
    nn.TransformerEncoder.forward = _encoder_forward(orig)
    try:
        yield
    finally:
        nn.TransformerEncoder.forward = orig
