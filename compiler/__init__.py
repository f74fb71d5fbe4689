"""fxcc: an MLIR-style compiler and autotuner for PyTorch inference graphs."""

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
