"""Every option and plan field is checked at the door: an error naming the field and what it takes."""

from __future__ import annotations

import json

import fxcc
import pytest
import torch
from fxcc.autotune.plan import PlanError, read_plan
from fxcc.pipeline import PipelineError, parse_pipeline


@pytest.mark.parametrize("text, message", [
    ("codegen{reps=0}", "reps must be at least 1"),
    ("codegen{backend=tvm,backend=extern}", "given option 'backend' twice"),
    ("fuse{max-group=0}", "max_group must be at least 1"),
    ("canonicalize{max-fold-mb=-1}", "max_fold_mb must be >= 0"),
    ("layer-skip{speedup=inf}", "option .speedup. of pass .layer-skip.: expected float"),
    ("fuse-allreduce-rmsnorm{ratio=nan}", "expected a finite number"),
])
def test_pipeline_option_values_are_checked(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"quality_budget": "0.1"}, ValueError, "quality_budget"),
    ({"quality_budget": 1.5}, ValueError, r"in \[0, 1\)"),
    ({"quality_budget": float("inf")}, ValueError, "quality_budget"),
    ({"quality_budget": True}, ValueError, "quality_budget"),
    ({"verify_each": "no"}, TypeError, "verify_each must be True or False"),
    ({"cuda_graphs": 1}, TypeError, "cuda_graphs must be True or False"),
    ({"print_ir_after": "raise"}, TypeError, "print_ir_after must be a tuple"),
    ({"max_variants": True}, ValueError, "max_variants"),
    ({"target": "gpu"}, ValueError, "unknown target"),
])
def test_compile_options_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        fxcc.CompileOptions(**kwargs)


def test_print_ir_after_names_a_pass():
    assert fxcc.CompileOptions(print_ir_after=["raise"]).print_ir_after == ("raise",)
    with pytest.raises(ValueError, match="print_ir_after names no pass: 'rise'"):
        fxcc.compile(torch.nn.Linear(2, 2), options=fxcc.CompileOptions(print_ir_after=("rise",)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_target_without_a_gpu_is_an_error():
    with pytest.raises(ValueError, match="target='cuda' but torch sees no CUDA device"):
        fxcc.compile(torch.nn.Linear(2, 2), target="cuda")


GOOD = {"fxcc_plan": None, "fingerprint": {"module": "M", "tensors": [], "weights_sha256": "0", "inputs": []},
        "target": {"kind": "cpu", "id": "x"}, "versions": "torch=1", "pipeline": "default", "kernels": {}}


@pytest.mark.parametrize("change, message", [
    ({"pipeline": 3}, "field 'pipeline' must be text"),
    ({"kernels": []}, "field 'kernels' must be an object"),
    ({"target": {"kind": 1}}, "target.kind must be text"),
    ({"kernels": {"k1": "tvm"}}, r"kernels\['k1'\] must be an object"),
    ({"kernels": {"k1": {"backend": "tvm", "params": [1]}}}, r"kernels\['k1'\].params must be an object"),
    ({"latency_ms": "fast"}, "field 'latency_ms' must be a number"),
    ({"fingerprint": {"module": ["M"]}}, "fingerprint.module must be text"),
])
def test_malformed_plan_fields_are_plan_errors(tmp_path, change, message):
    from fxcc.autotune.plan import PLAN_VERSION

    path = tmp_path / "p.json"
    path.write_text(json.dumps({**GOOD, "fxcc_plan": PLAN_VERSION, **change}))
    with pytest.raises(PlanError, match=message):
        read_plan(path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**GOOD, "fxcc_plan": PLAN_VERSION}))
    assert read_plan(good).pipeline == "default"
