"""Calls a compiled module the way users do, call after call, and compares every call with eager.

Each scenario is a short script of calls on one small module (an MLP, a convolution block, attention, norms,
a DyCL loop, functions of two tensors, a module that writes its input) run twice from the same random inputs:
once on an eager copy, once through `fxcc.compile`. Between calls the inputs change as they do in user code:
new values in the same shape, the same tensor passed twice or a view of another argument, transposed, sliced
and broadcast (stride 0) inputs, channels-last images, a call's output fed back as the next input, outputs
held across calls or dropped, inputs written in place by the caller between calls, inputs that require
gradients (under `no_grad` and not), other dtypes and batch sizes. Every call's outputs (values, dtype,
shape), the inputs after the call, which inputs and other outputs each output shares memory with, and at the
end the outputs the scenario held, must equal eager's, and so must every output's strides (those of its dimensions
of size above 1, the ones eager's layout fixes): code that calls `.view` on an output relies on them.

Variants are never replaced by eager for being slower (`time_vs_eager=False`) and DyCL segments are always
compiled, so the compiled path is what is compared.

    python tests/call_probe.py [--only mlp,conv] [--scenario feedback] [--passes default|extern] [--always]

tests/test_call_probe.py runs the fast subset (extern backend) in CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

EXTERN = "canonicalize,raise,merge-linears,fuse,codegen{backend=extern}"
D = 16


# ------------------------------------------------------------------------------------------------ modules


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x)))) + x


class Attention(nn.Module):
    def __init__(self, heads: int = 4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.h, D // self.h).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, t, D)) + x


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.w = nn.Parameter(torch.rand(D) + 0.5)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        h = self.ln(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return self.fc(h) + x


class Loop(nn.Module):
    """DyCL: a data-dependent trip count."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        h, i = x, 0
        while h.abs().mean().item() > 0.05 and i < 6:
            h = torch.tanh(self.fc(h)) * 0.5
            i += 1
        return h + x


class WritesInput(nn.Module):
    """Updates its argument in place, as a running accumulator does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        x.mul_(0.5).add_(1.0)
        return self.fc(x)


class Returns(nn.Module):
    """Returns views of its input and a tensor computed from it (outputs that alias inputs)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x, x.transpose(-1, -2), self.fc(x)


class Constants(nn.Module):
    """Returns values that depend on parameters only (folded into constants) next to one that depends on x."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))
        self.register_buffer("table", torch.arange(D, dtype=torch.float32))

    def forward(self, x):
        return x * self.w, self.w * 2 + 1, self.table.flip(0), self.w


class Embed(nn.Module):
    """Integer inputs: token ids and a boolean mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, D)
        self.fc = nn.Linear(D, D)

    def forward(self, ids):
        h = self.fc(self.emb(ids % 32))
        return h.masked_fill((ids > 16).unsqueeze(-1), 0.0), ids.sum(-1)


def scaled(x, s):
    return F.silu(x) * s + s


def two_inputs(a, b):
    return F.gelu(a) * b + a.sum(-1, keepdim=True) - b.mean()


def matmul_add(a, b):
    return a @ b + a


MODULES: dict[str, Callable[[], Any]] = {
    "mlp": MLP, "conv": ConvBlock, "attention": Attention, "norms": Norms, "loop": Loop,
    "writes_input": WritesInput, "returns_views": Returns,
    "two_inputs": lambda: two_inputs, "matmul_add": lambda: matmul_add, "constants": Constants, "embed": Embed,
    "scaled": lambda: scaled,
}
# the shape one input of each takes, for a batch size
SHAPE: dict[str, Callable[[int], tuple]] = {
    "mlp": lambda b: (b, D), "conv": lambda b: (b, 4, 8, 8), "attention": lambda b: (b, 6, D),
    "norms": lambda b: (b, 5, D), "loop": lambda b: (b, D), "writes_input": lambda b: (b, D),
    "returns_views": lambda b: (b, D), "two_inputs": lambda b: (b, D), "matmul_add": lambda b: (b, b),
    "constants": lambda b: (b, D), "embed": lambda b: (b, 5), "scaled": lambda b: (b, D),
}
TWO_INPUTS = ("two_inputs", "matmul_add")


