"""Triton row reductions past the registers: looped kernels (chunks of RBLOCK columns, one loop per dependency
level, a mean and the squared deviations from it in one), outer reductions laid out columns x rows (the kept,
contiguous dims on the tile's fast axis), and split kernels (partial results of few long rows combined by the
kernels after them).

Tiny shapes through Triton's interpreter; each path is forced by its parameters (RBLOCK below the row length,
SPLIT > 1) or by a smaller register budget, the kernels launched are recorded, and every output is compared
with the body run by torch (fp32 tightly, bf16 within two ulps as tests/test_triton.py allows).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

triton = pytest.importorskip("triton")

import fxcc  # noqa: E402
from fxcc.autotune.select import example_inputs  # noqa: E402
from fxcc.codegen import triton as backend  # noqa: E402
from fxcc.dialects import KERNEL_OPS, kernel_body  # noqa: E402

# numpy warns about inf - inf in lanes past a row's end: the interpreter computes masked lanes too
# Triton's interpreter on the CPU (tests/conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.usefixtures("triton_interpreter")]

EXTERN = "decompose,canonicalize,raise,fuse,codegen{backend=extern}"
LOOPED = {"RBLOCK": 4, "ROWS": 2, "SPLIT": 1}
SPLIT = {"RBLOCK": 4, "ROWS": 2, "SPLIT": 4}


# where the kernels run: a GPU when there is one (real Triton builds), else the interpreter on the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Recorded:
    """A kernel of the executed source that notes each launch (its name and grid)."""

    def __init__(self, name: str, fn, log: list) -> None:
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        self.log.append((self.name, tuple(grid)))
        return self.fn[grid]


@pytest.fixture
def launches(monkeypatch) -> list:
    """(kernel name, grid) of every launch of the candidates built in the test."""
    log: list = []
    execute = backend._execute

    def recording(source: str, tag: str) -> dict:
        ns = execute(source, tag)
        return {k: _Recorded(k, v, log) if k.startswith("fxcc_") else v for k, v in ns.items()}
    monkeypatch.setattr(backend, "_execute", recording)
    return log


def reductions_of(fn, *args) -> list:
    """The reduction kernel bodies fxcc's pipeline (with decompositions) makes of `fn(*args)`."""
    cm = fxcc.compile(fn, passes=EXTERN)
    with torch.no_grad():
        cm(*args)
    compiled = cm.fxcc if hasattr(cm, "fxcc") else cm
    gm = compiled.variants[-1].gm
    keys = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
    kbs = [kernel_body(k) for k in dict.fromkeys(keys)]
    found = [kb for kb in kbs if kb.kind == "reduction"]
    assert found, [kb.kind for kb in kbs]
    return found


def candidate(kb):
    cands = backend.candidates(kb, DEVICE)
    assert cands, f"no Triton candidate for\n{kb.text}"
    return cands[0]


def check(kb, params: dict, log: list, kernels: list[str], inputs: list | None = None) -> None:
    """The candidate with `params` launches `kernels` (in order) and matches the body run by torch."""
    cand = candidate(kb)
    inputs = [t.to(DEVICE) for t in inputs] if inputs is not None else example_inputs(kb, DEVICE)
    want = list(kb.body(*inputs))
    log.clear()
    got = cand.build({**cand.defaults, **params}).fn(inputs)
    assert [name for name, _ in log] == kernels, cand.plan.source
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        if w.dtype == torch.bfloat16:
            torch.testing.assert_close(g, w, rtol=2 ** -6, atol=2 ** -6, equal_nan=True)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True)


def looped_source(source: str) -> str:
    return source[source.index("def fxcc_reduction_looped("):source.index("def fxcc_reduction_split0(")]


def split_kernels(levels: int) -> list[str]:
    return [f"fxcc_reduction_split{j}" for j in range(levels + 1)]


# ------------------------------------------------------------------------------------------ looped and split


@pytest.mark.parametrize("op", ["sum", "mean", "amax"])
def test_last_dim_reductions_loop_and_split(op, launches):
    """Rows of 37 (odd, past four chunks of 4 and not a multiple) in 5 rows (not a multiple of ROWS); amax
    keeps torch's NaN through the loop's maximum and the combination of partial results."""
    x = torch.randn(5, 37)
    x[1, 30] = float("nan")
    (kb,) = reductions_of(lambda t: getattr(t, op)(-1) * 2, x)
    src = candidate(kb).plan.source
    assert "def fxcc_reduction(" in src and "for r0 in range(0, 37, RBLOCK):" in src
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"], [x])
    check(kb, SPLIT, launches, split_kernels(1), [x])
    assert launches[0][1] == (3, 4) and launches[1][1] == (3, 1)  # 3 row blocks x 4 splits, then one combine
    check(kb, {}, launches, ["fxcc_reduction"], [x])  # the defaults: whole rows in registers


