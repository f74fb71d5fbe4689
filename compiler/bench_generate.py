"""`fxcc bench generate`: greedy generation with a KV cache, eager vs torch.compile vs fxcc in one process.

Each engine runs the model's own `generate` with its forward replaced (torch.compile as gpt-fast uses it:
a static cache, mode "reduce-overhead" on the GPU for the decode steps, the prefill eager as transformers runs
it; also the default mode, every call compiled; each torch.compile engine on its own copy of the model). Per engine: time to first
token, decode tokens/s, compiles per generate (the first, and a later one with a new prompt length), the
first generate's wall time (compiles included), and whether the tokens equal eager's: where a row's ids part from
eager's, one eager forward over the ids both share tells a near-tie in the logits (another summation order flips
the argmax, as any compiler may) from a token eager ranks well below its top (a wrong kernel; see `Divergence`).
On the GPU also the
decode step's share of the memory roofline: (weight bytes + KV bytes read per step) / measured copy
bandwidth, over the measured step time. Engines run interleaved, round by round (BENCHMARKING.md).

TTFT against the prefill compiled alone: for each fxcc engine, the inputs of its generate's first forward call
(the prompt and the fresh DynamicCache or StaticCache generate made) are recorded once and compiled by a
separate `fxcc.compile(forward, dynamic=False)` (static shapes, its own compiled object); in each timed round
that compiled prefill runs once on a fresh copy of those inputs (copied outside the timing), right after the
engine's generate in even rounds and right before it in odd ones, so neither side always follows the same work
(the decode loop or another engine's). TTFT splits into generate's own setup before its first forward call
(validation, logits processors, cache allocation: transformers' host work, eager's as much as fxcc's) and the
first forward call itself; TTFT / alone and first forward / alone are reported per round and as medians.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from .capture import forward_as
from .runtime import DEFERRED_STOP_DEVICES, deferred_stop_check

WRONG_ULPS = 16  # a gap over this many ulp of eager's top logit is no near-tie: `Divergence.wrong`


@dataclass
class Divergence:
    """Where one row of an engine's greedy ids first parts from eager's, and how eager ranks the engine's token there,
    from one plain eager forward over the prompt and the new tokens both share (the model's dtype, logits in float32).
    gap: eager's top logit minus the logit of the engine's token; ulps: the gap in units of the dtype's eps times
    |top|, the top logit's rounding step. A few ulp is a near-tie that another summation order flips; over WRONG_ULPS
    the engine chose a token eager ranks well below its top (`wrong`: look for a wrong kernel)."""

    generate: str  # which of the two generates: "prompt", or "other" (the prompt 3/4 as long)
    row: int
    position: int  # the index of the first differing new token (0: the prefill's)
    eager_token: int
    token: int  # the engine's
    top: float  # eager's top logit there
    gap: float
    ulps: float
    top2_gap: float  # eager's top logit minus its second
    rank: int  # of the engine's token among eager's logits (0: the top)
    eager_gap: float  # the top minus the logit of eager's own token (its generate's cached steps vs this forward)
    wrong: bool


@dataclass
class Engine:
    """One way of running generate: its forward, its cache, what it compiled, what it measured."""

    name: str
    forward: Callable | None  # None: the model's own forward
    cache: str | None = None  # transformers cache_implementation ("static") or None for the dynamic cache
    compiles: Callable[[], int] = lambda: 0
    first_s: float = 0.0
    compiles_first: int = 0
    compiles_again: int = 0
    why: Callable[[], dict[str, list[str]]] = dict  # each compiled module's compile reasons, in order (fxcc engines)
    again_why: list[str] = field(default_factory=list)  # why the second generate compiled, where it did
    ttft_ms: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    same_tokens: bool = True
    compile_s: float | None = None
    setup_ms: list[float] = field(default_factory=list)  # generate's start to its first forward call
    first_ms: list[float] = field(default_factory=list)  # the first forward call (the prefill) within generate
    alone: Callable | None = None  # the prefill compiled alone (fxcc engines; see the module docstring)
    alone_inputs: tuple | None = None  # (args, kwargs) of the generate's first forward call, before it ran
    alone_ms: list[float] = field(default_factory=list)
    alone_compiles: int = 0
    alone_compile_s: float | None = None
    compiles_timed: int = 0  # compiles during the timed rounds (a recompile there would be in a TTFT)
    alone_compiles_timed: int = 0
    defer: bool = False  # generate reads its stop flag one step late, as `CompiledModule.generate` runs it
    error: str | None = None  # what this engine raised; it is left out of the rounds after it and reported
    mark_steps: bool = False  # each forward call begins a new CUDA-graph step (torch.compile reduce-overhead)
    model: nn.Module | None = None  # the engine's own copy of the model (None: the one the others share)
    loop: bool = False  # fxcc:loop: `fxcc.compile(model).generate`, fxcc's own decode loop (see `generate_loop`)
    path: str | None = None  # fxcc:loop: which loop its last generate ran, and why
    divergences: list[Divergence] = field(default_factory=list)  # where its rows' ids part from eager's, if they do


def divergences(model: nn.Module, ref: torch.Tensor, got: torch.Tensor, prompt: int,
                mask: torch.Tensor | None = None, generate: str = "prompt") -> list[Divergence]:
    """Per row of `got` whose new tokens (after `prompt` ids) differ from `ref`'s: the first differing one and eager's
    logits before it (one forward per such row; `mask`: the prompt's attention mask, as generate inferred it)."""
    dtype = next(model.parameters()).dtype
    n = min(ref.shape[1], got.shape[1])
    out = []
    for row in range(ref.shape[0]):
        parted = (ref[row, prompt:n] != got[row, prompt:n]).nonzero()
        if not len(parted):
            continue
        at = prompt + int(parted[0])
        logits = last_logits(model, ref[row:row + 1, :at], None if mask is None else mask[row:row + 1])
        mine, theirs = int(got[row, at]), int(ref[row, at])
        top, second = logits.topk(2).values.tolist()
        gap = top - logits[mine].item()
        ulps = gap / (torch.finfo(dtype).eps * max(abs(top), torch.finfo(torch.float32).tiny))
        out.append(Divergence(generate, row, at - prompt, theirs, mine, top, gap, ulps, top - second,
                              int((logits > logits[mine]).sum()), top - logits[theirs].item(), ulps > WRONG_ULPS))
    return out


def last_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager's logits (float32) for the token after `ids` (one row): a plain forward without a cache; with `mask`
    (the prompt's, left padding) the attention mask and positions generate gives the row."""
    kw = {}
    if mask is not None:
        full = torch.cat([mask, mask.new_ones(1, ids.shape[1] - mask.shape[1])], dim=1)
        kw = {"attention_mask": full, "position_ids": (full.long().cumsum(-1) - 1).masked_fill(full == 0, 0)}
    with torch.inference_mode():
        out = type(model).forward(model, input_ids=ids, use_cache=False, logits_to_keep=1, **kw)
    return out.logits[0, -1].float()


def prompt_mask(model: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask generate infers for prompt `ids` (given none): ids != pad where the pad id occurs in them."""
    pad = model.generation_config.pad_token_id
    return ids.ne(pad).long() if pad is not None and bool((ids == pad).any()) else None


class Clock:
    """Wraps a forward to record when each call starts and ends: the first call is the prefill, synchronized
    (CUDA) so its end is the first token's time; later calls are not, so the host may queue a step while the
    device runs the one before, as in a generate nobody watches (the decode time is taken at generate's end)."""

    def __init__(self, fn: Callable, device: str, mark_steps: bool = False):
        self.fn, self.device, self.starts, self.ends, self.mark_steps = fn, device, [], [], mark_steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.starts.append(time.perf_counter())
        if self.mark_steps:  # the last step's outputs are read (and copied) by generate before this call
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(*args, **kwargs)
        if self.device == "cuda" and not self.ends:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        return out


class DecodeCompiled:
    """How transformers' generate runs a static cache under torch.compile reduce-overhead (and gpt-fast its
    decode graph): the prefill eagerly, each one-token step through `compiled`. The prefill allocates the
    cache's tensors (`StaticLayer.lazy_initialization`); allocated inside a CUDA graph they would be the
    graph's own memory, overwritten by its next replay."""

    def __init__(self, eager: Callable, compiled: Callable):
        self.eager, self.compiled = eager, compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        step = ids is not None and ids.shape[-1] == 1
        return (self.compiled if step else self.eager)(*args, **kwargs)


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, dtype: torch.dtype,
          device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    model.generation_config.disable_compile = True  # transformers would compile static-cache decoding itself
    return model


def engines(model: nn.Module, names: list[str], device: str, defer: str = "fxcc") -> list[Engine]:
    """The engines by name; `defer`: which run generate with the stop check one step late ("fxcc": fxcc's, as
    `fxcc.compile(model).generate` runs it; "all"; "none")."""
    import fxcc

    own = type(model).forward.__get__(model)
    out = []
    for name in names:
        spec, _, how = name.partition("+")  # "+defer" / "+plain": this engine's stop check, whatever `defer` says
        base, _, mode = spec.partition(":")
        if how not in ("", "defer", "plain"):
            raise SystemExit(f"unknown engine {name!r}: after '+' use defer or plain")
        late = {"defer": True, "plain": False}.get(how)
        if base == "eager":
            out.append(Engine(name, None, defer=defer == "all" if late is None else late))
        elif base == "torch.compile":
            from torch._dynamo.utils import counters
            torch._dynamo.reset()
            # its own copy of the weights: torch.compile's launches ask each weight for a writable pointer at every
            # call, which on a shared model breaks the copy-on-write snapshots fxcc watches the weights with (the
            # weights' memory moves at each call, and fxcc then compares their contents at every call)
            mine = copy.deepcopy(model)
            theirs = type(mine).forward.__get__(mine)
            fn = torch.compile(theirs, mode=mode or None)
            if "reduce-overhead" in mode:
                fn = DecodeCompiled(theirs, fn)
            out.append(Engine(name, fn, "static", lambda: counters["stats"]["unique_graphs"],
                              defer=defer == "all" if late is None else late,
                              mark_steps=device == "cuda" and "reduce-overhead" in mode, model=mine))
        elif base == "fxcc" and mode == "loop":
            cm = fxcc.compile(model)
            out.append(Engine(name, cm, "static", lambda c=cm: c.stats.compiles + sum(
                s.stats.compiles for s in c.decode_loop.steps.values()), loop=True,
                why=lambda c=cm: {"forward": list(c.stats.reasons), **{
                    f"decode step {k}": list(s.stats.reasons) for k, s in c.decode_loop.steps.items()}}))
        elif base == "fxcc":
            fn = fxcc.compile(own)
            out.append(Engine(name, fn, mode or None, lambda s=fn.fxcc.stats: s.compiles,
                              why=lambda s=fn.fxcc.stats: {"forward": list(s.reasons)},
                              defer=defer != "none" if late is None else late))
        else:
            raise SystemExit(f"unknown engine {name!r}; use eager, torch.compile[:MODE], fxcc[:static|loop], each with "
                             "an optional +defer or +plain (the stop check one step late, or at every step)")
    return out


def generate(model: nn.Module, e: Engine, ids: torch.Tensor, new: int, device: str,
             forward: Callable | None = None) -> tuple[torch.Tensor, list[float], float]:
    """One greedy generate through engine `e` (or `forward`): the tokens, the start time and the end time of
    each forward call, and the start time of the first forward call."""
    if e.loop and forward is None:
        return generate_loop(e, ids, new, device)
    model = e.model or model
    clock = Clock(forward or e.forward or type(model).forward.__get__(model), device, e.mark_steps and not forward)
    # generate reads the forward's signature to decide what it passes (position_ids from a padding mask)
    clock.__signature__ = inspect.signature(type(model).forward.__get__(model))
    kw = {"cache_implementation": e.cache} if e.cache else {}
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    defer = deferred_stop_check(DEFERRED_STOP_DEVICES) if e.defer else contextlib.nullcontext()
    with torch.inference_mode(), forward_as(model, clock), defer:
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, [t0, clock.ends[0], time.perf_counter()], clock.starts[0]


def generate_loop(e: Engine, ids: torch.Tensor, new: int, device: str) -> tuple[torch.Tensor, list[float], float]:
    """One greedy generate of `fxcc.compile(model).generate` with a static cache: fxcc's decode loop, whose steps
    are not forward calls of the model, so no step is clocked. The prefill is: the model class's `_prefill` (which
    fxcc's loop and transformers' both call) is wrapped for the call to record when it returns, synchronized on CUDA
    as the clocked engines' first forward call is; the first token's time is that, and the decode time the rest of
    the generate, over its `new - 1` steps."""
    cls = type(e.forward.decode_loop.model)
    own = "_prefill" in vars(cls)
    prefill = cls._prefill
    ends: list[float] = []

    def clocked(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = prefill(self, *args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return out

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    cls._prefill = clocked
    try:
        with torch.inference_mode():
            out = e.forward.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                     cache_implementation="static")
    finally:
        if own:
            cls._prefill = prefill
        else:
            del cls._prefill
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    e.path = e.forward.decode_loop.text()
    if not ends:
        raise RuntimeError(f"the generate called no {cls.__name__}._prefill: its first token is not clocked")
    return out, [t0, ends[0], t1], ends[0]


class _Recorded(Exception):
    """Raised by first_call_inputs' forward once it holds the first call's inputs: generate stops there."""


def first_call_inputs(model: nn.Module, e: Engine, ids: torch.Tensor, new: int, device: str) -> tuple:
    """A copy of the (args, kwargs) that generate passes to its first forward call with engine `e`'s cache kind,
    taken before the call runs (the cache as generate made it: empty, or a StaticCache of the generate's length)."""
    seen = []

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append(copy.deepcopy((args, kwargs)))
        raise _Recorded

    try:
        generate(model, e, ids, new, device, forward=record)
    except _Recorded:
        return seen[0]
    raise RuntimeError("generate made no forward call")


def time_alone(e: Engine, device: str) -> float:
    """One call of the prefill compiled alone on a fresh copy of the recorded inputs (copied untimed), in ms."""
    args, kwargs = copy.deepcopy(e.alone_inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    with torch.inference_mode():
        t0 = time.perf_counter()
        e.alone(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3


def roofline_ms(model: nn.Module, batch: int, prompt: int, new: int, static_len: int | None) -> float:
    """Bytes one decode step must read (every weight once, the KV cache it attends over; a static cache is
    read to its allocated length) over the measured device-to-device copy bandwidth, in ms."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * batch * next(
        model.parameters()).element_size()
    mean_len = static_len or (prompt + new / 2)
    return (weights + per_token * mean_len) / copy_bandwidth() * 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), median of 20."""
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / statistics.median(times[3:])


def run(args: Any, log: Callable[[str], None]) -> str:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    hidden = args.hidden or (2048 if gpu else 512)
    model = llama(hidden, args.layers or (16 if gpu else 8), args.heads or (16 if gpu else 8),
                  args.kv_heads or (8 if gpu else 4), args.intermediate or (8192 if gpu else 4 * hidden),
                  getattr(torch, args.dtype or ("bfloat16" if gpu else "float32")), device)
    batch, prompt, new = args.batch or 1, args.prompt or (512 if gpu else 128), args.new_tokens
    names = args.engines.split(",") if args.engines else (
        ["eager", "torch.compile:reduce-overhead", "torch.compile", "fxcc", "fxcc:static"] if gpu
        else ["eager", "torch.compile", "fxcc", "fxcc:static"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 32000, (batch, prompt), generator=gen).to(device)
    other = torch.randint(2, 32000, (batch, prompt - prompt // 4), generator=gen).to(device)
    es = engines(model, names, device, getattr(args, "defer", "fxcc"))
    reference = {}
    for e in es:  # first generate (compiles), then one with another prompt length (compiles again?)
        log(f"{e.name}: first generate ...")
        with _failing(e, "its first generates", log):
            before = e.compiles()
            tokens, ends, _ = generate(model, e, ids, new, device)
            e.first_s = ends[-1] - ends[0]
            e.compiles_first = e.compiles() - before
            before, known = e.compiles(), e.why()
            other_tokens, _, _ = generate(model, e, other, new, device)
            e.compiles_again = e.compiles() - before
            e.again_why = [f"{where}: {r}" for where, rs in e.why().items() for r in rs[len(known.get(where, [])):]]
            if e.loop:
                e.compile_s = sum(v.compile_seconds for c in (e.forward, *e.forward.decode_loop.steps.values())
                                  for v in c.variants)
            elif e.forward is not None and hasattr(e.forward, "fxcc"):
                e.compile_s = sum(v.compile_seconds for v in e.forward.fxcc.variants)
            reference.setdefault("ids", tokens)
            reference.setdefault("other", other_tokens)
            e.same_tokens = torch.equal(tokens, reference["ids"]) and torch.equal(other_tokens, reference["other"])
            if not e.same_tokens:
                e.divergences = [
                    *divergences(model, reference["ids"], tokens, prompt, prompt_mask(model, ids), "prompt"),
                    *divergences(model, reference["other"], other_tokens, other.shape[1], prompt_mask(model, other),
                                 "other")]
    for e in es:  # after every engine's generates: what generate leaves on the model (a static cache's length) is there
        if getattr(args, "prefill_alone", True) and e.name.startswith("fxcc") and not e.error and not e.loop:
            log(f"{e.name}: the prefill compiled alone ...")
            with _failing(e, "its prefill compiled alone", log, whole=False):
                prefill_alone(model, e, ids, new, device)
    warmup = args.warmup
    for r in range(warmup):  # untimed, interleaved as the timed rounds are
        for e in _running(es):
            with _failing(e, f"warm-up round {r + 1}", log):
                generate(model, e, ids, new, device)
                if e.alone is not None:
                    time_alone(e, device)
        log(f"warm-up round {r + 1}/{warmup}")
    load = _load()
    before = {e.name: (e.compiles(), e.alone.fxcc.stats.compiles if e.alone else 0) for e in _running(es)}

    def timed_round(r: int) -> None:
        for e in _running(es):  # the prefill alone runs before the generate in odd rounds, after it in even ones
            with _failing(e, f"timed round {r + 1}", log):
                alone = []
                if e.alone is not None and r % 2:
                    alone.append(time_alone(e, device))
                _, ends, first_start = generate(model, e, ids, new, device)
                if e.alone is not None and not r % 2:
                    alone.append(time_alone(e, device))
                e.alone_ms += alone
                e.ttft_ms.append((ends[1] - ends[0]) * 1e3)
                if not e.loop:  # fxcc's loop clocks no forward call: its TTFT is not split
                    e.setup_ms.append((first_start - ends[0]) * 1e3)
                    e.first_ms.append((ends[1] - first_start) * 1e3)
                e.decode_tps.append((new - 1) * batch / (ends[-1] - ends[1]))
                e.step_ms.append((ends[-1] - ends[1]) / (new - 1) * 1e3)

    done = 0
    with _stop_on_sigterm():
        try:
            for r in range(args.reps):
                timed_round(r)
                done = r + 1
                log(f"round {done}/{args.reps}")
        except _Stopped:  # a device run's time limit: what the complete rounds measured is still reported
            log(f"stopped (SIGTERM) after {done} complete rounds of {args.reps}: reporting those")
            for e in es:
                for times in (e.ttft_ms, e.setup_ms, e.first_ms, e.decode_tps, e.step_ms):
                    del times[done:]
                del e.alone_ms[done:]
    if not done:
        raise SystemExit("fxcc bench generate: stopped before a timed round completed; nothing to report")
    for e in _running(es):
        e.compiles_timed = e.compiles() - before[e.name][0]
        e.alone_compiles_timed = (e.alone.fxcc.stats.compiles if e.alone else 0) - before[e.name][1]
    floor = {}
    if gpu:
        for e in _running(es):
            floor[e.name] = roofline_ms(model, batch, prompt, new, prompt + new if e.cache == "static" else None)
    load = (load, _load())
    text = report(es, floor, model, device, batch, prompt, new, done, load)  # the rounds that completed
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": "generate", "report": text, "batch": batch, "prompt": prompt, "new_tokens": new,
                       "warmup": warmup, "reps": done, "load_average": load, "roofline_ms": floor,
                       "config": model.config.to_diff_dict(),
                       "engines": [{**{f.name: getattr(e, f.name) for f in fields(e)  # not deep copies
                                       if f.name not in ("forward", "compiles", "why", "alone", "alone_inputs", "model",
                                                          "divergences")},
                                    "divergences": [asdict(d) for d in e.divergences],
                                    **_vs_alone(e)} for e in es]}, f, indent=2, default=str)
    return text


class _Stopped(BaseException):
    """SIGTERM during the timed rounds (a time limit's kill): the complete rounds are reported. A BaseException,
    so an engine's failure handler (`_failing`) does not take it for the engine's error."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises _Stopped here while the block runs (main thread only; elsewhere nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _running(es: list[Engine]) -> list[Engine]:
    """The engines that have not failed."""
    return [e for e in es if not e.error]


@contextlib.contextmanager
def _failing(e: Engine, during: str, log: Callable[[str], None], whole: bool = True) -> Iterator[None]:
    """Run a step of engine `e`; an exception there is its result, not the end of the benchmark: with `whole`
    the engine is out of the later rounds and its row gives the error; otherwise only the step is given up."""
    try:
        yield
    except Exception as exc:  # any engine's failure, torch.compile's included, is reported, not raised
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        what = f"{type(exc).__name__} during {during}: {first}"
        log(f"{e.name}: {what}" + ("; left out of the rest of the run" if whole else ""))
        if whole:
            e.error = what
        else:
            e.alone, e.alone_inputs, e.alone_ms = None, None, []


def prefill_alone(model: nn.Module, e: Engine, ids: torch.Tensor, new: int, device: str) -> None:
    """Compile engine `e`'s prefill alone: its generate's first forward inputs, static shapes, its own compile
    (its first call compiles it, untimed)."""
    import fxcc

    e.alone_inputs = first_call_inputs(model, e, ids, new, device)
    e.alone = fxcc.compile(type(model).forward.__get__(model), dynamic=False)
    t0 = time.perf_counter()
    time_alone(e, device)
    e.alone_compile_s = time.perf_counter() - t0
    e.alone_compiles = e.alone.fxcc.stats.compiles


def _vs_alone(e: Engine) -> dict:
    """TTFT and the first forward call over the prefill compiled alone, each round's pair measured back to back
    (so a load change between rounds cancels): the median of the rounds' ratios, their range, and the ratio of
    the medians."""
    if not e.alone_ms:
        return {}
    out = {}
    for key, times in (("ttft_vs_alone", e.ttft_ms), ("first_vs_alone", e.first_ms)):
        ratios = [a / b for a, b in zip(times, e.alone_ms)]
        out[key] = {"median": statistics.median(ratios), "round_min": min(ratios), "round_max": max(ratios),
                    "of_medians": statistics.median(times) / statistics.median(e.alone_ms)}
    return out


def _spread(e: Engine, eager: Engine | None) -> str:
    """min-max over the rounds of this engine's decode tok/s over eager's in the same round."""
    if eager is None or not e.decode_tps:
        return ""
    ratios = [a / b for a, b in zip(e.decode_tps, eager.decode_tps)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes share the cores: the timings' context)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def report(es: list[Engine], floor: dict, model: nn.Module, device: str, batch: int, prompt: int, new: int,
           reps: int, load: tuple = (None, None)) -> str:
    from .bench import machine

    cfg = model.config
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    lines = [f"fxcc bench generate: Llama hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, ffn {cfg.intermediate_size}, {dtype}; "
             f"batch {batch}, prompt {prompt}, {new} new tokens (greedy)",
             f"machine: {machine(device)}; medians of {reps} generates per engine, engines interleaved"
             + (f"; load average {load[0][0]:.1f} before, {load[1][0]:.1f} after" if None not in load else ""),
             ""]
    cells = {e.name: _tokens_cell(e) for e in es}
    wide = max(7, *map(len, cells.values()))
    head = (f"{'engine':<30} {'cache':<8} {'TTFT ms':>9} {'decode tok/s':>13} {'step ms':>8} {'vs eager':>9} "
            f"{'compiles':>9} {'1st gen s':>9} {'tokens':>{wide}} {'round range':>13}")
    if floor:
        head += f" {'roofline':>9}"
    lines.append(head)
    eager = next((e for e in es if e.name == "eager" and e.decode_tps), None)
    base = statistics.median(eager.decode_tps) if eager else None
    for e in es:
        if not e.decode_tps:
            lines.append(f"{e.name:<30} failed: {e.error}")
            continue
        tps, step = statistics.median(e.decode_tps), statistics.median(e.step_ms)
        row = (f"{e.name:<30} {e.cache or 'dynamic':<8} {statistics.median(e.ttft_ms):>9.1f} {tps:>13.1f} "
               f"{step:>8.2f} {(tps / base if base else 1):>8.2f}x {f'{e.compiles_first}+{e.compiles_again}':>9} "
               f"{e.first_s:>9.1f} {cells[e.name]:>{wide}} {_spread(e, eager):>13}")
        if floor:
            row += f" {floor[e.name] / step:>8.0%}"
        lines.append(row)
    lines.append("\ncompiles: in the first generate + in a second one with a prompt 3/4 as long; tokens: the "
                 "greedy ids of both generates against eager's; round range: the lowest and highest decode tok/s "
                 "against eager's in the same round")
    if any(e.divergences for e in es):
        lines.append(f"DIFF@N: the first new token (0: the prefill's) where a row's ids part from eager's, the row with "
                     f"the largest gap shown; gap: eager's top logit there minus the logit of the engine's token (one "
                     f"eager forward over the shared ids); ulp: the {dtype} eps times |top logit|, its rounding step: a "
                     f"gap of a few ulp is a near-tie that another summation order flips; WRONG?: over {WRONG_ULPS} "
                     f"ulp, a token eager ranks well below its top (look for a wrong kernel); eager's #k: the engine's "
                     f"token's place in eager's ranking (#1: no token above it)")
        lines += [_divergence_line(e, 2 * batch) for e in es if e.divergences]
    lines += [f"{e.name}: {e.error} (its times are of the rounds before)" for e in es if e.error and e.decode_tps]
    lines += [f"{e.name}: the second generate compiled ({why})" for e in es for why in e.again_why]
    fx = [e for e in es if e.name.startswith("fxcc") and e.decode_tps]
    tc = [e for e in es if e.name.startswith("torch.compile") and e.decode_tps]
    if fx and tc:
        best_fx = max(fx, key=lambda e: statistics.median(e.decode_tps))
        for t in tc:
            ratio = statistics.median(best_fx.decode_tps) / statistics.median(t.decode_tps)
            lines.append(f"decode tok/s, {best_fx.name} vs {t.name}: {ratio:.2f}x")
    for e in fx:
        if e.compile_s is not None:
            lines.append(f"{e.name}: {e.compile_s:.1f} s compiling (all its variants)")
    lines += [f"{e.name}: {e.path}" for e in es if e.loop and e.path]
    lines += _alone_lines(es)
    return "\n".join(lines)


def _tokens_cell(e: Engine) -> str:
    """The tokens column: same, or the divergence with the largest gap (see `Divergence`)."""
    if e.same_tokens:
        return "same"
    if not e.divergences:  # the ids differ in length, not within their common length
        return "DIFF"
    d = max(e.divergences, key=lambda d: d.ulps)
    return f"DIFF@{d.position}{' WRONG?' if d.wrong else ''} gap {d.gap:.2g} ({d.ulps:.3g} ulp)"


def _divergence_line(e: Engine, rows: int, shown: int = 4) -> str:
    """Engine `e`'s differing rows, the largest gaps first (all of them in --json)."""
    ds = sorted(e.divergences, key=lambda d: -d.ulps)
    text = "; ".join(f"{d.generate} row {d.row} @{d.position}: {d.eager_token}->{d.token}{' WRONG?' if d.wrong else ''} "
                     f"gap {d.gap:.3g} = {d.ulps:.3g} ulp, eager's #{d.rank + 1}, top-2 gap {d.top2_gap:.3g}"
                     + (f", eager's own token {d.eager_gap:.3g} below the top" if d.eager_gap else "")
                     for d in ds[:shown])
    more = f"; {len(ds) - shown} more in --json" if len(ds) > shown else ""
    return f"{e.name}: ids part from eager's in {len(ds)} of {rows} rows: {text}{more}"


def _alone_lines(es: list[Engine]) -> list[str]:
    """The TTFT split (generate's setup, its first forward call) and, per fxcc engine, against the prefill
    compiled alone; medians, with each ratio's lowest and highest value over the rounds."""
    es = [e for e in es if e.decode_tps and not e.loop]
    if not any(e.alone_ms for e in es):
        return []
    lines = ["", "TTFT against the prefill compiled alone (fxcc.compile(forward, dynamic=False) on the generate's "
             "first forward inputs, a fresh cache each call, timed next to each generate):",
             f"{'engine':<30} {'TTFT ms':>9} {'setup ms':>9} {'1st fwd ms':>10} {'alone ms':>9} "
             f"{'TTFT/alone':>11} {'round range':>12} {'1st fwd/alone':>13} {'round range':>12}"]
    for e in es:
        row = (f"{e.name:<30} {statistics.median(e.ttft_ms):>9.1f} {statistics.median(e.setup_ms):>9.1f} "
               f"{statistics.median(e.first_ms):>10.1f}")
        vs = _vs_alone(e)
        if vs:
            t, f = vs["ttft_vs_alone"], vs["first_vs_alone"]
            row += (f" {statistics.median(e.alone_ms):>9.1f} {t['median']:>10.2f}x "
                    f"{t['round_min']:>5.2f}-{t['round_max']:.2f}x {f['median']:>12.2f}x "
                    f"{f['round_min']:>5.2f}-{f['round_max']:.2f}x")
        lines.append(row)
    lines.append("setup: generate's work before its first forward call (transformers'); 1st fwd: that call (the "
                 "prefill); alone: compiled by itself with static shapes (" + ", ".join(
                     f"{e.name}: {e.alone_compiles} compile, {e.alone_compile_s:.1f} s" for e in es if e.alone_ms)
                 + "); ratios: the median of each round's ratio (both measured back to back), and their range")
    for e in es:
        if e.compiles_timed or e.alone_compiles_timed:
            lines.append(f"{e.name}: {e.compiles_timed} compiles (and {e.alone_compiles_timed} of its prefill alone) "
                         "during the timed rounds: those rounds' times include them")
    return lines