# ------------------------------------------------------------------------------------------------ scenarios


class Calls:
    """One engine's run of a scenario: `__call__` calls the module and records its outputs and the inputs
    after the call (clones); `hold` keeps outputs whose values are compared at the end."""

    def __init__(self, fn: Any, seed: int):
        self.fn = fn
        self.gen = torch.Generator().manual_seed(seed)
        self.log: list[tuple[str, Any]] = []
        self.held: list[Any] = []
        self.ints = False  # inputs are token ids

    def t(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        if self.ints:
            return torch.randint(0, 40, shape, generator=self.gen)
        return (torch.randn(*shape, generator=self.gen) * scale).to(dtype)

    def __call__(self, *args: Any) -> Any:
        try:
            out = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - eager and compiled must raise alike
            self.log.append(("raised", type(e).__name__))  # fxcc words some messages its own way
            return None
        self.log.append(("out", _clone(out)))
        self.log.append(("inputs after", _clone(args)))
        self.log.append(("aliasing", _aliasing(out, args)))
        self.log.append(("strides", _strides(out)))
        return out

    def hold(self, *outs: Any) -> None:
        self.held.extend(outs)


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone(memory_format=torch.preserve_format)
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    return x


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    return []


def _aliasing(out: Any, args: tuple) -> list[tuple]:
    """For each output leaf: which input it is, or shares memory with, or which earlier output (a view of the
    caller's tensor in eager must be one in fxcc: writes through it reach the input)."""
    ins = _leaves(args)
    outs = _leaves(out)
    rows = []
    for j, o in enumerate(outs):
        same = next((i for i, a in enumerate(ins) if o is a), None)
        shares = next((i for i, a in enumerate(ins) if o.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
                       and o.numel() and a.numel()), None)
        other = next((k for k, p in enumerate(outs[:j]) if o.untyped_storage().data_ptr()
                      == p.untyped_storage().data_ptr() and o.numel() and p.numel()), None)
        rows.append((("is input", same), ("shares memory with input", shares), ("shares memory with output", other)))
    return rows


def _strides(out: Any) -> list[tuple]:
    """Each output's strides where eager's layout fixes them: dimensions of size 1 have no stride that matters."""
    return [tuple(s if n > 1 else None for n, s in zip(o.shape, o.stride())) if o.numel() > 1 else ()
            for o in _leaves(out)]


def new_values(c: Calls, m: str) -> None:
    for _ in range(3):
        c(*[c.t(*SHAPE[m](4)) for _ in range(_arity(m))])


def hold_outputs(c: Calls, m: str) -> None:
    """Outputs held across later calls keep their values (no buffer of a later call is handed out twice)."""
    for _ in range(3):
        c.hold(c(*[c.t(*SHAPE[m](4)) for _ in range(_arity(m))]))


def drop_outputs(c: Calls, m: str) -> None:
    """Outputs dropped at once, then one held: memory a dropped output leaves is reused."""
    for _ in range(3):
        c(*[c.t(*SHAPE[m](4)) for _ in range(_arity(m))])
    y = c(*[c.t(*SHAPE[m](4)) for _ in range(_arity(m))])
    c(*[c.t(*SHAPE[m](4)) for _ in range(_arity(m))])
    c.hold(y)


def feedback(c: Calls, m: str) -> None:
    """Each call's output is the next call's input, as a loop over steps does."""
    args = [c.t(*SHAPE[m](4)) for _ in range(_arity(m))]
    for _ in range(4):
        y = c(*args)
        if isinstance(y, tuple):
            y = y[-1]
        if y is None or y.shape != args[0].shape:
            return
        c.hold(y)
        args = [y, *args[1:]]


def strided(c: Calls, m: str) -> None:
    """The same shape laid out otherwise: transposed, a slice with steps, a broadcast (stride 0) row."""
    shape = SHAPE[m](4)
    base = c.t(*shape)
    c(*[base] * _arity(m))
    t = c.t(*reversed(shape)).permute(*reversed(range(len(shape))))  # same shape, reversed strides
    c(*[t] * _arity(m))
    wide = c.t(*shape[:-1], 2 * shape[-1])[..., ::2]
    c(*[wide] * _arity(m))
    row = c.t(1, *shape[1:]).expand(*shape)
    c(*[row.clone() if m == "writes_input" else row] * _arity(m))  # an expanded tensor cannot be written
    off = c.t(shape[0] + 1, *shape[1:])[1:]  # storage offset
    c(*[off] * _arity(m))
    if len(shape) == 4:
        c(c.t(*shape).contiguous(memory_format=torch.channels_last))
    c(*[c.t(*shape) for _ in range(_arity(m))])


def aliasing(c: Calls, m: str) -> None:
    """Two arguments that are one tensor, or one a view of the other."""
    if _arity(m) < 2:
        return
    shape = SHAPE[m](4)
    x = c.t(*shape)
    c(x, c.t(*shape))
    c(x, x)
    y = c.t(*shape)
    c(y, y.transpose(0, 1) if shape[0] == shape[1] else y[:, :])
    big = c.t(2 * shape[0], *shape[1:])
    c(big[: shape[0]], big[shape[0]:])
    c(x, c.t(*shape))


def caller_writes(c: Calls, m: str) -> None:
    """The caller updates an input in place between calls (same tensor object, new values)."""
    args = [c.t(*SHAPE[m](4)) for _ in range(_arity(m))]
    c(*args)
    with torch.no_grad():
        args[0].mul_(-2.0).add_(0.25)
    c(*args)
    args[0].copy_(c.t(*SHAPE[m](4)))
    c(*args)
    args[0].zero_()
    c(*args)


def grads(c: Calls, m: str) -> None:
    """Inputs that require gradients, under no_grad and not (values compared; compiled outputs carry no graph)."""
    x = c.t(*SHAPE[m](4)).requires_grad_()
    extra = [c.t(*SHAPE[m](4)) for _ in range(_arity(m) - 1)]
    if m == "writes_input":
        x = x.detach().clone()  # a leaf that requires grad cannot be written in place
    with torch.no_grad():
        c(x, *extra)
        c(x, *extra)
    c(x.detach(), *extra)
    with torch.inference_mode():
        c(c.t(*SHAPE[m](4)), *[c.t(*SHAPE[m](4)) for _ in extra])


def dtypes(c: Calls, m: str) -> None:
    """Other floating dtypes, then float32 again."""
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32):
        if m not in TWO_INPUTS:
            c.fn_to(dt) if hasattr(c, "fn_to") else None
        c(*[c.t(*SHAPE[m](4), dtype=dt) for _ in range(_arity(m))])


