"""The breadth suite (benchmarks/breadth/) at its CI size on the CPU: every module through fxcc's graph passes
(capture, decompose, raise, fuse) with library kernels equals eager; a representative subset with the default
pipeline (generated TVM kernels, chosen by measurement) and one with Triton kernels (Triton's interpreter) too.
FXCC_BREADTH_ALL=1 runs every module with the default pipeline (about ten minutes on two cores)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from conftest import assert_outputs_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import fxcc  # noqa: E402
from breadth import CASES, CATEGORIES, select  # noqa: E402
from breadth.runner import scaled_error  # noqa: E402

EXTERN = "decompose,canonicalize,raise,merge-linears,fuse,codegen{backend=extern}"


def _run(name: str, passes: str | None = None, device: str = "cpu"):
    model, inputs = CASES[name].make("small", device)
    with torch.no_grad():
        want = model(*inputs)
    cm = fxcc.compile(model, passes=passes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = cm(*inputs)
    return cm, got, want, [str(w.message) for w in caught]


def test_suite_covers_every_category_with_sixty_modules_or_more():
    assert len(CASES) >= 60
    assert {c.category for c in CASES.values()} == set(CATEGORIES)
    assert [c.name for c in select("resnet18,softmax_d*")] == ["resnet18", "softmax_d0", "softmax_d1", "softmax_d2"]
    with pytest.raises(ValueError, match="no breadth module named nosuch"):
        select("nosuch")


@pytest.mark.parametrize("name", list(CASES))
def test_module_matches_eager_through_the_graph_passes(name):
    cm, got, want, _ = _run(name, EXTERN)
    assert_outputs_close(got, want, atol=1e-4, rtol=1e-4)


# one module per kind of generated kernel: activations, reductions along each dim, norms, pooling, gathers,
# GEMM and convolution epilogues, a whole network per family
DEFAULT_SUBSET = ["mish", "softmax_d0", "logsumexp_d2", "var_d02", "sum_d1", "group_norm", "batch_norm2d",
                  "max_pool2d", "pad_reflect", "slices", "hinge_loss", "conv2d_relu_avgpool",
                  "convt2d_softmax_bias_scale_sigmoid", "linear_dropout_residual_layernorm", "bmm_softmax_bmm",
                  "densenet_transition", "convnext_block", "gru_cells"]


@pytest.mark.parametrize("name", list(CASES) if os.environ.get("FXCC_BREADTH_ALL") == "1" else DEFAULT_SUBSET)
def test_module_matches_eager_with_the_default_pipeline(name):
    cm, got, want, caught = _run(name)
    assert_outputs_close(got, want, atol=1e-4, rtol=1e-4)
    assert not [m for m in caught if "fxcc" in m], caught  # no backend failed to build or check a kernel


# Triton kernels (on the GPU, else through the interpreter): elementwise, reductions along the last and other
# dims, norms, pooling, gathers, a GEMM and a convolution with epilogues, a small network
TRITON_SUBSET = ["gelu", "hardswish", "softmax_d0", "sum_d1", "layer_norm_2d", "group_norm", "batch_norm2d",
                 "hinge_loss", "max_pool2d", "pad_reflect", "concat", "linear_bias_gelu", "conv2d_relu_avgpool",
                 "bmm_scale_residual", "convnext_block"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes masked-off lanes too
@pytest.mark.parametrize("name", TRITON_SUBSET)
def test_module_matches_eager_with_triton_kernels(name, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cm, got, want, _ = _run(name, "decompose,canonicalize,raise,fuse,codegen{backend=triton,reps=1}", device)
    assert_outputs_close(got, want, atol=1e-4, rtol=1e-4)
    backends = {k.backend for k in cm.variants[-1].kernels.values()}
    assert any(b.startswith("triton") for b in backends), f"no Triton kernel ran for {name}: {backends}"


def test_scaled_error_counts_matching_nans_as_equal_and_shape_changes_as_wrong():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert scaled_error(a, a.clone()) == 0.0
    assert scaled_error(a, torch.tensor([1.0, 2.0, 3.0])) > 0
    assert scaled_error((a,), (a[:2],)) == float("inf")


def test_bench_breadth_cli_checks_and_times_a_module(tmp_path, capsys):
    import json

    from fxcc import cli

    out = tmp_path / "r.json"
    assert cli.main(["bench", "breadth", "--size", "small", "--only", "relu", "--engines", "eager,fxcc",
                     "--reps", "2", "--warmup", "1", "--threads", "1", "--no-warm", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "relu" in text and "geomean overall" in text
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["name"] == "relu" and r["status"] == "ok" and r["ratios"]["eager"] > 0
    assert cli.main(["bench", "breadth", "--only", "nosuch"]) == 2
    assert "no breadth module named nosuch" in capsys.readouterr().err
