"""ModuleView: an nn.Module that stands for another one. CompiledModule is one, so a compiled model passes
`isinstance(c, nn.Module)`, can be a submodule, and its parameters, state_dict (keys unprefixed), training flag
and moves (`to`, `cuda`, `half`) are the original model's."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.nn as nn


class ModuleView(nn.Module):
    """Owns no parameters, buffers or submodules: every walk over them, `state_dict`, `load_state_dict`,
    `train`/`eval`, `apply` and `_apply` (behind `to`, `cuda`, `float`, ...) act on `self.module`, and methods
    that would return the original return the view. Attributes set on the view are plain attributes.
    Hooks registered on the view do not run (calls go to the subclass's `__call__`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._model = module  # the same, kept while a subclass takes `module` out of the dict (fxcc.runtime)

    def __setattr__(self, name: str, value: Any) -> None:  # a module value is not a child of the view
        object.__setattr__(self, name, value)

    @property
    def training(self) -> bool:  # type: ignore[override]
        module = self.__dict__.get("_model")
        return True if module is None else module.training

    @training.setter
    def training(self, mode: bool) -> None:
        module = self.__dict__.get("_model")  # None while nn.Module.__init__ sets its default
        if module is not None:
            module.training = mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self(*args, **kwargs)

    def train(self, mode: bool = True) -> ModuleView:
        self.module.train(mode)
        return self

    def apply(self, fn: Callable[[nn.Module], None]) -> ModuleView:
        self.module.apply(fn)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> ModuleView:
        self.module._apply(fn, recurse)
        return self

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        return self.module.named_children()

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True) -> Iterator:
        return self.module.named_modules(memo, prefix, remove_duplicate)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        return self.module.named_buffers(prefix, recurse, remove_duplicate)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict, assign)