def batches(c: Calls, m: str) -> None:
    """Batch sizes that change: a symbolic variant, size 1 (broadcast), size 0, and back."""
    for b in (4, 7, 1, 4, 3, 1, 0, 9):
        c(*[c.t(*SHAPE[m](b)) for _ in range(_arity(m))])


def write_outputs(c: Calls, m: str) -> None:
    """The caller writes into the outputs it got (as `out.add_(...)` or an optimizer step would), then calls again:
    nothing the compiled code keeps (a constant, a buffer it hands out again) may change."""
    for _ in range(3):
        y = c(*[c.t(*SHAPE[m](4)) for _ in range(_arity(m))])
        with torch.no_grad():
            for t in _leaves(y):
                if t.dtype.is_floating_point and not (t.is_leaf and t.requires_grad):
                    t.mul_(3.0).add_(1.0)


def scalars(c: Calls, m: str) -> None:
    """A Python number argument that changes between calls (a function of a tensor and a float)."""
    fn = c.fn
    c.fn = (lambda x, s=None: fn(x, x)) if m in TWO_INPUTS else fn
    for s in (0.5, 2.0, 0.5, -1.0):
        if m == "scaled":
            c(c.t(4, D), s)
        else:
            c(c.t(*SHAPE[m](4)))
    c.fn = fn


