"""The `fxcc` command: explain, bench, passes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
from typing import Any


class UsageError(Exception):
    """Bad command-line input; printed without a traceback, exit status 2."""


def load_object(spec: str, what: str) -> Any:
    """Load `PATH.py:NAME` -> the object NAME defined in that file."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"{what} must be written PATH.py:NAME, got {spec!r}")
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no file {path!r}")
    mod_name = f"fxcc_user_{abs(hash(os.path.abspath(path)))}"
    module = sys.modules.get(mod_name)
    if module is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    if not hasattr(module, name):
        defined = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise UsageError(f"{what}: {path} defines no {name!r} (it defines: {', '.join(defined) or 'nothing callable'})")
    return getattr(module, name)


def load_model_and_inputs(model_spec: str, inputs_spec: str | None) -> tuple[Any, tuple, dict]:
    """`PATH.py:FACTORY` and `PATH.py:FUNC` (default: `inputs` in the model's file) -> model, args, kwargs."""
    import torch.nn as nn

    factory = load_object(model_spec, "model")
    model = factory if isinstance(factory, nn.Module) else factory()
    if inputs_spec is None:
        inputs_spec = f"{model_spec.rpartition(':')[0]}:inputs"
    inputs = load_object(inputs_spec, "--inputs")()
    if isinstance(inputs, dict):
        return model, (), inputs
    if not isinstance(inputs, tuple):
        raise UsageError(f"--inputs {inputs_spec} must return a tuple of example inputs, got {type(inputs).__name__}")
    return model, inputs, {}


def cmd_explain(args: argparse.Namespace) -> int:
    import fxcc

    model, a, kw = load_model_and_inputs(args.model, args.inputs)
    print(fxcc.explain(model, *a, passes=args.passes, ir_after_each=not args.final_only, **kw))
    if args.kernels:
        from fxcc.dialects import KERNELS

        print("\n== kernels")
        for kb in KERNELS.values():
            print(f"// {kb.key} [{kb.kind}] backend={kb.backend}\n{kb.text}\n")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from fxcc.pipeline import DEFAULT_PIPELINE, PASSES, _load_passes

    _load_passes()
    print(f"default pipeline: {DEFAULT_PIPELINE}\n")
    for name, cls in sorted(PASSES.items()):
        opts = ", ".join(f"{f.name.replace('_', '-')}={f.default}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<14} {cls.reads}->{cls.writes:<7} {'exact' if cls.exact else 'approximate':<11} {doc}")
        if opts:
            print(f"{'':<14} options: {opts}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fxcc import bench

    return bench.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcc", description="MLIR-style compiler and autotuner for PyTorch inference")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("explain", help="IR after each pass and where each op runs")
    e.add_argument("model", help="PATH.py:FACTORY (a function returning the nn.Module, or the module itself)")
    e.add_argument("--inputs", help="PATH.py:FUNC returning a tuple of example inputs (default: `inputs` in the model file)")
    e.add_argument("--passes", help="pipeline, e.g. 'canonicalize,raise,fuse,codegen' (default: the default pipeline)")
    e.add_argument("--final-only", action="store_true", help="print only the final IR, not the IR after each pass")
    e.add_argument("--kernels", action="store_true", help="also print every kernel body")
    e.set_defaults(fn=cmd_explain)

    b = sub.add_parser("bench", help="eager, torch.compile and fxcc side by side (ratios, compile times, error)")
    b.add_argument("workload", choices=["minilm", "llama"])
    b.add_argument("--batch", type=int)
    b.add_argument("--seq", type=int)
    b.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads); default 2")
    b.add_argument("--device", choices=["cpu", "cuda"])
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--hidden", type=int)
    b.add_argument("--layers", type=int)
    b.add_argument("--heads", type=int)
    b.add_argument("--kv-heads", type=int)
    b.add_argument("--intermediate", type=int)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--reps", type=int, default=20)
    b.add_argument("--engines", help="comma-separated subset, e.g. eager,fxcc")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(fn=cmd_bench)

    s = sub.add_parser("passes", help="list the registered passes and their options")
    s.set_defaults(fn=cmd_passes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from fxcc import CaptureError, PipelineError

    try:
        return args.fn(args)
    except (UsageError, PipelineError, CaptureError) as e:
        print(f"fxcc: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
