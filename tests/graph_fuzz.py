"""A graph fuzzer: random straight-line PyTorch programs, compiled with fxcc and compared with eager.

Each seed writes a module whose forward is 3-15 ops of what users write: every core-aten activation,
comparisons and `where`, casts between float32, float16, bfloat16 and integers, broadcasting binary ops,
reductions over random dims (keepdim or not; var/std with a correction, logsumexp, softmax along any dim,
argmax), norms (layer, group, batch in eval, instance, an RMS norm written by hand), linear / matmul / bmm /
einsum, 1-d and 2-d convolutions and a transposed one, pooling, views (reshape, permute, transpose, flatten,
unsqueeze, expand, strided slices, narrow, chunk/split, cat/stack, pad), index_select/gather, cumsum,
masked_fill and in-place ops on intermediates. Each op is drawn against the shapes of the values before it
and kept only when eager runs it, so every program is valid. Inputs arrive contiguous, transposed, sliced
or channels-last; every call gets new values, and where eager runs the program on a second batch size too,
that shape is called as well (fxcc's recompile with a symbolic size).

The compiled side runs with `check_eager=False` and `time_vs_eager=False`, so what is compared is fxcc's
own code, not its first-call safety net. Outcomes per seed: equal, differs (the output, its error, the op
that made it; a float32 output that differs on its own scale counts as equal where each element is as close to
the program run in float64 as eager's, as a sum that cancels to about 0; an argmax that picks another of values
equal within tolerance counts as equal too), raised (fxcc raised where eager did
not), eager (fxcc ran some or all of it eagerly, with the warning's reason). A failing program is shrunk (delta debugging on its op list) and printed as Python.

    python tests/graph_fuzz.py --seeds 0:300 --threads 1              # the default CPU pipeline (TVM + extern)
    python tests/graph_fuzz.py --seeds 0:300 --passes extern          # the extern backend only (fast)
    python tests/graph_fuzz.py --seed 17 --show                       # one program, its outcome
tests/test_graph_fuzz.py runs a fast subset.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from dycl_fuzz import parse_seeds

PIPELINES = {"default": None, "extern": "canonicalize,raise,merge-linears,fuse,codegen{backend=extern}",
             "tvm": "decompose,canonicalize,raise,merge-linears,fuse,codegen{backend=tvm}",
             "nhwc": "decompose,canonicalize,raise,merge-linears,layout{cpu=true,measure=false},fuse,codegen{backend=tvm}"}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
EAGER_OP = re.compile(r"^\s+%\S+\s+(\S+\s+eager: .*)$", re.M)
HEADER = ["import torch", "import torch.nn as nn", "import torch.nn.functional as F", "", ""]


@dataclass
class Val:
    """A value of the program: its name, an example (to draw the next ops against) and what it aliases."""

    name: str
    t: torch.Tensor
    root: str  # "input", "param" or the name of the op result whose storage it shares (in-place allowed)
    writable: bool = True  # no stride 0 (an expanded value) in it or in what it views


@dataclass
class Op:
    """One statement of forward: `out = code`, reading `reads`; `replace` says what a later op may read
    instead of `out` when this op is shrunk away (a value of the same shape and dtype), else None."""

    out: str
    code: str
    reads: list[str]
    kind: str
    replace: str | None = None


@dataclass
class Program:
    seed: int
    inputs: list[tuple[str, tuple[int, ...], str]]  # name, shape, layout
    params: dict[str, tuple[str, tuple[int, ...]]]  # name -> (kind "param"|"buffer"|"index:<hi>", shape)
    ops: list[Op]
    dyn: bool = True  # the second batch size is tried

    def outputs(self) -> list[str]:
        read = {r for op in self.ops for r in (op.reads[1:] if op.kind == "inplace" else op.reads)}
        outs = [op.out for op in self.ops if op.out not in read and op.kind != "inplace"]
        last = self.ops[-1].out if self.ops else self.inputs[0][0]
        return (outs or [last])[-3:]

    def source(self) -> str:
        lines = [*HEADER, "class Prog(nn.Module):", "    def __init__(self):", "        super().__init__()",
                 f"        g = torch.Generator().manual_seed({self.seed})"]
        for name, (kind, shape) in self.params.items():
            if kind == "param":
                lines.append(f"        self.{name} = nn.Parameter(torch.randn({shape}, generator=g) * 0.5)")
            elif kind == "buffer":
                lines.append(f"        self.register_buffer('{name}', torch.rand({shape}, generator=g) + 0.5)")
            else:
                hi = int(kind.split(":")[1])
                lines.append(f"        self.register_buffer('{name}', torch.randint(0, {hi}, {shape}, generator=g))")
        args = ", ".join(n for n, _, _ in self.inputs)
        lines += ["", f"    def forward(self, {args}):"]
        lines += [f"        {op.out} = {op.code}" if op.kind != "inplace" else f"        {op.code}" for op in self.ops]
        outs = self.outputs()
        lines.append(f"        return {outs[0]}" if len(outs) == 1 else f"        return ({', '.join(outs)},)")
        return "\n".join(lines) + "\n"

    def build(self) -> torch.nn.Module:
        scope: dict[str, Any] = {}
        exec(compile(self.source(), f"<graph_fuzz {self.seed}>", "exec"), scope)  # noqa: S102 - our own text
        return scope["Prog"]().eval()


def make_input(shape: tuple[int, ...], layout: str, g: torch.Generator) -> torch.Tensor:
    """A float32 tensor of `shape` in `layout`: contiguous, transposed (last two dims), sliced (every
    other element of a wider last dim) or channels-last (4-d)."""
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(*shape[:-1], shape[-1] * 2, generator=g)[..., ::2]
    if layout == "channels_last" and len(shape) == 4:
        return torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
    return torch.randn(*shape, generator=g)


class Gen:
    """Draws one program: each op against the example values before it, kept only when eager runs it."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.seed = seed
        self.g = torch.Generator().manual_seed(seed)
        self.vals: list[Val] = []
        self.params: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.ptensors: dict[str, torch.Tensor] = {}
        self.ops: list[Op] = []
        self.n = 0

    # --------------------------------------------------------------------------------- helpers

    def fresh(self) -> str:
        self.n += 1
        return f"v{self.n}"

    def param(self, shape: tuple[int, ...], kind: str = "param") -> str:
        name = f"{'w' if kind == 'param' else 'b' if kind == 'buffer' else 'i'}{len(self.params)}"
        self.params[name] = (kind, tuple(shape))
        if kind == "param":
            t = torch.randn(shape) * 0.5
        elif kind == "buffer":
            t = torch.rand(shape) + 0.5
        else:
            t = torch.randint(0, int(kind.split(":")[1]), shape)
        self.ptensors[name] = t
        return f"self.{name}"

    def pick(self, pred=lambda v: True) -> Val | None:
        cands = [v for v in self.vals if pred(v)]
        if not cands:
            return None
        # mostly the latest values: programs are chains more than fans
        return cands[-1] if self.r.random() < 0.5 else self.r.choice(cands)

    def dim(self, t: torch.Tensor) -> int:
        return self.r.randrange(t.dim()) - (t.dim() if self.r.random() < 0.4 else 0)

    # ----------------------------------------------------------------------------------- ops

    def op(self) -> tuple[str, str, list[Val], bool] | None:
        """One candidate op: (kind, code, values read, result may be written in place later)."""
        r = self.r
        fl = self.pick(lambda v: v.t.dtype in FLOATS and v.t.dim() >= 1)
        if fl is None:
            fl = self.pick()
        a, t = fl.name, fl.t
        kind = r.choices(["unary", "binary", "reduce", "norm", "gemm", "conv", "pool", "view", "index", "cast",
                          "inplace", "where", "misc"], [14, 10, 9, 6, 6, 4, 3, 14, 4, 3, 4, 4, 5])[0]
        d = self.dim(t) if t.dim() else 0
        if kind == "unary":
            code = r.choice([
                f"F.relu({a})", f"F.gelu({a})", f"F.gelu({a}, approximate='tanh')", f"F.silu({a})", f"F.mish({a})",
                f"F.hardswish({a})", f"F.hardsigmoid({a})", f"F.elu({a}, alpha={r.choice([1.0, 0.5])})",
                f"F.selu({a})", f"F.softplus({a}, beta={r.choice([1.0, 2.0])}, threshold={r.choice([20.0, 1.0])})",
                f"F.leaky_relu({a}, {r.choice([0.01, 0.2])})", f"torch.sigmoid({a})", f"torch.tanh({a})",
                f"torch.erf({a})", f"torch.exp({a}.clamp(-6, 6))", f"torch.log1p({a}.abs())",
                f"torch.sqrt({a}.abs() + 1e-3)", f"torch.rsqrt({a}.abs() + 0.1)", f"{a}.pow(2)", f"{a} ** 3",
                f"torch.pow({a}.abs() + 0.01, {r.choice([0.5, 1.5, -1.0])})", f"{a}.clamp({r.choice([-1.0, -0.5])}, "
                f"{r.choice([0.5, 1.0])})", f"{a}.clamp(min=0.1)", f"-{a}", f"{a}.abs()", f"{a} * {r.choice([0.5, 2.0, -3.0])}"
                f" + {r.choice([0.0, 1.0])}", f"torch.cos({a})", f"{a}.square()", f"torch.sign({a})",
                f"1.0 / ({a}.abs() + 1.0)"])
            return "unary", code, [fl], True
        if kind == "misc":
            opts = [f"{a} + torch.arange({a}.shape[-1], dtype={a}.dtype)", f"{a} * {a}.shape[-1] ** -0.5",
                    f"{a}.view({a}.size(0), -1)" if t.is_contiguous() else f"{a}.reshape({a}.size(0), -1)",
                    f"torch.triu({a})" if t.dim() >= 2 else f"{a}.cumsum(0)", f"{a}.repeat({(2,) + (1,) * (t.dim() - 1)})",
                    f"({a} * 4).to(torch.int32).cumsum({d})", f"{a}.float().mean({d}, dtype=torch.float64).float()",
                    f"{a}.new_zeros({a}.shape) + {a}.mean()", f"torch.ones_like({a}).cumsum({d}) * {a}",
                    f"{a}.topk(2, {d}).values", f"{a}.sort({d}).values", f"torch.full_like({a}, 0.5) - {a}"]
            if t.dim() == 4:
                opts.append(f"F.scaled_dot_product_attention({a}, {a}, {a}, is_causal={r.choice([True, False])})")
            if t.dim() >= 2:
                opts.append(f"{a}.masked_fill(torch.ones({a}.shape[-2], {a}.shape[-1], dtype=torch.bool).tril().logical_not(), "
                            f"float('-inf')).softmax(-1)")
            return "misc", r.choice(opts), [fl], True
        if kind == "where":
            b = self.pick(lambda v: _broadcasts(v.t, t) and v.t.dtype == t.dtype)
            other = b.name if b else r.choice(["0.0", "1.5"])
            k = r.choice(["0", "0.5", "-0.25"])
            code = r.choice([f"torch.where({a} > {k}, {a}, {other})", f"torch.where({a} <= {k}, {other}, {a} * 2)",
                             f"({a} > {k}).to({a}.dtype) * {a}", f"{a}.masked_fill({a} < {k}, {r.choice(['0.0', '-1.0'])})",
                             f"torch.where(torch.isnan({a}), torch.zeros_like({a}), {a})"])
            return "where", code, [fl] + ([b] if b else []), True
        if kind == "cast":
            if t.dtype != torch.float32:
                return "cast", r.choice([f"{a}.float()", f"{a}.to(torch.float32)"]), [fl], True
            code = r.choice([f"{a}.half()", f"{a}.to(torch.bfloat16)", f"{a}.to(torch.float16)",
                             f"({a} * 4).to(torch.int32)", f"({a} * 3).long()", f"({a} > 0).float()",
                             f"({a} * 4).round().to(torch.int64).float()"])
            return "cast", code, [fl], True
        if kind == "binary":
            b = self.pick(lambda v: _broadcasts(v.t, t) and v.name != a)
            if b is None or r.random() < 0.3:
                shape = r.choice([t.shape[-1:], (1,) * (t.dim() - 1) + tuple(t.shape[-1:]), tuple(t.shape),
                                  tuple(1 if i != d % t.dim() else s for i, s in enumerate(t.shape))])
                other, reads = self.param(tuple(shape)), [fl]
                if t.dtype != torch.float32:
                    other = f"{other}.to({a}.dtype)"
            else:
                other, reads = b.name, [fl, b]
            fmt = r.choice(["{a} + {b}", "{a} - {b}", "{a} * {b}", "{a} / ({b}.abs() + 1)", "torch.maximum({a}, {b})",
                            "torch.minimum({a}, {b})", "{b} - {a}", "{a} * torch.sigmoid({b})", "torch.add({a}, {b}, alpha=0.5)"])
            return "binary", fmt.format(a=a, b=other), reads, True
        if kind == "reduce":
            kd = r.choice([True, False])
            dims = d if r.random() < 0.7 or t.dim() < 2 else tuple(sorted(r.sample(range(t.dim()), 2)))
            code = r.choice([
                f"{a}.sum({dims}, keepdim={kd})", f"{a}.mean({dims}, keepdim={kd})", f"{a}.amax({dims}, keepdim={kd})",
                f"{a}.amin({dims}, keepdim={kd})", f"{a}.var({dims}, correction={r.choice([0, 1])}, keepdim={kd})",
                f"{a}.std({dims}, correction={r.choice([0, 1])}, keepdim={kd})",
                f"torch.logsumexp({a}, {dims}, keepdim={kd})", f"F.softmax({a}, dim={d})",
                f"F.log_softmax({a}, dim={d})", f"{a}.argmax({d}, keepdim={kd})", f"torch.cumsum({a}, {d})",
                f"{a}.max({d}, keepdim={kd}).values", f"{a}.sum()", f"{a}.norm(dim={d}, keepdim={kd})"])
            return "reduce", code, [fl], True
        if kind == "norm":
            c = t.shape[1] if t.dim() >= 2 else 0
            opts = [f"F.layer_norm({a}, {tuple(t.shape[-1:])}, {self.param(t.shape[-1:])}, {self.param(t.shape[-1:])})",
                    f"F.layer_norm({a}, {tuple(t.shape[-2:])})",
                    f"{a} * torch.rsqrt({a}.pow(2).mean(-1, keepdim=True) + 1e-6) * {self.param(t.shape[-1:])}",
                    f"({a}.float() * torch.rsqrt({a}.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to({a}.dtype)"]
            if t.dim() >= 3 and c:
                groups = r.choice([g for g in (1, 2, 4, c) if c % g == 0])
                opts += [f"F.group_norm({a}, {groups}, {self.param((c,))}, {self.param((c,))})",
                         f"F.batch_norm({a}, {self.param((c,), 'buffer')} - 1, {self.param((c,), 'buffer')}, "
                         f"{self.param((c,))}, {self.param((c,))}, False)",
                         f"F.instance_norm({a})"]
            if t.dim() == 2:
                opts.append(f"F.batch_norm({a}, {self.param((c,), 'buffer')} - 1, {self.param((c,), 'buffer')}, "
                            f"None, None, False, 0.1, 1e-5)")
            return "norm", r.choice(opts), [fl], True
        if kind == "gemm":
            n = r.choice([3, 8, 16])
            k = t.shape[-1] if t.dim() else 1
            opts = [f"F.linear({a}, {self.param((n, k))}, {self.param((n,)) if r.random() < 0.6 else None})",
                    f"{a} @ {self.param((k, n))}", f"torch.matmul({a}, {self.param((k,))})"]
            if t.dim() >= 2:
                opts.append(f"{a} @ {a}.transpose(-1, -2)")
                b = self.pick(lambda v: v.t.dim() == t.dim() and v.t.shape[:-2] == t.shape[:-2]
                              and v.t.shape[-1] == t.shape[-1] and v.t.dtype == t.dtype)
                if b is not None:
                    opts.append(f"torch.matmul({a}, {b.name}.transpose(-1, -2))")
            if t.dim() == 3:
                opts += [f"torch.bmm({a}, {self.param((t.shape[0], k, n))})",
                         f"torch.einsum('bij,jk->bik', {a}, {self.param((k, n))})",
                         f"torch.einsum('bij,bkj->bik', {a}, {a})"]
            if t.dim() == 2:
                opts.append(f"torch.einsum('ij,kj->ik', {a}, {self.param((n, k))})")
            code = r.choice(opts)
            if t.dtype != torch.float32:
                code = _cast_params(code, a)
            other = self.pick(lambda v: v.name != a and re.search(rf"\b{v.name}\b", code) is not None)
            return "gemm", code, [fl] + ([other] if other else []), True
        if kind == "conv":
            if t.dim() == 3:
                c = t.shape[1]
                groups = r.choice([g for g in (1, c) if c % g == 0])
                co = r.choice([2, 4, 6]) * groups
                ks = r.choice([1, 3])
                code = (f"F.conv1d({a}, {self.param((co, c // groups, ks))}, {self.param((co,))}, "
                        f"stride={r.choice([1, 2])}, padding={r.choice([0, 1])}, groups={groups})")
            elif t.dim() == 4:
                c = t.shape[1]
                groups = r.choice([g for g in (1, 2, c) if c % g == 0])
                co = r.choice([2, 4]) * groups
                ks = r.choice([1, 3])
                if r.random() < 0.3:
                    code = (f"F.conv_transpose2d({a}, {self.param((c, co // groups, ks, ks))}, "
                            f"{self.param((co,))}, stride={r.choice([1, 2])}, padding={r.choice([0, 1])}, "
                            f"groups={groups})")
                else:
                    code = (f"F.conv2d({a}, {self.param((co, c // groups, ks, ks))}, "
                            f"{self.param((co,)) if r.random() < 0.7 else None}, stride={r.choice([1, 2])}, "
                            f"padding={r.choice([0, 1])}, dilation={r.choice([1, 1, 2])}, groups={groups})")
            else:
                return None
            if t.dtype != torch.float32:
                code = _cast_params(code, a)
            return "conv", code, [fl], True
        if kind == "pool":
            if t.dim() == 4:
                code = r.choice([f"F.max_pool2d({a}, {r.choice([2, 3])}, stride={r.choice([1, 2])}, padding=1)",
                                 f"F.avg_pool2d({a}, 2)", f"F.avg_pool2d({a}, 3, stride=1, padding=1, count_include_pad=False)",
                                 f"F.adaptive_avg_pool2d({a}, {r.choice([1, 2, (2, 3)])})",
                                 f"F.adaptive_max_pool2d({a}, {r.choice([1, 2])})"])
            elif t.dim() == 3:
                code = r.choice([f"F.max_pool1d({a}, 2)", f"F.avg_pool1d({a}, 3, stride=2, padding=1)",
                                 f"F.adaptive_avg_pool1d({a}, {r.choice([1, 3])})"])
            else:
                return None
            return "pool", code, [fl], True
        if kind == "view":
            v = self.pick(lambda v: v.t.dim() >= 1) or fl
            a, t = v.name, v.t
            d = self.dim(t)
            s = t.shape
            opts = [f"{a}.transpose({d}, {self.dim(t)})", f"{a}.unsqueeze({r.randrange(t.dim() + 1)})",
                    f"{a}.flatten({min(d % t.dim(), t.dim() - 1)})", f"{a}[..., ::2]", f"{a}[1:]",
                    f"{a}.narrow({d}, {min(1, s[d] - 1)}, {max(1, s[d] // 2)})",
                    f"{a}.chunk(2, {d})[{r.choice([0, -1])}]", f"{a}.split({max(1, s[d] // 3)}, {d})[0]",
                    f"torch.cat([{a}, {a} * 2], {d})", f"torch.stack([{a}, {a}.neg()], {r.randrange(t.dim() + 1)})",
                    f"F.pad({a}, ({r.choice([0, 1])}, {r.choice([1, 2])}))", f"{a}.reshape({a}.shape[0], -1)",
                    f"{a}.permute({tuple(r.sample(range(t.dim()), t.dim()))})", f"{a}.contiguous()",
                    f"{a}.reshape(-1)", f"{a}.unsqueeze(0).expand(2, *{a}.shape)", f"{a}.mT" if t.dim() >= 2 else f"{a}.t()",
                    f"{a}[:, 1::2]" if t.dim() >= 2 else f"{a}[::3]", f"{a}.flip({d})", f"{a}.roll(1, {d})"]
            if t.dim() >= 2 and s[-1] % 2 == 0:
                opts.append(f"{a}.reshape(*{a}.shape[:-1], 2, {s[-1] // 2})")
            if t.dim() == 4:
                opts.append(f"F.pad({a}, (1, 1, 1, 1), mode='{r.choice(['reflect', 'replicate', 'constant'])}')")
            if t.dim() == 3:
                opts.append(f"F.pad({a}, (2, 1), mode='{r.choice(['reflect', 'replicate'])}')")
            b = self.pick(lambda u: u.t.shape == t.shape and u.name != a and u.t.dtype == t.dtype)
            if b is not None:
                opts += [f"torch.cat([{a}, {b.name}], {d})", f"torch.stack([{b.name}, {a}])"]
            code = r.choice(opts)
            reads = [v] + ([b] if b is not None and b.name in code.replace(a, "") else [])
            return "view", code, reads, True
        if kind == "index":
            if t.dim() == 0:
                return None
            dd = d % t.dim()
            n = r.choice([2, 5])
            opts = [f"{a}.index_select({d}, {self.param((n,), f'index:{t.shape[dd]}')})",
                    f"torch.gather({a}, {d}, {self.param(tuple(t.shape[:dd]) + (n,) + tuple(t.shape[dd + 1:]), f'index:{t.shape[dd]}')})",
                    f"{a}[{self.param((n,), f'index:{t.shape[0]}')}]",
                    f"{a}[:, {self.param((n,), f'index:{t.shape[1]}')}]" if t.dim() >= 2 else f"{a}[0]",
                    f"{a}[..., 0]", f"{a}.select({d}, -1)"]
            return "index", r.choice(opts), [fl], True
        if kind == "inplace":
            # not on an expanded value (stride 0): eager refuses to write one memory location twice
            v = self.pick(lambda v: v.root not in ("input", "param") and v.t.dtype in FLOATS and v.t.dim() >= 1
                          and v.writable)
            if v is None:
                return None
            a, t = v.name, v.t
            b = self.pick(lambda u: _broadcasts(u.t, t) and u.t.dtype == t.dtype and u.name != a)
            opts = [f"{a}.mul_({r.choice([0.5, 2.0])})", f"{a}.add_(1.0)", f"{a}.relu_()", f"{a}.clamp_(-1.0, 1.0)",
                    f"{a}.masked_fill_({a} > 1.0, 1.0)", f"{a}[..., 0] = 0.0", f"{a}.sigmoid_()",
                    f"{a}[:1] *= 3" if t.shape[0] else f"{a}.neg_()"]
            if b is not None:
                opts += [f"{a}.add_({b.name})", f"{a}.mul_({b.name})", f"{a} += {b.name}"]
            code = r.choice(opts)
            reads = [v] + ([b] if b is not None and b.name in code else [])
            return "inplace", code, reads, False
        return None

    def program(self) -> Program:
        r = self.r
        rank = r.choice([2, 3, 3, 4, 4])
        shape = tuple(r.choice([2, 3, 4, 5, 6, 8, 8, 12, 16, 17][: 7 if rank == 4 else 10]) for _ in range(rank))
        layouts = ["contiguous", "transposed", "sliced"] + (["channels_last"] if rank == 4 else [])
        inputs = [("x", shape, r.choice(layouts))]
        if r.random() < 0.5:  # a second input: same shape, or broadcastable against the first
            shape2 = shape if r.random() < 0.6 else tuple(1 if r.random() < 0.4 else s for s in shape)
            shape2 = (shape[0], *shape2[1:])
            inputs.append(("y", shape2, r.choice(layouts)))
        for name, shp, layout in inputs:
            self.vals.append(Val(name, make_input(shp, layout, self.g), "input"))
        target = r.randint(3, 15)
        tries = 0
        while len([o for o in self.ops]) < target and tries < 200:
            tries += 1
            cand = self.op()
            if cand is None:
                continue
            kind, code, reads, _ = cand
            env = {v.name: v.t.clone() if v.root not in ("input", "param") else v.t for v in self.vals}
            env.update(torch=torch, F=torch.nn.functional, self=_Params(self.ptensors))
            out = self.fresh()
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if kind == "inplace":
                        exec(code, env)  # noqa: S102 - generated text
                        res = None
                    else:
                        res = eval(code, env)  # noqa: S307 - generated text
            except Exception:  # noqa: BLE001 - an op invalid for these shapes: draw another
                self.n -= 1
                continue
            if res is not None and (not isinstance(res, torch.Tensor) or res.numel() == 0 or res.numel() > 16384
                                    or res.dim() > 5 or (res.is_floating_point() and not (res.isfinite().all() and res.abs().max() > 1e-6))):
                # NaN and inf are kept out (undefined integer casts and comparisons), and all-zero values: the
                # std of a constant row is 0 in eager and 1e-9 in another summation order, and sign() of it
                # differs by 1
                self.n -= 1
                continue
            names = [reads[0].name] + [v.name for v in self.vals if v.name != reads[0].name
                                       and re.search(rf"\b{v.name}\b", code)]
            if kind == "inplace":
                self.n -= 1
                # the in-place op changes its value and anything sharing that storage: keep examples in step
                for v in self.vals:
                    if v.name in env and isinstance(env[v.name], torch.Tensor) and v.root not in ("input", "param"):
                        v.t = env[v.name]
                self.ops.append(Op(names[0], code, names, "inplace"))
                continue
            base = reads[0]
            view = res.untyped_storage().data_ptr() == base.t.untyped_storage().data_ptr()
            root = base.root if view else out
            same = res.shape == base.t.shape and res.dtype == base.t.dtype
            writable = 0 not in res.stride() and (not view or all(v.writable for v in reads))
            self.vals.append(Val(out, res, root, writable))
            self.ops.append(Op(out, code, names, kind, replace=base.name if same else None))
        used = {k: v for k, v in self.params.items() if any(re.search(rf"self\.{k}\b", o.code) for o in self.ops)}
        return Program(self.seed, inputs, used, self.ops)