def interop(c: Calls, m: str) -> None:
    """The caller keeps an output only as its storage, a NumPy array or a DLPack import, drops the tensor, and
    calls again: that memory is still the caller's."""
    shape = SHAPE[m](4)
    kept = []
    for how in ("storage", "numpy", "dlpack"):
        y = c(*[c.t(*shape) for _ in range(_arity(m))])
        y = y[-1] if isinstance(y, tuple) else y
        if y is None:
            return
        y = y.detach()
        meta = (y.shape, y.stride(), y.storage_offset(), y.dtype)
        kept.append((how, meta, y.untyped_storage() if how == "storage" else y.numpy() if how == "numpy"
                     else torch.from_dlpack(y)))
        del y
    for _ in range(2):
        c(*[c.t(*shape) for _ in range(_arity(m))])
    for how, (size, stride, offset, dtype), obj in kept:
        if how == "storage":
            c.hold(torch.empty(0, dtype=dtype).set_(obj, offset, size, stride))
        else:
            c.hold(torch.as_tensor(obj))


def symbolic_strided(c: Calls, m: str) -> None:
    """A batch size that changes (a symbolic variant), then inputs of a new batch laid out otherwise."""
    for b in (4, 7):
        c(*[c.t(*SHAPE[m](b)) for _ in range(_arity(m))])
    shape = SHAPE[m](5)
    t = c.t(*reversed(shape)).permute(*reversed(range(len(shape))))
    c(*[t] * _arity(m))
    c(*[c.t(*shape[:-1], 2 * shape[-1])[..., 1::2] for _ in range(_arity(m))])
    c(*[c.t(1, *shape[1:]).expand(*shape).clone() for _ in range(_arity(m))])


def _arity(m: str) -> int:
    return 2 if m in TWO_INPUTS else 1


SCENARIOS: dict[str, Callable[[Calls, str], None]] = {
    "new_values": new_values, "hold_outputs": hold_outputs, "drop_outputs": drop_outputs, "feedback": feedback,
    "strided": strided, "aliasing": aliasing, "caller_writes": caller_writes, "grads": grads, "dtypes": dtypes,
    "batches": batches, "write_outputs": write_outputs, "scalars": scalars,
    "interop": interop, "symbolic_strided": symbolic_strided,
}


# ------------------------------------------------------------------------------------------------ running


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 2e-2)