@pytest.mark.parametrize("fn", [lambda x: x.sum(0), lambda x: x.mean((0, 2), keepdim=True),
                                lambda x: x.amax(0, keepdim=True) - x], ids=["sum0", "mean02_keepdim", "amax0_minus_x"])
def test_other_dims_loop_and_split(fn, launches):
    (kb,) = reductions_of(fn, torch.randn(9, 3, 7))
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"])
    check(kb, SPLIT, launches, split_kernels(1))


def test_outer_reductions_put_the_kept_contiguous_dim_on_the_fast_axis(launches):
    """A reduction over dim 0 runs along the tile's rows (axis 0): consecutive lanes read consecutive kept
    elements; over dims (0, 2) the innermost dim is reduced, so the columns are the fast axis."""
    (outer,) = reductions_of(lambda x: x.sum(0), torch.randn(9, 3, 7))
    src = candidate(outer).plan.source
    assert "[RBLOCK, ROWS]" in src and "axis=0)[None, :]" in src and "rows x columns" not in src
    check(outer, {"RBLOCK": 2, "ROWS": 4}, launches, ["fxcc_reduction_looped"])
    (inner,) = reductions_of(lambda x: x.sum((0, 2)), torch.randn(9, 3, 7))
    src = candidate(inner).plan.source
    assert "[ROWS, RBLOCK]" in src and "axis=1)[:, None]" in src


