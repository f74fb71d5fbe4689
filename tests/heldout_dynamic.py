"""Small programs whose control flow depends on tensor values (what DyCL splits), none of them in tests/dycl_fuzz.py,
tests/test_dycl*.py or tests/heldout_programs.py: tensor `if`s inside loops, `while` loops on a tensor condition
with an iteration cap, early `return` and `break`/`continue` on `.item()`, per-row loops over `x.shape[0]`,
`.tolist()` driven indexing, data-dependent shapes (nonzero, masked_select, unique, boolean masks, one-argument
`torch.where`), a beam-search-like top-k loop, a greedy decode over a hand-written GRU cell, recursion on a tensor
condition, lists and dicts returned, Python and tensor state mutated on `self`, seeded random ops, exceptions raised
on a tensor condition, generators and comprehensions over tensor values, one compiled module calling another.

Each program is compiled once and called five times on inputs drawn so that the calls take different branches;
every call is compared with eager on the same inputs: outputs (values, dtypes, shapes, Python types), the exception
raised (type and message), the inputs afterwards and the module's state (parameters, buffers and plain Python
attributes). Outcomes as in tests/heldout_programs.py: equal, eager-fallback (equal, ran eagerly with a warning),
SILENT-EAGER, DIFF(...), FXCC-ERROR.

    python tests/heldout_dynamic.py [--only NAME[,NAME]] [--verbose]

tests/test_heldout_dynamic.py runs a CI-sized subset.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn
from heldout_programs import GOOD, Probe, Result, table
from heldout_programs import run as check
from user_programs import probe_main

PROBES: dict[str, Probe] = {}


def probe(name: str, sizes: tuple[int, ...] = (4, 6)):
    def deco(inputs):
        def register(build):
            PROBES[name] = Probe(name, build, inputs, sizes)
            return build
        return register
    return deco


class Fn(nn.Module):
    """A module around a plain function: eager runs the module, fxcc compiles the function itself."""

    fn = staticmethod(lambda *a: a)

    def forward(self, *args):
        return self.fn(*args)


def fn_probe(name: str, inputs, sizes: tuple[int, ...] = (4, 6)):
    def deco(f):
        probe(name, sizes)(inputs)(type(name, (Fn,), {"fn": staticmethod(f)}))
        return f
    return deco


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _one(n, g):
    return (_r(g, n, 3),)


def _ints(n, g):
    return (torch.randint(-3, 4, (n, 3), generator=g),)


# ------------------------------------------------------------------------------------------------ programs


@fn_probe("if_sum_in_loop", _one)
def if_sum_in_loop(x):
    acc = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        if x[i].sum() > 0:
            acc = acc + x[i] * 2
        else:
            acc = acc - x[i].abs()
    return acc


@fn_probe("while_tensor_capped", _one)
def while_tensor_capped(x):
    y, it = x, 0
    while y.abs().max() > 0.5 and it < 20:
        y = y * 0.7 + 0.01
        it += 1
    return y, it


@fn_probe("early_return_loop", _one)
def early_return_loop(x):
    s = x[0]
    for i in range(1, x.shape[0]):
        s = s + x[i]
        if s.max() > 2.0:
            return s, i
    return s * -1, -1


@fn_probe("break_continue_item", _ints)
def break_continue_item(x):
    out = []
    for row in x:
        v = row.sum().item()
        if v == 0:
            continue
        if v < -4:
            break
        out.append(row * v)
    return torch.stack(out) if out else x.new_zeros(0, 3)


@fn_probe("per_row_python", _one)
def per_row_python(x):
    rows = []
    for i in range(x.shape[0]):
        r = x[i]
        rows.append(r.softmax(0) if r[0] > r[1] else r.sigmoid())
    return torch.stack(rows, 0)


@fn_probe("tolist_indexing", lambda n, g: (_r(g, n, 3), torch.randint(0, n, (3,), generator=g)))
def tolist_indexing(x, idx):
    out = x.new_zeros(x.shape[1])
    for k in idx.tolist():
        out = out + x[k] * (k + 1)
    return out, idx.tolist()


@fn_probe("nonzero_rows", _one)
def nonzero_rows(x):
    nz = (x[:, 0] > 0).nonzero()
    return x[nz.squeeze(1)].sum(0), nz.shape[0]


@fn_probe("masked_select_mean", _one)
def masked_select_mean(x):
    v = x.masked_select(x > 0)
    if v.numel() == 0:
        return x.new_zeros(())
    return v.mean()


@fn_probe("unique_counts", _ints)
def unique_counts(x):
    u, c = torch.unique(x, return_counts=True)
    return u, c, int(c.max())


@fn_probe("bool_mask_assign", _one)
def bool_mask_assign(x):
    y = x.clone()
    m = y < 0
    y[m] = y[m] ** 2
    return y, y[~m]


@fn_probe("where_one_arg_loop", _one)
def where_one_arg_loop(x):
    rows, cols = torch.where(x > 0.5)
    total = x.new_zeros(())
    for r, c in zip(rows.tolist(), cols.tolist()):
        total = total + x[r, c] * (r - c)
    return total


@fn_probe("beam_topk", lambda n, g: (_r(g, n, 6).log_softmax(-1),), sizes=(4, 5))
def beam_topk(logp):
    beams = [([], 0.0)]
    for t in range(logp.shape[0]):
        cand = []
        for seq, score in beams:
            v, i = logp[t].topk(2)
            for vv, ii in zip(v.tolist(), i.tolist()):
                cand.append((seq + [ii], score + vv))
        cand.sort(key=lambda c: -c[1])
        beams = cand[:2]
        if beams[0][1] < -6.0:
            break
    return beams[0][0], round(beams[0][1], 4)


class TinyGru(nn.Module):
    def __init__(self, v=7, h=5):
        super().__init__()
        self.emb = nn.Embedding(v, h)
        self.wi = nn.Linear(h, 3 * h)
        self.wh = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, v)

    def cell(self, x, h):
        ri, zi, ni = self.wi(x).chunk(3, -1)
        rh, zh, nh = self.wh(h).chunk(3, -1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        return (1 - z) * n + z * h

    def forward(self, h0, max_len: int = 8):
        tok, h, toks = torch.zeros(1, dtype=torch.long), h0, []
        for _ in range(max_len):
            h = self.cell(self.emb(tok), h)
            tok = self.out(h).argmax(-1)
            if tok.item() == 0:
                break
            toks.append(tok.item())
        return toks, h


probe("greedy_gru", sizes=(1, 1))(lambda n, g: (_r(g, 1, 5) * 2,))(TinyGru)


class Recurse(nn.Module):
    def forward(self, x, depth: int = 0):
        if x.norm() < 1.0 or depth >= 6:
            return x, depth
        return self.forward(x * 0.5 + 0.05, depth + 1)


probe("recursion_tensor", sizes=(1, 3))(lambda n, g: (_r(g, n, 3) * n,))(Recurse)


@fn_probe("list_dict_returned", _one)
def list_dict_returned(x):
    pos, stats = [], {}
    for i, row in enumerate(x):
        if row.mean() > 0:
            pos.append(row)
            stats[f"r{i}"] = row.max()
    stats["n"] = len(pos)
    return pos, stats


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.hits = 0
        self.register_buffer("acc", torch.zeros(3))
        self.history: list[float] = []

    def forward(self, x):
        self.calls += 1
        if x.sum() > 0:
            self.hits += 1
            self.acc.add_(x.sum(0))
        self.history.append(round(x.max().item(), 4))
        return x * self.hits


probe("self_state_counter")(_one)(Counter)


class Ema(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        m = x.mean(0)
        if self.steps == 0:
            self.mean.copy_(m)
        else:
            self.mean.mul_(0.9).add_(m, alpha=0.1)
        self.steps += 1
        return x - self.mean


probe("buffer_ema_first_step")(_one)(Ema)


@fn_probe("seeded_random", _one)
def seeded_random(x):
    g = torch.Generator().manual_seed(int(x.abs().sum().item() * 100) % 1000)
    noise = torch.randn(x.shape, generator=g)
    if noise.mean() > 0:
        return x + noise
    return x - torch.rand(x.shape, generator=g)


@fn_probe("dropout_like_seeded", _one)
def dropout_like_seeded(x):
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(x.shape, generator=g) > 0.3
    return torch.where(keep, x / 0.7, torch.zeros_like(x)), int(keep.sum())


@fn_probe("raise_on_tensor", _one)
def raise_on_tensor(x):
    if (x > 1.5).any():
        raise ValueError(f"value too large: {x.max().item():.3f}")
    return x.exp()


@fn_probe("assert_on_tensor", _one)
def assert_on_tensor(x):
    y = x.sum(1)
    assert (y > -3).all(), "row sum too small"
    return y * 2


@fn_probe("generator_over_tensor", _one)
def generator_over_tensor(x):
    total = sum(r.abs().sum() for r in x if r[0] > 0)
    n = sum(1 for v in x[:, 1].tolist() if v > 0)
    return (total if isinstance(total, torch.Tensor) else x.new_zeros(())), n


@fn_probe("comprehension_filter", _one)
def comprehension_filter(x):
    parts = [r * i for i, r in enumerate(x) if r.max() > 0.8]
    keys = {i: float(r.sum()) > 0 for i, r in enumerate(x)}
    return (torch.cat(parts) if parts else x[:0].flatten()), keys


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        return y.relu() if y.sum() > 0 else -y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        import fxcc

        self.inner = Inner()
        self.inner_c = fxcc.compile(copy.deepcopy(self.inner), options=dict(time_vs_eager=False, check_eager=False))

    def forward(self, x):
        a = self.inner_c(x)
        if a.mean() > 0.2:
            a = self.inner_c(a)
        return a + x


probe("compiled_calls_compiled")(_one)(Outer)


@fn_probe("while_converge_newton", lambda n, g: (_r(g, n).abs() + 0.5,))
def while_converge_newton(a):
    x = a.clone()
    for it in range(50):
        nx = 0.5 * (x + a / x)
        if (nx - x).abs().max() < 1e-6:
            return nx, it
        x = nx
    return x, -1


@fn_probe("argmax_item_index", _one)
def argmax_item_index(x):
    i = x.sum(1).argmax().item()
    j = int(x[i].argmin())
    return x[i, j] + x[:i].sum(), (i, j)


@fn_probe("data_dependent_slice", _ints)
def data_dependent_slice(x):
    k = int((x[:, 0] > 0).sum())
    y = x[:k].float()
    return y.cumsum(0) if k > 1 else y * 3


@fn_probe("nested_tensor_if", _one)
def nested_tensor_if(x):
    s, m = x.sum(), x.max()
    if s > 0:
        if m > 1.5:
            return x.clamp(max=1.0)
        y = x * 2
    elif m < 0.5:
        y = x - 1
    else:
        y = x
    return y.tanh()


@fn_probe("mask_select_scatter_back", _one)
def mask_select_scatter_back(x):
    m = x > 0
    v = x[m]
    if v.numel() > 2:
        v = v.sort().values
    y = torch.zeros_like(x)
    y[m] = v
    return y


@fn_probe("item_as_shape", _ints)
def item_as_shape(x):
    k = int(x.abs().max().item()) + 1
    return torch.arange(k).float() * x.float().mean(), torch.ones(k, 2)


@fn_probe("loop_carried_list_pop", _one)
def loop_carried_list_pop(x):
    stack = list(x.unbind(0))
    out = []
    while stack:
        t = stack.pop()
        if t.sum() > 0 and len(stack) > 0:
            stack[-1] = stack[-1] + t
        else:
            out.append(t)
    return out


@fn_probe("isin_mask_count", _ints)
def isin_mask_count(x):
    seen = torch.unique(x[0])
    m = torch.isin(x, seen)
    return m.sum(1), x[m].float().mean() if m.any() else x.new_zeros(()).float()


class PrefixSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("best", torch.full((), float("-inf")))

    def forward(self, x):
        run = x.new_zeros(())
        for v in x.flatten():
            run = run + v
            if run > self.best:
                self.best.fill_(run.item())
            if run < -3:
                run = run * 0
        return run


probe("buffer_fill_running_max")(_one)(PrefixSum)


@fn_probe("inplace_input_in_branch", _one)
def inplace_input_in_branch(x):
    for i in range(x.shape[0]):
        if x[i].sum() < 0:
            x[i].mul_(-1)
        else:
            x[i].add_(1)
    return x.sum(1)


@fn_probe("return_input_or_new", _one)
def return_input_or_new(x):
    if x.mean() > 0:
        return x
    return x * 1


class LastSeen(nn.Module):
    def __init__(self):
        super().__init__()
        self.last = None
        self.best = None

    def forward(self, x):
        if self.last is not None and (x - self.last).abs().max() < 10:
            out = x + self.last
        else:
            out = x
        self.last = x.detach().clone()
        if self.best is None or x.sum() > self.best.sum():
            self.best = x
        return out


probe("tensor_attribute_store")(_one)(LastSeen)


@fn_probe("while_inplace_cond", _one)
def while_inplace_cond(x):
    y = x.clone()
    n = 0
    while (y > 0).any():
        y.sub_(0.5)
        n += 1
        if n > 10:
            break
    return y, n


@fn_probe("python_scalars_returned", _one)
def python_scalars_returned(x):
    a = x.sum().item()
    b = int(x.argmax())
    c = torch.equal(x, x.abs())
    d = bool((x > 0).all())
    return a > 0, b // 2, c, d, x.max().item() * 2, x[0].tolist()


@fn_probe("for_else_tensor", _one)
def for_else_tensor(x):
    for row in x:
        if row.min() > 0.3:
            found = row
            break
    else:
        found = x.mean(0)
    return found


@fn_probe("try_except_tensor_raise", _one)
def try_except_tensor_raise(x):
    try:
        if x.max() > 1.0:
            raise RuntimeError("big")
        y = x * 2
    except RuntimeError:
        y = x.clamp(max=1.0)
    return y


def _make_closure():
    counter = [0]

    def closure_counter(x):
        if x.sum() > 0:
            counter[0] += 1
        return x * counter[0]
    return closure_counter


class ClosureCounter(Fn):
    """A fresh closure per instance: eager's and fxcc's counters are separate."""

    def __init__(self):
        super().__init__()
        self.fn = _make_closure()


probe("closure_counter")(_one)(ClosureCounter)


@fn_probe("global_seed_rand", _one)
def global_seed_rand(x):
    torch.manual_seed(int(x.sum() > 0))
    if x.mean() > 0:
        return x + torch.rand_like(x)
    return x - torch.randn(x.shape)


@fn_probe("empty_nonzero_loop", lambda n, g: (_r(g, n, 3) - (2.0 if n == 4 else 0.0),))
def empty_nonzero_loop(x):
    idx = (x > 1.0).nonzero()
    acc = x.new_zeros(())
    for r, c in idx.tolist():
        acc = acc + x[r, c]
    return acc, idx


@fn_probe("shape_and_value_cond", lambda n, g: (_r(g, n, 3),), sizes=(2, 5))
def shape_and_value_cond(x):
    if x.shape[0] > 3 and x[0, 0] > 0:
        return x[:3].relu()
    if x.shape[0] <= 3 or x.sum() < 0:
        return x.neg()
    return x


@fn_probe("sorted_python_list", _one)
def sorted_python_list(x):
    vals = sorted(x.sum(1).tolist(), reverse=True)
    order = [i for i, _ in sorted(enumerate(x[:, 0].tolist()), key=lambda p: p[1])]
    return vals, x[order]


@fn_probe("item_loop_bound", _ints)
def item_loop_bound(x):
    y = x.float()
    for _ in range(int(x.abs().sum().item()) % 5):
        y = y.roll(1, 0) + 1
    return y


@fn_probe("walrus_chained_cmp", _one)
def walrus_chained_cmp(x):
    if 0 < (s := x.sum()) < 3:
        return x * s
    if -2 < s <= 0:
        return x - s
    return x.exp() if (m := x.max()) < 2 else x / m


@fn_probe("match_on_item", _ints)
def match_on_item(x):
    match int(x[0, 0]):
        case 0:
            return x * 0
        case 1 | 2:
            return x + 1
        case v if v < 0:
            return x * v
        case _:
            return x.flip(0)


@fn_probe("fstring_tensor_raise", _one)
def fstring_tensor_raise(x):
    s = x.sum()
    if s > 1:
        raise ValueError(f"sum {s} row {x[0]} too big")
    return x * 2, f"ok {s.item():.3f} {x.shape}"


@fn_probe("builtin_any_min_max", _one)
def builtin_any_min_max(x):
    a = any(r.sum() > 1 for r in x)
    b = max(x[0].sum(), x[1].sum())
    c = min(x[:, 0].tolist())
    return a, b, c, len(x[x > 0])


@fn_probe("one_element_truth", _one)
def one_element_truth(x):
    t = x[:1, :1] > 0
    if t:
        return x.abs()
    return x if not (x[0, 1] > 0) else x.neg()


@fn_probe("nested_def_in_forward", _one)
def nested_def_in_forward(x):
    def step(y):
        return y * 0.5 if y.abs().max() > 1 else y + 1
    for _ in range(3):
        x = step(x)
    return x


@fn_probe("mutate_list_arg", lambda n, g: ([_r(g, 3) for _ in range(n)],))
def mutate_list_arg(xs):
    out = []
    while xs:
        t = xs.pop(0)
        if t.sum() > 0:
            out.append(t * 2)
    return out


@fn_probe("dict_input", lambda n, g: ({"a": _r(g, n, 3), "b": _r(g, n, 3)},))
def dict_input(d):
    key = "a" if d["a"].sum() > d["b"].sum() else "b"
    d["picked"] = d[key]
    return d[key] * 2, key


class BufferLoopAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.zeros(3))

    def forward(self, x):
        for row in x:
            if row.sum() > 0:
                self.state.add_(row)
            if self.state.norm() > 3:
                self.state.mul_(0.5)
                return self.state
        return self.state[:2]


probe("buffer_loop_returns_view")(_one)(BufferLoopAlias)


@fn_probe("data_shape_returned", _one)
def data_shape_returned(x):
    pos = x[x > 0]
    return pos.shape, tuple(pos.shape), pos.numel(), (x > 0).sum(1).tolist()


@fn_probe("int_floordiv_mod_branch", _ints)
def int_floordiv_mod_branch(x):
    y = x // 2 if x.sum() % 2 == 0 else x % 3
    y[int(x.argmax() // 3)] += 1
    return y, y.dtype


@fn_probe("dtype_per_branch", _one)
def dtype_per_branch(x):
    if x.sum() > 0:
        return x.double() * 2
    return (x > 0).to(torch.int32)


class Threshold(nn.Module):
    def __init__(self):
        super().__init__()
        self.thresh = 0.0
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        while y.max() > self.thresh + 1:
            self.thresh += 0.5
            y = y - 0.25
        return y, self.thresh


probe("python_attr_in_tensor_cond")(_one)(Threshold)


@fn_probe("zip_break_nested_return", lambda n, g: (_r(g, n, 3), _r(g, n, 3)))
def zip_break_nested_return(x, y):
    total = x.new_zeros(3)
    with torch.no_grad():
        for a, b in zip(x, y):
            for k in range(3):
                if a[k] * b[k] > 1.5:
                    return total, k
                if a[k] < -1:
                    break
            total = total + a - b
    return total, -1


@fn_probe("optional_and_tensor", lambda n, g: (_r(g, n, 3), _r(g, n, 3) if n > 4 else None))
def optional_and_tensor(x, y=None):
    if y is not None and (y > 0).sum() > x.shape[0] * 1.5:
        return x + y
    if y is None or y.mean() < 0:
        return x
    return x * y


@fn_probe("index_python_list", _ints)
def index_python_list(x):
    table = [x[0] * 2, x[1] - 1, x.sum(0), x.max(0).values]
    i = int(x[0].abs().sum().item()) % len(table)
    table[i] = table[i] + 100
    return table[i], table


# ------------------------------------------------------------------------------------------------ running


def run(p: Probe) -> Result:
    """Each program at its first size three times, then its second twice; compiled as the function where it is
    one; exceptions, module tensors and attributes compared too (`heldout_programs.run`, strict)."""
    return check(p, sizes=(p.sizes[0],) * 3 + (p.sizes[1],) * 2, functions=Fn, strict=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated program names (default: all)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    return probe_main(
        ap, a, PROBES, lambda probe: [run(probe)],
        lambda r: f"{r.name:28} {r.outcome:16} {r.max_err:9.2g} {r.seconds:6.1f}s  "
                  f"{r.detail.splitlines()[0][:140] if r.detail else ''}",
        table, lambda r: r.outcome in GOOD)


if __name__ == "__main__":
    sys.exit(main())