class _Params:
    def __init__(self, d: dict[str, torch.Tensor]):
        self.__dict__.update(d)


def _cast_params(code: str, a: str) -> str:
    """Parameters are float32: a low-precision value's op reads them cast to its dtype."""
    return re.sub(r"(self\.[wb]\d+)", rf"\1.to({a}.dtype)", code)


def _broadcasts(b: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether `b` broadcasts to `a`'s shape (the result keeps a's shape)."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape) == a.shape
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    seed: int
    kind: str  # "equal" | "differs" | "raised" | "eager" | "skipped"
    detail: str = ""
    warnings: list[str] = field(default_factory=list)
    calls: int = 0
    dynamic: bool = False  # the second batch size was called
    seconds: float = 0.0
    ops: int = 0
    eager_ops: list[str] = field(default_factory=list)  # ops of a compiled graph left to run eagerly, with why


def call_inputs(prog: Program, batch: int | None, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, shape, layout in prog.inputs:
        shp = (batch, *shape[1:]) if batch is not None else shape
        out.append(make_input(shp, layout, g))
    return out


def _eager(model: torch.nn.Module, args: list[torch.Tensor]) -> tuple[str, Any]:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", model(*args)
    except Exception as e:  # noqa: BLE001
        return "raised", f"{type(e).__name__}: {e}"


def tolerance_for(prog: Program):
    """fxcc's tolerance per output dtype; a program with a float16/bfloat16 value anywhere gets the
    low-precision one on every output: one value rounded to another neighbour after a reduction summed in
    another order is a bf16 ulp (2^-8) wherever it flows, float32 outputs included."""
    from fxcc.eager_check import tolerance

    low = any(w in prog.source() for w in ("float16", "bfloat16", ".half()"))
    return lambda dtype: tolerance(torch.bfloat16 if low and dtype.is_floating_point else dtype)


def close(got: Any, want: Any, tol) -> Any:
    """fxcc's comparison (error relative to each output's scale), with an absolute floor: an output that
    cancels to ~0 (the mean of a normalized row) has a scale of rounding noise, so errors below 1e-5
    of 1 (float32; 1e-2 in low precision) pass."""
    from fxcc.outputs import compare, tensor_leaves

    c = compare(got, want, tol=tol)
    if c.equal or c.detail:
        return c
    for (_, a), (_, b) in zip(tensor_leaves(got), tensor_leaves(want)):
        if compare(a, b, tol=tol).equal:
            continue
        floor = 1e-5 if tol(b.dtype) <= 1e-3 else 1e-2
        if not b.dtype.is_floating_point or not torch.equal(a.isnan(), b.isnan()) or \
                (a.double() - b.double()).abs().nan_to_num(0).max().item() > floor:
            return c
    c.equal = True
    return c


def _within_eagers_own_error(model: torch.nn.Module, args: list[torch.Tensor], got: Any, want: Any,
                             prog: Program) -> bool:
    """Whether fxcc's float32 outputs are as close to the program run in float64 as eager's are (each element's
    error at most twice eager's, or 1e-6 of the output's scale): an output that cancels (the sum of a normalized
    tensor) keeps rounding noise of its terms' size, which no tolerance on the output's own scale can tell from an
    error. Only programs computed in float32 throughout (no casts, float inputs and outputs)."""
    from fxcc.outputs import tensor_leaves

    if any(w in prog.source() for w in ("float16", "bfloat16", ".half()", ".to(", "int")) or \
            not all(t.dtype == torch.float32 for t in args):
        return False
    ref = _eager(copy.deepcopy(model).double(), [t.double() for t in args])
    if ref[0] != "ok":
        return False
    for (_, a), (_, b), (_, r) in zip(tensor_leaves(got), tensor_leaves(want), tensor_leaves(ref[1])):
        if a.dtype != torch.float32 or b.dtype != torch.float32 or r.dtype != torch.float64 or \
                not torch.equal(a.isnan(), b.isnan()):
            return False
        mine, theirs = (a.double() - r).abs().nan_to_num(0), (b.double() - r).abs().nan_to_num(0)
        scale = r.abs().nan_to_num(0, 0, 0).max().item() if r.numel() else 0.0
        if bool((mine > torch.clamp(2 * theirs, min=1e-6 * scale)).any()):
            return False
    return True


ARGMAX = re.compile(r"(\w+)\.argmax\((-?\d+), keepdim=(True|False)\)")


def _argmax_ties(prog: Program, args: list[torch.Tensor], got: Any, want: Any, tol) -> bool:
    """Whether every output that differs is an argmax whose picks differ only between values that are equal
    within fxcc's tolerance (eager's own picks among them are its rounding: `softmax(...).mean(...)` is 0.5 up to
    an ulp in every row, seed 9347): judged on eager's values of the argmax's input, got from the program cut
    just after that input."""
    from fxcc.outputs import compare, tensor_leaves

    names = prog.outputs()
    for i, ((_, a), (_, b)) in enumerate(zip(tensor_leaves(got), tensor_leaves(want))):
        if compare(a, b, tol=tol).equal:
            continue
        op = next((o for o in prog.ops if i < len(names) and o.out == names[i] and o.kind != "inplace"), None)
        m = ARGMAX.fullmatch(op.code) if op is not None else None
        if m is None or a.shape != b.shape or a.dtype != b.dtype:
            return False
        cut = Program(prog.seed, prog.inputs, prog.params,
                      [*prog.ops[:prog.ops.index(op)], Op("_argmax_input", f"{m[1]} * 1", [m[1]], "pointwise")])
        kind, t = _eager(cut.build(), [x.clone() for x in args])
        t = t[-1] if isinstance(t, tuple) else t
        if kind != "ok" or not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.isnan().any():
            return False
        d = int(m[2])
        ia, ib = (a, b) if m[3] == "True" else (a.unsqueeze(d), b.unsqueeze(d))
        gap = (t.gather(d, ia).double() - t.gather(d, ib).double()).abs().max().item()
        if gap > tol(t.dtype) * t.abs().max().item():
            return False
    return True


def _batches(prog: Program, model: torch.nn.Module) -> list[int | None]:
    """The call shapes: the example's batch size, then another where eager runs the program with it."""
    b0 = prog.inputs[0][1][0]
    other = b0 + 3 if b0 <= 3 else b0 - 1
    if not prog.dyn or _eager(model, call_inputs(prog, other, 0))[0] != "ok":
        return [None]
    return [None, other]


def run_program(prog: Program, passes: str | None, calls: int = 3) -> Outcome:
    """Eager and fxcc on the same inputs, call by call; the first difference is the outcome."""
    import fxcc

    t0 = time.perf_counter()
    out = Outcome(prog.seed, "equal", ops=len(prog.ops))
    try:
        eager = prog.build()
    except Exception:  # noqa: BLE001
        return Outcome(prog.seed, "skipped", traceback.format_exc(limit=3))
    mine = copy.deepcopy(eager)
    batches = _batches(prog, eager)
    tol = tolerance_for(prog)
    out.dynamic = len(batches) > 1
    opts = fxcc.CompileOptions(time_vs_eager=False, check_eager=False, graph_cache=False,
                               **({"passes": passes} if passes else {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fxcc.compile(mine, passes=passes, options=opts)
        for batch in batches:
            for i in range(calls if batch is None else 2):
                args_e = call_inputs(prog, batch, 1000 * (batch or 0) + i)
                args = call_inputs(prog, batch, 1000 * (batch or 0) + i)  # the same values, the same layout
                kw, want = _eager(eager, args_e)
                if kw != "ok":
                    out.kind, out.detail = "skipped", f"eager raised: {want}"
                    return out
                try:
                    with torch.no_grad():
                        got = compiled(*args)
                except Exception as e:  # noqa: BLE001 - fxcc raising where eager did not is an outcome
                    out.kind = "raised"
                    out.detail = f"call {out.calls + 1}: {type(e).__name__}: {str(e).splitlines()[0][:300]}\n" + \
                        traceback.format_exc(limit=-6)
                    break
                out.calls += 1
                c = close(got, want, tol)
                if not c.equal and not c.detail:
                    c.equal = _within_eagers_own_error(eager, args_e, got, want, prog) or \
                        _argmax_ties(prog, call_inputs(prog, batch, 1000 * (batch or 0) + i), got, want, tol)
                if c.equal:
                    c = close(args, args_e, tol)
                    if not c.equal:
                        c.worst = "the inputs after the call: " + c.worst
                if not c.equal:
                    outs = prog.outputs()
                    idx = _index(c.worst)
                    which = outs[idx] if idx is not None and idx < len(outs) else outs[-1]
                    op = next((o for o in prog.ops if o.out == which and o.kind != "inplace"), None)
                    out.kind = "differs"
                    out.detail = (f"call {out.calls} (batch {batch or prog.inputs[0][1][0]}): {c.worst} "
                                  f"{c.detail or f'max rel error {c.max_rel:.3g}'}; made by "
                                  f"`{which} = {op.code if op else which}`")
                    break
            if out.kind != "equal":
                break
    out.warnings = list(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught
                                      if str(w.message).startswith("fxcc")))
    try:
        out.eager_ops = [m.group(1) for m in EAGER_OP.finditer(compiled.explain())]
    except Exception:  # noqa: BLE001 - explain is for the report only
        pass
    stats = getattr(compiled, "stats", None)
    if out.kind == "equal" and ((stats is not None and stats.eager_calls) or _eager_warning(out.warnings)):
        out.kind = "eager"
        out.detail = "; ".join(out.warnings)[:400] or "eager calls without a warning"
    out.seconds = time.perf_counter() - t0
    return out


def _eager_warning(ws: list[str]) -> bool:
    return any("eager" in w for w in ws)


def _index(path: str) -> int | None:
    if path.startswith("out[") and "]" in path:
        try:
            return int(path[4:path.index("]")])
        except ValueError:
            return None
    return 0 if path == "out" else None


def run_one(seed: int, passes: str | None = None, shrink: bool = True) -> tuple[Outcome, Program, Program | None]:
    prog = Gen(seed).program()
    out = run_program(prog, passes)
    small = None
    if shrink and out.kind in ("differs", "raised"):
        small = shrink_program(prog, lambda p: run_program(p, passes).kind == out.kind)
    return out, prog, small


# ---------------------------------------------------------------------------------------------- shrinking


def without(prog: Program, drop: set[int]) -> Program | None:
    """`prog` with the ops at `drop` removed: later reads of a dropped value read what it replaced (same shape
    and dtype), or the program is invalid (None)."""
    subst: dict[str, str] = {}
    ops = []
    for i, op in enumerate(prog.ops):
        if i in drop:
            if op.kind != "inplace":
                if op.replace is None:
                    subst[op.out] = "\0"  # unreadable
                else:
                    subst[op.out] = subst.get(op.replace, op.replace)
            continue
        reads = [subst.get(r, r) for r in op.reads]
        if "\0" in reads:
            return None
        code = op.code
        for old, new in subst.items():
            code = _rename(code, old, new)
        out = subst.get(op.out, op.out) if op.kind == "inplace" else op.out
        ops.append(Op(out, code, reads, op.kind, op.replace and subst.get(op.replace, op.replace)))
    if not ops:
        return None
    used = {r for op in ops for r in op.reads} | {op.out for op in ops}
    params = {k: v for k, v in prog.params.items() if any(re.search(rf"self\.{k}\b", op.code) for op in ops)}
    inputs = [i for i in prog.inputs if i[0] in used or i is prog.inputs[0]]
    return Program(prog.seed, inputs, params, ops, prog.dyn)


def _rename(code: str, old: str, new: str) -> str:
    return re.sub(rf"\b{old}\b", new, code)


def shrink_program(prog: Program, fails, budget: int = 60) -> Program:
    """Delta debugging over the op list: the smallest program found (within `budget` runs) that still fails."""
    n_runs = 0

    def test(p: Program | None) -> bool:
        nonlocal n_runs
        if p is None or n_runs >= budget:
            return False
        n_runs += 1
        try:
            return fails(p)
        except Exception:  # noqa: BLE001
            return False

    cur = prog
    chunk = max(1, len(cur.ops) // 2)
    while chunk >= 1 and n_runs < budget:
        progressed = False
        i = 0
        while i < len(cur.ops) and n_runs < budget:
            cand = without(cur, set(range(i, min(i + chunk, len(cur.ops)))))
            if test(cand):
                cur, progressed = cand, True
            else:
                i += chunk
        if not progressed:
            chunk //= 2
    # the dynamic shape too, when the failure shows without it
    if cur.dyn and test(Program(cur.seed, cur.inputs, cur.params, cur.ops, dyn=False)):
        cur = Program(cur.seed, cur.inputs, cur.params, cur.ops, dyn=False)
    return cur


def show_program(prog: Program) -> str:
    ins = ", ".join(f"{n}: {list(s)} {lay}" for n, s, lay in prog.inputs)
    return f"# inputs {ins}{'' if prog.dyn else ' (one batch size)'}\n{prog.source()}"


# ---------------------------------------------------------------------------------------------- CLI


def summary(outcomes: list[Outcome]) -> str:
    counts = Counter(o.kind for o in outcomes)
    dyn = sum(o.dynamic for o in outcomes)
    order = ["equal", "differs", "raised", "eager", "skipped"]
    head = f"{len(outcomes)} programs: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order)
    reasons = Counter(re.sub(r"\s+", " ", e) for o in outcomes for e in o.eager_ops)
    text = head + f"; {dyn} also called with a second batch size; {sum(o.calls for o in outcomes)} calls; " \
        f"{sum(bool(o.eager_ops) for o in outcomes)} compiled with ops left eager inside the graph"
    return text + "".join(f"\n  {n:4d} x {r}" for r, n in reasons.most_common(12))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0:100", help="a range START:STOP or one seed")
    p.add_argument("--seed", type=int, help="one seed")
    p.add_argument("--show", action="store_true", help="print each program")
    p.add_argument("--passes", default="default", help="'default' (TVM + extern), 'extern', 'tvm' (TVM wherever it builds), 'nhwc' (tvm, convolution graphs kept channels-last) or a pipeline")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-shrink", action="store_true")
    p.add_argument("--log", help="append one line per program to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = range(args.seed, args.seed + 1) if args.seed is not None else parse_seeds(args.seeds)
    passes = PIPELINES.get(args.passes, args.passes)
    os.environ.setdefault("FXCC_CACHE_DIR", tempfile.mkdtemp(prefix="fxcc-graph-fuzz-"))
    outcomes = []
    for seed in seeds:
        o, prog, small = run_one(seed, passes, shrink=not args.no_shrink)
        outcomes.append(o)
        line = f"seed {seed}: {o.kind} ({o.ops} ops, {o.calls} calls{', dynamic' if o.dynamic else ''}, " \
               f"{o.seconds:.1f}s) {o.detail.splitlines()[0] if o.detail else ''}"
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")
        if args.show:
            print(show_program(prog))
        if o.kind in ("raised", "differs"):
            if o.kind == "raised" and args.show:
                print(o.detail)
            if small is not None:
                print(f"--- seed {seed} shrunk to {len(small.ops)} ops:\n{show_program(small)}", flush=True)
    print(summary(outcomes))
    return 0 if all(o.kind in ("equal", "eager", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
