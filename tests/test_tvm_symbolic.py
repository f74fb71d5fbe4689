"""TVM kernels of symbolic sizes: a variant compiled with dynamic shapes builds its pointwise chains, norms,
softmax and GEMM epilogues on TVM, with the symbolic (outer) sizes as kernel arguments, and each kernel equals
eager at every size, 1 and primes included, without a recompile.

`codegen{backend=tvm}` puts every kernel TVM can lower on TVM, so these tests check the generated code itself.
"""

from __future__ import annotations

import warnings

import fxcc
import pytest
import sympy
import torch
import torch.nn.functional as F
from conftest import assert_outputs_close

pytest.importorskip("tvm")
from fxcc import ir  # noqa: E402
from fxcc.autotune import select  # noqa: E402
from fxcc.codegen import extern  # noqa: E402
from fxcc.codegen import tvm as tvm_backend  # noqa: E402

TVM = "canonicalize,raise,fuse,codegen{backend=tvm}"
SIZES = (5, 13, 2, 64, 97, 3001)  # primes, the smallest symbolic size, a multiple of the vector width, a large one


def symbolic(kb) -> bool:
    return any(ir.is_symbolic(d) for n in kb.body.graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor) for d in n.meta["val"].shape)


def run_sizes(fn, make, dims: dict[int, int], sizes=SIZES, atol=1e-5):
    """Compile `fn` on TVM with the dims in `dims` (argument -> dim) symbolic from the first call, call it at each
    size (equal to eager), and return its kernels; every size runs the one symbolic variant."""
    cm = fxcc.compile(fn, passes=TVM, options=fxcc.CompileOptions(time_vs_eager=False))
    with torch.no_grad():
        for n in sizes:
            args = make(n)
            if n == sizes[0]:
                for i, d in dims.items():
                    torch._dynamo.mark_dynamic(args[i], d)
            assert_outputs_close(cm(*args), fn(*args), atol=atol, rtol=atol)
    stats = cm.fxcc.stats if hasattr(cm, "fxcc") else cm.stats
    assert stats.compiles == 1 and stats.eager_calls == 0, stats.reasons
    variants = cm.fxcc.variants if hasattr(cm, "fxcc") else cm.variants
    return list(variants[0].kernels.values())


def on_tvm(ks, kind: str, labels=("tvm",)):
    """The symbolic kernels of `kind` built by TVM (one at least), each equal to extern at sizes 1, a prime and 0
    when called directly (a size-1 call of the model compiles a static variant: export specialises 0 and 1)."""
    found = [k for k in ks if k.kind == kind and k.backend in labels]
    assert found, f"no {kind} kernel on {labels}: {[(k.kind, k.backend) for k in ks]}"
    for k in found:
        assert symbolic(k.body)
        syms = {s for n in k.body.body.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
                for d in n.meta["val"].shape if ir.is_symbolic(d) for s in d.node.expr.free_symbols}
        for value in (1, 31, 0):  # 0: no elements, torch's own edge cases
            x = select.example_inputs(k.body, "cpu", sizes={s: sympy.Integer(value) for s in syms})
            ref = extern.Extern(k.body).build({}).fn(x)
            for g, r in zip(k.fn(x), ref):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    return found


def test_a_symbolic_pointwise_chain_runs_on_tvm_at_every_size():
    b = torch.randn(64)

    def fn(x, y):
        return torch.tanh(F.gelu(x * 2.0 + b) - y.sigmoid()), (x * y).relu()

    ks = run_sizes(fn, lambda n: (torch.randn(n, 3, 64), torch.randn(n, 3, 64)), {0: 0, 1: 0})
    on_tvm(ks, "pointwise")


def test_a_size_read_from_an_input_is_a_scalar_operand():
    def fn(x):
        n = x.shape[0]
        return (x * n + 1.0).relu(), (x > n).float()

    ks = run_sizes(fn, lambda n: (torch.randn(n, 8) * 10,), {0: 0})
    on_tvm(ks, "pointwise")


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_an_rms_norm_over_a_symbolic_number_of_rows():
    torch.manual_seed(0)
    ks = run_sizes(RMSNorm().eval(), lambda n: (torch.randn(2, n, 64),), {0: 1})
    on_tvm(ks, "reduction")


def test_softmax_over_a_static_last_dim_with_symbolic_rows():
    def fn(x):
        return torch.softmax(x * 0.125, dim=-1), torch.log_softmax(x, dim=-1)

    ks = run_sizes(fn, lambda n: (torch.randn(n, 4, 48) * 3,), {0: 0})
    on_tvm(ks, "reduction")


class Epilogue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 96)

    def forward(self, x, r):
        return F.gelu(self.lin(x)) * 0.5 + r