def diff(got: Any, want: Any, path: str = "") -> str | None:
    """Where `got` differs from `want` (values within tolerance of the leaf's scale, dtypes, shapes), or None."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: {type(got).__name__} vs a tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{path}: {got.dtype}{list(got.shape)} vs eager's {want.dtype}{list(want.shape)}"
        if not want.dtype.is_floating_point:
            return None if torch.equal(got, want) else f"{path}: integer values differ"
        if want.numel() == 0:
            return None
        g, w = got.double(), want.double()
        if not torch.equal(torch.isnan(g), torch.isnan(w)):
            return f"{path}: NaNs in other places"
        err = (g - w).abs().nan_to_num(0).max().item()
        scale = max(w.abs().nan_to_num(0).max().item(), 1e-6)
        if err > _tol(want.dtype) * scale:
            return f"{path}: differs by {err / scale:.3g} of its scale ({err:.3g})"
        return None
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{path}: structure differs"
        for i, (a, b) in enumerate(zip(got, want)):
            d = diff(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if got == want else f"{path}: {got!r} vs eager's {want!r}"


@dataclass
class Outcome:
    module: str
    scenario: str
    calls: int = 0
    problem: str = ""  # the first difference from eager (values, aliasing, strides), or a crash of the compiled side
    warnings: list[str] = field(default_factory=list)  # fxcc's warnings (a "differs" one is the always-check's)
    eager_calls: int = 0  # calls fxcc ran eagerly
    seconds: float = 0.0


def run_one(m: str, scenario: str, passes: str | None, check_eager: bool | str = True, seed: int = 0) -> Outcome:
    """Scenario `scenario` on module `m`: eager and fxcc from the same inputs, every call compared."""
    import fxcc
    from fxcc import dycl

    out = Outcome(m, scenario)
    if (m == "scaled") != (scenario == "scalars") or (m == "embed" and scenario in ("caller_writes", "grads", "dtypes")):
        return out  # scenarios that do not apply: no calls
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = MODULES[m]()
    if isinstance(base, nn.Module):
        base.eval()
    eager_fn = copy.deepcopy(base) if isinstance(base, nn.Module) else base
    mine = copy.deepcopy(base) if isinstance(base, nn.Module) else base
    opts = fxcc.CompileOptions(time_vs_eager=False, graph_cache=False, check_eager=check_eager,
                               **({"passes": passes} if passes else {}))
    compiled = fxcc.compile(mine, passes=passes, options=opts)
    saved = (dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US)
    dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US = False, 0.0  # every DyCL segment compiled
    e, c = Calls(eager_fn, seed), Calls(compiled, seed)
    e.ints = c.ints = m == "embed"
    if isinstance(base, nn.Module):
        e.fn_to = lambda dt: eager_fn.to(dt)
        c.fn_to = lambda dt: mine.to(dt)
    try:
        SCENARIOS[scenario](e, m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SCENARIOS[scenario](c, m)
        out.warnings = list(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught
                                          if "fxcc" in str(w.message)))
    except Exception:  # noqa: BLE001 - a crash of the probe or of fxcc outside a call is an outcome
        out.problem = "crashed: " + traceback.format_exc(limit=6)
    finally:
        dycl.MEASURE_CHOICE, dycl.SMALL_SEGMENT_US = saved
    out.calls = sum(k in ("out", "raised") for k, _ in e.log)
    if not out.problem:
        for i, ((kw, want), (kg, got)) in enumerate(zip(e.log, c.log)):
            call = i // 4 + 1 if kw != "raised" else "?"
            if kw != kg:
                out.problem = f"call {call}: eager {kw} {want if kw == 'raised' else ''}, fxcc {kg} " \
                              f"{got if kg == 'raised' else ''}"
                break
            if kw == "strides":
                if got != want:
                    out.problem = f"call {call}: output strides {got} vs eager's {want}"
                    break
                continue
            if kw == "aliasing":
                if got != want:
                    out.problem = f"call {call}: outputs alias inputs otherwise: eager {want}, fxcc {got}"
                    break
                continue
            d = diff(got, want, "out" if kw == "out" else "inputs after the call")
            if d:
                out.problem = f"call {call}: {d}"
                break
        else:
            if len(e.log) != len(c.log):
                out.problem = f"{len(c.log)} records vs eager's {len(e.log)}"
            elif d := diff(_clone(c.held), _clone(e.held), "held outputs at the end"):
                out.problem = d
    stats = getattr(compiled, "stats", None)
    out.eager_calls = stats.eager_calls if stats is not None else 0
    out.seconds = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="modules, comma-separated (default all): " + ",".join(MODULES))
    p.add_argument("--scenario", help="scenarios, comma-separated (default all): " + ",".join(SCENARIOS))
    p.add_argument("--passes", default="extern", help="'extern' (default), 'default' or a pipeline")
    p.add_argument("--always", action="store_true", help="check_eager='always' (every call checked by fxcc too)")
    args = p.parse_args(argv)
    passes = {"extern": EXTERN, "default": None}.get(args.passes, args.passes)
    mods = args.only.split(",") if args.only else list(MODULES)
    scens = args.scenario.split(",") if args.scenario else list(SCENARIOS)
    outcomes = []
    for m in mods:
        for s in scens:
            o = run_one(m, s, passes, "always" if args.always else True)
            outcomes.append(o)
            flag = "ok" if not o.problem else "DIFFERS" if not o.problem.startswith("crashed") else "CRASH"
            print(f"{m:14s} {s:16s} {flag:8s} {o.calls:3d} calls {o.eager_calls:3d} eager {o.seconds:6.1f}s  "
                  f"{o.problem.splitlines()[0] if o.problem else ''}", flush=True)
            for w in o.warnings:
                print(f"    warning: {w}")
            if o.problem.startswith("crashed"):
                print("    " + o.problem.replace("\n", "\n    "))
    bad = [o for o in outcomes if o.problem]
    calls = sum(o.calls for o in outcomes)
    print(f"{len(outcomes)} scenarios, {calls} calls: {len(outcomes) - len(bad)} equal to eager, {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
