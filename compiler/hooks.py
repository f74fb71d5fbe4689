"""Forward hooks and compiled code: a hook a compiled graph would not run at each call keeps the module eager.

A forward (pre-)hook registered on a module or any of its submodules, or globally, runs when eager calls those
modules. Captured into a graph it would run once, at capture, on fake tensors (appending them to the user's lists),
and never again; a hook registered after the compile would never run. So a module with such hooks runs eagerly,
with a warning naming them, and adding or removing a hook afterwards recompiles (then runs compiled again once
no hook is left).

Every registration and removal anywhere bumps one counter (fxcc wraps torch's registration functions once, at the
first compile), so the check at each call is one integer compare; only when it moved are the model's hooks looked
at again. transformers' output-capturing hooks are the exception: they act only while the model's own forward
collects outputs into a dict of that call (`output_hidden_states=True`), which the captured graph returns, so a
transformers model compiled whole keeps them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.nn as nn
import torch.utils.hooks

EPOCH = [0]  # bumped by every forward hook registered or removed, anywhere
_PATCHED = [False]


def _counting(fn: Any) -> Any:
    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        EPOCH[0] += 1
        return fn(*args, **kwargs)
    counted.__fxcc_counts_hooks__ = True
    return counted


def watch_registrations() -> None:
    """Wrap torch's forward-hook registration and removal so that they bump EPOCH (once per process)."""
    if _PATCHED[0]:
        return
    _PATCHED[0] = True
    mm = nn.modules.module
    for owner, name in ((nn.Module, "register_forward_hook"), (nn.Module, "register_forward_pre_hook"),
                        (nn.Module, "register_full_backward_hook"), (nn.Module, "register_full_backward_pre_hook"),
                        (nn.Module, "register_backward_hook"),
                        (mm, "register_module_forward_hook"), (mm, "register_module_forward_pre_hook"),
                        (mm, "register_module_full_backward_hook"), (mm, "register_module_full_backward_pre_hook"),
                        (mm, "register_module_backward_hook"), (torch.utils.hooks.RemovableHandle, "remove")):
        fn = getattr(owner, name, None)
        if fn is not None and not getattr(fn, "__fxcc_counts_hooks__", False):
            setattr(owner, name, _counting(fn))


def any_on(module: nn.Module) -> bool:
    """Whether a call of `module` through nn.Module.__call__ would run anything besides its forward: a hook of the
    module's own (forward, backward, either kind's pre-hook) or a global one. Registering or removing one bumps
    EPOCH (`watch_registrations`)."""
    mm = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or mm._global_forward_hooks or mm._global_forward_pre_hooks
                or mm._global_backward_hooks or mm._global_backward_pre_hooks)


def _confined(hook: Any, root: nn.Module) -> bool:
    """A hook whose effects stay inside the call of a transformers model compiled whole (output capturing)."""
    qual = getattr(hook, "__qualname__", "")
    return (getattr(hook, "__module__", "") or "").startswith("transformers.") and \
        qual.endswith("output_capturing_hook") and type(root).__module__.startswith("transformers.") and \
        hasattr(root, "config")


def fingerprint(module: nn.Module) -> tuple:
    """Every forward hook that a call of `module` would run: global ones and those of each submodule."""
    mm = nn.modules.module
    found: list = [tuple(mm._global_forward_hooks), tuple(mm._global_forward_pre_hooks)]
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks:
            found.append((name, tuple(sub._forward_hooks), tuple(sub._forward_pre_hooks)))
    return tuple(found)


def foreign(module: nn.Module, own_run: bool = False) -> list[str]:
    """The forward hooks a compiled graph of `module` would not run at each call, described for a warning
    (`own_run`: the module's own hooks run around the compiled code, as for a compiled `module.forward`)."""
    mm = nn.modules.module
    out = [f"a global forward {kind}hook {_name(h)}" for kind, hooks in (("", mm._global_forward_hooks),
                                                                            ("pre-", mm._global_forward_pre_hooks))
           for h in hooks.values()]
    for name, sub in module.named_modules():
        if own_run and sub is module:
            continue
        for kind, hooks in (("", sub._forward_hooks), ("pre-", sub._forward_pre_hooks)):
            out += [f"a forward {kind}hook {_name(h)} on `{name or '(the module itself)'}` ({type(sub).__name__})"
                    for h in hooks.values() if not _confined(h, module)]
    return out


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__