def test_a_gemm_epilogue_with_a_symbolic_m():
    torch.manual_seed(0)
    ks = run_sizes(Epilogue().eval(), lambda n: (torch.randn(n, 64), torch.randn(n, 96)), {0: 0, 1: 0}, atol=1e-4)
    on_tvm(ks, "gemm", labels=("tvm+extern", "tvm+onednn"))


def test_a_reduction_over_a_symbolic_dim_stays_with_torch():
    def fn(x):
        return torch.softmax(x, dim=0) + 1.0, torch.sin(x) * 2.0

    ks = run_sizes(fn, lambda n: (torch.randn(n, 16),), {0: 0})
    on_tvm(ks, "pointwise")
    assert all(not k.backend.startswith("tvm") for k in ks if k.kind == "reduction")


def test_a_symbolic_kernels_cache_key_differs_from_the_static_ones():
    fn = RMSNorm().eval()
    keys = {}
    for dynamic in (True, False):
        cm = fxcc.compile(fn, passes=TVM, options=fxcc.CompileOptions(dynamic=dynamic, time_vs_eager=False))
        with torch.no_grad():
            cm(torch.randn(2, 9, 64))
        (k,) = cm.variants[0].kernels.values()
        assert k.backend == "tvm" and symbolic(k.body) == dynamic
        keys[dynamic] = k.choice.key
    assert keys[True] != keys[False]
    cm = fxcc.compile(fn, passes=TVM, options=fxcc.CompileOptions(dynamic=True, time_vs_eager=False))
    with torch.no_grad():  # a warm compile loads the symbolic build from the artifact cache: right at other sizes
        for n in (9, 4, 23):
            x = torch.randn(2, n, 64)
            assert_outputs_close(cm(x), fn(x))
    (k,) = cm.variants[0].kernels.values()
    assert k.cached and k.backend == "tvm"


def test_a_kernel_wrong_at_another_size_is_dropped(monkeypatch):
    """The codegen check runs a symbolic kernel at a second size: one right only at the example's is dropped."""
    build = tvm_backend.TVMCandidate.build

    def wrong_elsewhere(self, params):
        b = build(self, params)
        fn, rows = b.fn, None

        def run(inputs):
            nonlocal rows
            rows = rows or inputs[0].shape[0]
            out = fn(inputs)
            return out if inputs[0].shape[0] == rows else [o + 1 for o in out]
        b.fn = run
        return b

    monkeypatch.setattr(tvm_backend.TVMCandidate, "build", wrong_elsewhere)
    fn = RMSNorm(32).eval()
    cm = fxcc.compile(fn, passes=TVM, options=fxcc.CompileOptions(dynamic=True, time_vs_eager=False, tune="off"))
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        x = torch.randn(11, 32)
        assert_outputs_close(cm(x), fn(x))
    (k,) = cm.variants[0].kernels.values()
    assert k.backend == "extern"
    assert any("failed on the inputs at other sizes" in str(w.message) and "differs" in str(w.message) for w in seen)


def test_the_sizes_of_a_spec_are_arithmetic_on_its_size_arguments():
    spec = {"sizes": [["sym0", 0, 0]], "inputs": [[0, ["sym0", 8], [8, 1], "8*sym0", 0]],
            "outputs": [[["sym0", 8], [8, 1], "float32", [0, 1]]]}
    ins, outs = tvm_backend._evaluator(spec)((3,))
    assert ins[0][1:4] == ((3, 8), (8, 1), 24) and outs[0][0] == (3, 8)
    spec["inputs"][0][3] = "__import__('os')"
    with pytest.raises(ValueError, match="not arithmetic"):
        tvm_backend._evaluator(spec)


transformers = pytest.importorskip("transformers")


def test_a_llama_decode_loop_runs_tvm_kernels_in_its_symbolic_variants():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompts = [torch.randint(1, 100, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 11)]
    with torch.no_grad():
        expected = [model.generate(p, max_new_tokens=4, do_sample=False) for p in prompts]
    model.forward = fxcc.compile(model.forward, passes=TVM)
    with torch.no_grad():
        assert torch.equal(model.generate(prompts[0], max_new_tokens=4, do_sample=False), expected[0])
        stats = model.forward.fxcc.stats
        first = stats.compiles
        assert torch.equal(model.generate(prompts[1], max_new_tokens=4, do_sample=False), expected[1])
    assert stats.compiles == first and stats.eager_calls == 0  # another prompt length compiles nothing
    prefill = model.forward.fxcc.variants[0]
    ks = [k for k in prefill.kernels.values() if symbolic(k.body) and k.backend.startswith("tvm")]
    kinds = {k.kind for k in ks}
    assert {"reduction", "gemm"} <= kinds, [(k.kind, k.backend) for k in prefill.kernels.values()]
