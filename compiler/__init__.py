"""fxcc: an MLIR-style compiler and autotuner for PyTorch inference graphs."""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Generated CPU kernels run on TVM's thread pool between torch ops. An OpenMP pool that spins after
    # each op holds the cores those kernels need, so when fxcc is imported first it asks OpenMP to wait
    # passively (unless the user chose a policy). Imported after torch, this is too late to matter.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import compile, explain, register_torch_backend
from .capture import CaptureError
from .ir import VerificationError, print_graph
from .options import CompileOptions
from .pipeline import DEFAULT_PIPELINE, Pass, PassContext, PassResult, PipelineError, parse_pipeline, register
from .runtime import CompiledModule

__all__ = [
    "compile", "explain", "register_torch_backend", "CompileOptions", "CompiledModule", "CaptureError",
    "PipelineError", "VerificationError", "Pass", "PassContext", "PassResult", "register", "parse_pipeline",
    "print_graph", "DEFAULT_PIPELINE",
]
__version__ = "0.1.0"
