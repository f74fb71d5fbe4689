"""fxcc: an MLIR-style compiler and autotuner for PyTorch inference graphs.

The names below are loaded on first use (PEP 562): `from fxcc.pipeline import Pass` in a pass imports the
base layer only, never the runtime, a backend or the autotuner.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "compile": "fxcc.api", "explain": "fxcc.api", "register_torch_backend": "fxcc.api",
    "CompiledModule": "fxcc.runtime", "FullGraphError": "fxcc.runtime", "CaptureError": "fxcc.capture",
    "CompileOptions": "fxcc.options", "VerificationError": "fxcc.ir", "print_graph": "fxcc.ir",
    "DEFAULT_PIPELINE": "fxcc.pipeline", "Pass": "fxcc.pipeline", "PassContext": "fxcc.pipeline",
    "PassResult": "fxcc.pipeline", "PipelineError": "fxcc.pipeline", "parse_pipeline": "fxcc.pipeline",
    "register": "fxcc.pipeline",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxcc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