@pytest.mark.parametrize("welford", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("dims,correction,std", [((0,), 1, False), ((1,), 0, True), ((0, 2), 1, False),
                                                 ((2,), 1, True)])
def test_var_and_std_take_one_loop(dims, correction, std, welford, launches, monkeypatch):
    """var is a mean, then the mean of centred squares: one loop accumulates both (Welford), one split kernel and a
    combine; FXCC_TRITON_WELFORD=0 gives each a loop (level) of its own, two split kernels and a combine."""
    if not welford:
        monkeypatch.setenv("FXCC_TRITON_WELFORD", "0")

    def f(x):
        return (torch.std if std else torch.var)(x, dims, correction=correction)
    (kb,) = reductions_of(f, torch.randn(5, 6, 7))
    looped = looped_source(candidate(kb).plan.source)
    assert looped.count(" in range(") == (1 if welford else 2)
    assert ("welford_combine" in looped) == welford
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"])
    check(kb, SPLIT, launches, split_kernels(1 if welford else 2))


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_along_each_dim(dim, log, launches):
    """max, then the sum of exp(x - max), then the row-shaped output: three loops, or three split kernels."""
    (kb,) = reductions_of(lambda x: x.log_softmax(dim) if log else x.softmax(dim), torch.randn(6, 5, 7))
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"])
    check(kb, SPLIT, launches, split_kernels(2))
    assert launches[-1][1][1] == 4  # the outputs are stored by every split


def test_layer_norm_over_the_last_two_dims(launches):
    ln = nn.LayerNorm([5, 6]).eval()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    (kb,) = reductions_of(ln, torch.randn(3, 5, 6))
    assert "tx.layer_norm" in kb.text
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"])
    check(kb, {"RBLOCK": 8, "ROWS": 1, "SPLIT": 2}, launches, split_kernels(1))


def test_group_norm_reads_its_statistics_back_through_views(launches):
    gn = nn.GroupNorm(2, 4).eval()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    (kb,) = reductions_of(gn, torch.randn(3, 4, 3, 5))
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"])
    check(kb, {"RBLOCK": 8, "ROWS": 4, "SPLIT": 2}, launches, split_kernels(1))


def _affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm.eval()


# (module, input, loops of the looped kernel): rows of 53-221 columns, none a multiple of RBLOCK 16
STATISTICS = {
    "var_d02": (lambda x: torch.var(x, (0, 2)), (13, 3, 17), 1),
    "var_d0": (lambda x: torch.var(x, 0), (67, 5, 3), 1),  # over an outer dim: columns x rows
    "std_d1": (lambda x: torch.std(x, 1, correction=0), (4, 53, 6), 1),
    "centred_squares": (lambda x: (x - x.mean(-1, keepdim=True)).pow(2).mean(-1), (5, 101), 1),
    "var_of_a_prologue": (lambda x: torch.var(torch.exp(x * 0.5) + 1, -1), (5, 101), 1),
    "group_norm": (lambda: _affine(nn.GroupNorm(3, 6)), (2, 6, 7, 9), 2),
    "instance_norm": (lambda: nn.InstanceNorm2d(4, affine=True).eval(), (2, 4, 9, 11), 2),
    "layer_norm": (lambda: _affine(nn.LayerNorm(101)), (3, 4, 101), 2),
    "layer_norm_2d": (lambda: _affine(nn.LayerNorm([7, 13])), (3, 7, 13), 2),
}


def _statistic(name: str, dtype: torch.dtype = torch.float32):
    """The module (or function) of STATISTICS[name], an input and the loops its looped kernel takes."""
    make, shape, loops = STATISTICS[name]
    fn = make() if "norm" in name else make
    return (fn.to(dtype) if isinstance(fn, nn.Module) else fn), torch.randn(shape).to(dtype), loops


@pytest.mark.parametrize("name", list(STATISTICS))
def test_mean_and_variance_share_a_loop_over_ragged_rows(name, launches):
    """The mean and the squared deviations from it accumulate in one loop (the shifted, per-lane Welford update,
    the lanes then the splits combined by Chan et al.'s formula); a norm's second loop writes its output. Rows end
    inside a chunk, and with SPLIT 4 a split may have no columns (var_d0: 67 columns in splits of 24)."""
    fn, x, loops = _statistic(name)
    (kb,) = reductions_of(fn, x)
    looped = looped_source(candidate(kb).plan.source)
    assert looped.count(" in range(") == loops and "welford_combine" in looped
    check(kb, {"RBLOCK": 16, "ROWS": 2, "SPLIT": 1}, launches, ["fxcc_reduction_looped"])
    check(kb, {"RBLOCK": 8, "ROWS": 2, "SPLIT": 4}, launches, split_kernels(1))
    check(kb, {"RBLOCK": 16, "ROWS": 1, "SPLIT": 2}, launches, split_kernels(1))


@pytest.mark.parametrize("name", ["var_d02", "group_norm", "layer_norm"])
def test_one_pass_statistics_in_bf16(name, launches):
    fn, x, _ = _statistic(name, torch.bfloat16)
    (kb,) = reductions_of(fn, x)
    check(kb, {"RBLOCK": 16, "ROWS": 2, "SPLIT": 1}, launches, ["fxcc_reduction_looped"])
    check(kb, {"RBLOCK": 8, "ROWS": 2, "SPLIT": 4}, launches, split_kernels(1))


# the statistics above as E[x^2] - E[x]^2: (reduced dims, correction, std)
NAIVE = {"var_d02": ((0, 2), 1, False), "var_d0": ((0,), 1, False), "std_d1": ((1,), 0, True)}


@pytest.mark.parametrize("name", ["var_d02", "var_d0", "std_d1", "group_norm", "layer_norm"])
def test_statistics_of_a_large_mean_match_eager_in_float64(name):
    """x = 1000 + randn: the variance as E[x^2] - E[x]^2 in fp32 is off by percents (1e6 - 1e6 cancels); the
    one-pass kernels, looped and split, match the body run in float64 as closely as the two-pass ones do."""
    fn, x, _ = _statistic(name)
    (kb,) = reductions_of(fn, x)
    inputs = example_inputs(kb, DEVICE)
    inputs[0] = 1000 + torch.randn_like(inputs[0])  # the reduced input (a norm's other inputs: its weight, bias)
    want = kb.body(*[t.double() for t in inputs])[0]
    cand = candidate(kb)
    for params in ({"RBLOCK": 16, "ROWS": 2, "SPLIT": 1}, {"RBLOCK": 8, "ROWS": 2, "SPLIT": 4}):
        got = cand.build({**cand.defaults, **params}).fn(inputs)[0].double()
        if name in NAIVE:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
        else:  # x - mean is good to fp32's resolution at 1000 (6e-5), in eager's fp32 as here
            torch.testing.assert_close(got, want, rtol=0, atol=5e-4)
    if name in NAIVE:
        dims, correction, std = NAIVE[name]
        x = inputs[0]
        n = math.prod(x.shape[d] for d in dims)
        naive = ((x * x).mean(dims) - x.mean(dims) ** 2) * n / (n - correction)
        naive = naive.sqrt() if std else naive
        assert ((naive.double() - want).abs() / want).max() > 1e-2


def test_a_nan_or_an_infinity_makes_the_one_pass_variance_nan(launches):
    """As the two-pass variance: an infinite value, first in its lane or not, gives NaN (inf - inf), as a NaN does."""
    x = torch.randn(5, 37)
    x[1, 30], x[2, 0], x[3, 17] = float("nan"), float("inf"), -float("inf")
    (kb,) = reductions_of(lambda t: torch.var(t, -1), x)
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"], [x])
    check(kb, SPLIT, launches, split_kernels(1), [x])
    assert launches and torch.var(x, -1)[1:4].isnan().all()


def test_deviations_from_another_mean_take_a_loop_of_their_own(launches):
    """The one-pass update needs the squared deviations of the mean's own input: from another tensor's mean they
    are summed in a second loop, as before."""
    x, y = torch.randn(4, 37), torch.randn(4, 37)
    (kb,) = reductions_of(lambda a, b: (a - b.mean(-1, keepdim=True)).pow(2).sum(-1), x, y)
    looped = looped_source(candidate(kb).plan.source)
    assert looped.count(" in range(") == 2 and "welford_combine" not in looped
    check(kb, LOOPED, launches, ["fxcc_reduction_looped"], [x, y])


@pytest.mark.parametrize("name", ["var_d02", "group_norm", "layer_norm"])
def test_one_pass_statistics_take_one_loop_fewer(name, monkeypatch):
    """FXCC_TRITON_WELFORD=0 gives the squared deviations a loop after the mean's, as before the one-pass update."""
    fn, x, loops = _statistic(name)
    (kb,) = reductions_of(fn, x)
    one_pass = looped_source(candidate(kb).plan.source).count(" in range(")
    monkeypatch.setenv("FXCC_TRITON_WELFORD", "0")
    two_pass = looped_source(candidate(kb).plan.source).count(" in range(")
    assert (one_pass, two_pass) == (loops, loops + 1)


class Hinge(nn.Module):
    def forward(self, pred, target):
        return torch.clamp(1 - pred * target, min=0).mean()


@pytest.mark.parametrize("loss", [lambda p, t: F.mse_loss(p, t), Hinge()], ids=["mse", "hinge"])
def test_losses_over_everything_split_one_row(loss, launches):
    (kb,) = reductions_of(loss, torch.randn(7, 13), torch.randn(7, 13).sign())
    check(kb, {"RBLOCK": 8, "SPLIT": 8}, launches, split_kernels(1))
    assert [grid for _, grid in launches] == [(1, 8), (1, 1)]
    check(kb, {"RBLOCK": 16}, launches, ["fxcc_reduction_looped"])


def test_cross_entropy_is_not_a_generated_reduction():
    """cross_entropy stays one library call (the pipeline does not decompose it): no row kernel to test."""
    cm = fxcc.compile(lambda a, b: F.cross_entropy(a, b), passes=EXTERN)
    cm(torch.randn(6, 11), torch.randint(0, 11, (6,)))
    kinds = {k.body.kind for k in (cm.fxcc if hasattr(cm, "fxcc") else cm).variants[-1].kernels.values()}
    assert "reduction" not in kinds


def test_bf16_accumulates_in_fp32(launches):
    x = torch.randn(3, 45).to(torch.bfloat16)
    (kb,) = reductions_of(lambda t: t.softmax(-1), x)
    assert "tl.full([ROWS, RBLOCK], 0.0, tl.float32)" in candidate(kb).plan.source
    check(kb, {"RBLOCK": 16}, launches, ["fxcc_reduction_looped"], [x])
    check(kb, {"RBLOCK": 16, "SPLIT": 2}, launches, split_kernels(2), [x])
    (kb,) = reductions_of(lambda t: t.sum(-1), x)
    check(kb, {"RBLOCK": 8, "SPLIT": 4}, launches, split_kernels(1), [x])


def test_reductions_of_one_level_share_a_loop():
    """A sum and a max of the same rows need no result of each other: one loop accumulates both (fusion keeps
    them apart, so the body is traced here)."""
    x = torch.randn(4, 19, device=DEVICE)
    body = make_fx(lambda t: t.sum(-1) + t.amax(-1), tracing_mode="fake")(x)
    plan = backend.reduction_plan(body, "sum and amax")
    looped = looped_source(plan.source)
    assert looped.count(" in range(") == 1 and looped.count("acc") >= 4
    run = plan.launcher(backend._execute(plan.source, "share"), {**plan.defaults, **LOOPED})
    torch.testing.assert_close(run([x])[0], x.sum(-1) + x.amax(-1))


def test_rows_past_the_register_budget_loop_by_default(monkeypatch, launches):
    """Where a row does not fit the registers there is no persistent kernel and the defaults loop."""
    monkeypatch.setattr(backend, "REGISTER_TILE", 16)
    (kb,) = reductions_of(lambda x: F.layer_norm(x, (21,)) * 2, torch.randn(3, 21))
    cand = candidate(kb)
    assert "def fxcc_reduction(" not in cand.plan.source
    assert backend.row_mode(cand.defaults, 21, False, True) == "looped" and cand.defaults["RBLOCK"] <= 16
    check(kb, {}, launches, ["fxcc_reduction_looped"])


def test_defaults_follow_the_shape():
    """Full-size shapes (issue 20): whole short rows, looped long ones, split where rows are few."""
    d = backend.row_defaults
    assert d(1024 * 2048, 128, outer=True, persistent=True, split=True) == \
        {"ROWS": 128, "RBLOCK": 128, "SPLIT": 1, "num_warps": 4}  # var over dim 0: whole columns, coalesced
    # a softmax over dim 1 writes rows as large as its input: fewer rows a tile, more warps
    assert d(128 * 2048, 1024, outer=True, persistent=True, split=True, writes_rows=True) == \
        {"ROWS": 16, "RBLOCK": 1024, "SPLIT": 1, "num_warps": 16}
    assert d(1024, 128 * 2048, outer=False, persistent=False, split=True)["SPLIT"] == 1  # enough rows
    mse = d(1, 32768 * 32768, outer=False, persistent=False, split=True)
    assert mse["SPLIT"] == 1024 and mse["RBLOCK"] == 4096
    assert d(512, 200704, outer=False, persistent=False, split=True) == \
        {"ROWS": 2, "RBLOCK": 4096, "SPLIT": 1, "num_warps": 8}  # GroupNorm's 512 rows: looped, two at a time
    assert d(64, 200704, outer=False, persistent=False, split=True)["SPLIT"] >= 4  # 64 rows: split
    # one-pass statistics: LayerNorm's 256 rows of 524288 looped one at a time on 16 warps, not split in 4;
    # GroupNorm's 512 rows as before; 64 rows still split
    assert d(256, 524288, outer=False, persistent=False, split=True, one_pass=True) == \
        {"ROWS": 1, "RBLOCK": 4096, "SPLIT": 1, "num_warps": 16}
    assert d(256, 524288, outer=False, persistent=False, split=True)["SPLIT"] == 4
    assert d(512, 200704, outer=False, persistent=False, split=True, one_pass=True) == \
        {"ROWS": 2, "RBLOCK": 4096, "SPLIT": 1, "num_warps": 8}
    assert d(64, 200704, outer=False, persistent=False, split=True, one_pass=True)["SPLIT"] >= 2
    assert d(5, 40, outer=False, persistent=True, split=True) == {"ROWS": 8, "RBLOCK": 64, "SPLIT": 1, "num_warps": 4}
    assert backend.row_mode({"RBLOCK": 64, "SPLIT": 1}, 40, True, True) == "persistent"
    assert backend.row_mode({"RBLOCK": 16, "SPLIT": 1}, 40, True, True) == "looped"
    assert backend.row_mode({"RBLOCK": 16, "SPLIT": 2}, 40, True, True) == "split"


def test_symbolic_row_counts_loop_and_split():
    """Rows counted at run time (an exported batch dim): every kernel reads the count from its input."""
    class Softmax(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1) * 2

    ep = torch.export.export(Softmax(), (torch.randn(5, 37),), dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    plan = backend.reduction_plan(ep.graph_module, "softmax over symbolic rows")
    ns = backend._execute(plan.source, "symbolic")
    for params in ({}, LOOPED, SPLIT):
        for rows in (3, 9):
            x = torch.randn(rows, 37, device=DEVICE)
            got = plan.launcher(ns, {**plan.defaults, **params})([x])[0]
            torch.testing.assert_close(got, torch.softmax(x, -1) * 2)
