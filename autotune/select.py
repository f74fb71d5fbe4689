"""codegen: choose, by measurement, among the backends' candidates for every kernel op of the graph.

Each backend available for the target offers candidates for a kernel (extern always does). With one
candidate it is built as is; with several, each is built, checked against the reference and timed
interleaved with extern (the incumbent: torch's own kernels), and another candidate wins only if it beats
extern by more than the measured noise (`fxcc.measure.compare`). Floating-point inputs are random (their
values do not change a kernel's time); boolean and integer inputs (masks, indices) are what the compile's example inputs feed the kernel,
since their values steer data-dependent kernels (padding-aware attention). A candidate that fails to build or gives wrong results is
dropped with a warning naming the kernel, so a backend failure never fails the compile. A kernel of symbolic
sizes is checked at a second size too (`other_sizes`), and where the reference cannot run there only extern
is offered: a generated kernel is never trusted at sizes it was not checked at. Under a plan
nothing is timed or tuned: each kernel takes the plan's choice, and one the plan does not name takes extern.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from fxcc import ir
from fxcc.autotune.plan import plan_kernel
from fxcc.autotune.tune import DEFAULT_TRIALS, tune_kernel
from fxcc.codegen import BACKENDS, Built, Candidate, check, extern
from fxcc.codegen import backend as backend_module
from fxcc.codegen import triton_gen as tg
from fxcc.codegen.executable import BuiltKernel
from fxcc.dialects import KERNEL_OPS, Choice, KernelBody, choice_of, kernel_body, set_choice
from fxcc.measure import (
    MIN_GAIN,
    SETTLE_GAIN,
    Decision,
    beats,
    compare,
    decide,
    measure_again,
    settle_record,
    settle_text,
)
from fxcc.options import CANDIDATES, settings
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.store import cache_key, default_cache, target_id

log = logging.getLogger(__name__)

NO_BOUND = 100.0  # codegen{packed=100}: packed weight copies are not bounded (the default)


@dataclass(frozen=True)
class Codegen(Pass):
    """Builds each distinct kernel once. `backend=auto` measures every available backend's candidates.

    With the artifact cache (compile option tune="cached", the default) a kernel seen before, on this
    target with these library versions, is loaded with the choice and parameters stored then: no
    code generation and no measurement, when that choice was settled (fxcc.measure.Decision.doubt). One
    measured while the noise was too wide to settle it is measured again by the next compiles, up to
    FXCC_SETTLE_TRIES compiles in all; then its last outcome is final. tune="search" tunes each candidate's space with Optuna first;
    tune="off" builds defaults and leaves the cache alone.

    `packed` bounds the packed weight copies the chosen kernels keep (a fraction of the graph's parameter bytes:
    `bound_copies`): 0.05 holds each weight about once, 0 keeps none; the default, 100, bounds nothing (README,
    "The CPU backend", measures what each costs).
    """

    name = "codegen"
    reads = "kernel"
    writes = "kernel"
    backend: str = "auto"
    reps: int = 20
    # packed weight copies (oneDNN, MKL, TVM panels) may take this fraction of the graph's parameter bytes
    packed: float = NO_BOUND

    def __post_init__(self) -> None:
        if not self.packed >= 0:
            raise ValueError(f"packed is the fraction of the parameter bytes packed weight copies may take (0: none, "
                             f"100: no bound), got {self.packed}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; available: auto, {', '.join(BACKENDS)}")
        if self.reps < 1:
            raise ValueError(f"reps must be at least 1 (timed calls per candidate), got {self.reps}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
        keys = dict.fromkeys(n.args[1] for n in nodes)
        backends = self._backends(ctx.target)
        tune = getattr(ctx.options, "tune", "cached")
        plan = getattr(ctx.options, "plan", None)  # a plan file fixes each kernel's choice (fxcc search)
        sel = Selection(ctx.target, self.reps, None if self.backend == "auto" else self.backend, tune,
                        getattr(ctx.options, "tune_budget", None), plan, Probe(gm, ctx.example_inputs))
        stats: dict = {"kernels": len(keys)}
        for key in keys:
            how, k = sel.choose(kernel_body(key), backends)
            ctx.kernels[key] = k  # what was built for the choice: the executable builder takes it
            stats[how] = stats.get(how, 0) + 1
        if self.packed < NO_BOUND:  # sizing the copies may read a backend's lowering (fxcc.codegen.tvm.copies)
            stats.update(bound_copies(gm, nodes, ctx.kernels, sel, self.packed))
        for k in {n.args[1]: ctx.kernels[n.args[1]] for n in nodes}.values():
            stats[k.backend] = stats.get(k.backend, 0) + 1
        changed = False
        for n in nodes:  # the decision is data: each kernel op records its choice
            if choice_of(n) != ctx.kernels[n.args[1]].choice:
                set_choice(n, ctx.kernels[n.args[1]].choice)
                changed = True
        return PassResult(changed, stats, retyped=False)  # choices only: each kernel's outputs are its body's

    def _backends(self, target: str) -> list:
        names = list(BACKENDS) if self.backend == "auto" else ["extern", self.backend]
        mods = []
        for n in dict.fromkeys(names):
            try:
                mod = backend_module(n)
            except ImportError as e:
                why = str(e)
            else:
                why = mod.available(target)
                if why is None:
                    mods.append(mod)
                    continue
            if self.backend == n:
                raise ValueError(f"backend {n!r} cannot build for target {target!r}: {why}")
            log.debug("backend %s skipped: %s", n, why)
        return mods


@dataclass
class Selection:
    """How kernels are chosen in one codegen run: target, repetitions, preferred backend, tuning mode."""

    target: str
    reps: int
    prefer: str | None = None
    tune: str = "cached"
    budget: int | None = None
    plan: str | None = None
    probe: Probe | None = None
    # kernel key -> where its chosen candidate keeps weight copies, the choices to fall back on when they do not
    # fit the packed-copy budget (`bound_copies`): first the best that copies no weight, then the others that
    # beat extern beyond the noise; each built, or (label, module, params) to build (`fallback`)
    fallbacks: dict = field(default_factory=dict)

    def choose(self, kb: KernelBody, backends: list) -> tuple[str, BuiltKernel]:
        """Choose and build an implementation for `kb`; returns how ("plan", "default", "single", "cached", "built"
        or "remeasured": a stored choice that was unsettled, measured again) and the built kernel, whose `choice`
        the kernel's ops record."""
        if self.plan:  # the plan's choice, or extern where it names none: no timing, no tuning
            k = self._from_plan(kb)
            return ("plan", k) if k is not None else \
                ("default", BuiltKernel(kb, Choice("extern", "extern", {}, ""), extern.Extern(kb).build({})))
        cache = default_cache() if self.tune != "off" and len(backends) > 1 else None
        key = kernel_key(kb, self.target, self.prefer) if cache else ""
        was = None  # the stored decision this run measures again (it was unsettled)
        if cache and self.tune == "cached" and (entry := cache.get(key)) is not None:
            if not remeasure(entry.meta):
                if (k := self._load(kb, entry, key)) is not None:
                    return "cached", k
            else:
                was = entry.meta
                log.info("kernel %s: its stored choice (%s) was unsettled after %d measurement(s); measuring again",
                         kb.key, was.get("backend"), was.get("tries", 0))
        # an unsettled decision measured again times the builds it kept (`_keep_all`): no code generation, and no
        # import of TVM's compiler (seconds of a warm compile)
        reloaded = self._reload(kb, key, was) if was is not None else None
        if reloaded is not None:
            built, origin = reloaded
            inputs = (example_inputs(kb, self.target, self.probe(kb), self.probe.params(kb)) if self.probe
                      else example_inputs(kb, self.target))
        else:
            cands: list[Candidate] = []
            origin: dict[str, str] = {}  # candidate label -> backend module that made it (to load it again)
            for mod in backends:
                try:
                    made = mod.candidates(kb, self.target)
                    cands += made
                    origin.update((c.backend, mod.name) for c in made)
                except Exception as e:  # a lowering gap in one backend leaves the others
                    _warn(kb, mod.name, e)
            ext = next(c for c in cands if c.backend == "extern")
            if len(cands) == 1:
                k = BuiltKernel(kb, Choice("extern", "extern", {}, key), ext.build({}))
                if cache:  # remember that nothing else applies, so a warm compile skips the lowering too
                    _store(cache, k, self.target, self.tuned)
                return "single", k
            inputs = (example_inputs(kb, self.target, self.probe(kb), self.probe.params(kb)) if self.probe
                      else example_inputs(kb, self.target))
            reference = ext.build({})
            ref_fn = reference.fn
            try:
                ref = ref_fn(inputs)
            except Exception as e:  # noqa: BLE001 - sizes the example cannot make consistent (a size read from an int)
                log.debug("%s: no example inputs the reference runs on (%s: %s); extern, untimed", key,
                          type(e).__name__, e)
                return "single", BuiltKernel(kb, Choice("extern", "extern", {}, key), reference)
            # (what the input is, for the warning of a candidate that fails on it; inputs; reference; tolerance)
            checks = [("the example inputs", inputs, ref, 0.0)]
            checks += [(what, x, ref_fn(x), tol)
                       for x, tol, what in edge_inputs(inputs, self.probe.params(kb) if self.probe else ())]
            sized = other_sizes(kb)
            if sized is not None:  # symbolic: checked at another size as well
                try:
                    x = example_inputs(kb, self.target, params=self.probe.params(kb) if self.probe else (), sizes=sized)
                    checks.append((sizes_text(kb, sized), x, ref_fn(x), 0.0))
                except Exception as e:  # noqa: BLE001 - the reference's own limits (a size guard, an index range)
                    log.info("%s: symbolic, and its reference does not run at sizes %s (%s: %s): extern only", kb.key,
                             sized, type(e).__name__, e)
                    cands = [ext]
            built: dict[str, tuple[Built, dict]] = {}
            for c in cands:
                on = ""  # the input a check failed on
                try:
                    params = self._params(kb, c, inputs, ref, key)
                    b = c.build(params)
                    if c is not ext:  # extern is the reference; the others are exact on every input, not only
                        for what, x, r, tol in checks:  # the example: masked rows, large magnitudes, other sizes
                            on = what
                            check(c.backend, b.fn(x), r, tol)
                except Exception as e:
                    _warn(kb, c.backend, e, on)
                    continue
                built[c.backend] = (b, params)
                if self.prefer and c.backend.split("+")[0] == self.prefer:
                    break
        timings: dict[str, float] = {}
        decision: Decision | None = None
        if self.prefer and list(built)[-1].split("+")[0] == self.prefer:
            best = list(built)[-1]
        elif len(built) == 1:
            best = "extern"
        else:
            sets = rotation(inputs, self.probe.params(kb) if self.probe and self.target == "cpu" else ())
            for b, _ in built.values():  # each copy's packed weights made before timing, as the model's are
                for x in sets[1:]:
                    b.fn(x)
            decision = compare({label: rotating(b.fn, sets) for label, (b, _) in built.items()}, "extern",
                               device=self.target, warmup=3, reps=self.reps, rounds=min(self.reps, 5))
            del sets
            best = decision.winner
            if copies(kb, best, origin[best]):
                decision = _holding_no_copy(decision, [lb for lb in built if not copies(kb, lb, origin[lb])])
                best = decision.winner
            timings = {label: round(x.own, 4) for label, x in decision.timings.items()}
            log.info("kernel %s (%s): %s", kb.key, kb.kind, decision.summary())
        b, params = built[best]
        k = BuiltKernel(kb, Choice(best, origin[best], params, key), b, timings)
        measured = settle_record(decision, was)
        k.decided = settle_text(measured, again=was is not None)
        if decision is not None and copies(kb, best, origin[best]):
            # the same rule among the candidates that copy no weight: what runs if no copies fit; and the other
            # candidates that keep copies (smaller ones, perhaps) and beat extern beyond the noise
            ts = decision.timings
            plain = decide({lb: t for lb, t in ts.items() if not copies(kb, lb, origin[lb])}, "extern").winner
            more = [lb for lb in ts if lb not in (best, plain) and copies(kb, lb, origin[lb])
                    and beats(ts[lb], ts["extern"], MIN_GAIN)]
            self.fallbacks[kb.key] = [BuiltKernel(kb, Choice(lb, origin[lb], built[lb][1],
                                                         self._keep(cache, kb, key, lb, origin[lb], *built[lb])),
                                                  built[lb][0], timings) for lb in (plain, *more)]
            measured = {**(measured or {}), "fallbacks": [[lb, origin[lb], built[lb][1]] for lb in (plain, *more)]}
        if cache and measured is not None and measure_again(measured):  # the next compile measures it again
            measured = {**measured, "candidates": self._keep_all(cache, kb, key, built, origin)}
        if cache:
            _store(cache, k, self.target, self.tuned, measured)
        return ("remeasured" if was is not None else "built"), k

    @property
    def tuned(self) -> int:
        """Optuna trials per candidate behind this run's choices (0: defaults): a choice made with more
        supersedes one made with fewer in the artifact cache."""
        return (self.budget or DEFAULT_TRIALS) if self.tune == "search" else 0

    def _params(self, kb: KernelBody, c: Candidate, inputs, ref, key: str | None) -> dict:
        if self.tune != "search" or not c.space:
            return dict(c.defaults)
        budget = {"trials": self.budget} if self.budget else {}
        res = tune_kernel(c, inputs, ref, **budget, device=self.target,
                          key=f"{key or kb.key}", progress=True)
        return res.params

    def _load(self, kb: KernelBody, entry, key: str) -> BuiltKernel | None:
        """The choice an earlier compile stored in `entry` (under `key`), built from its files; None (with a
        warning) when its build does not load."""
        choice = Choice(entry.meta.get("backend", ""), entry.meta.get("module", ""), entry.meta.get("params", {}), key)
        try:
            b = backend_module(choice.module).load(kb, choice.backend, entry.files, choice.params)
        except Exception as e:
            warnings.warn(f"fxcc: cached build of kernel {kb.key} ({choice.backend}) did not load ({e}); rebuilding",
                          stacklevel=2)
            # evicted, so the rebuild's choice is stored in its place: a settled entry is never superseded, and
            # kept, it would be rebuilt by every compile
            cache = default_cache()
            if cache.problem() is None and cache.writable:
                cache.remove(key)
            return None
        k = BuiltKernel(kb, choice, b, entry.meta.get("timings_ms", {}), cached=True)
        k.decided = settle_text(entry.meta, cached=True)
        # `bound_copies` sizes the choice's copies only under a bound (sizing imports the backend's lowering);
        # an entry stored before fallbacks were falls back to extern
        self.fallbacks[kb.key] = [tuple(f) for f in entry.meta.get("fallbacks") or [("extern", "extern", {})]]
        return k

    def _keep_all(self, cache, kb: KernelBody, key: str, built: dict, origin: dict) -> list[list]:
        """Keep every candidate's build of a decision the next compile measures again, as fallbacks are kept
        (`_keep`); the [label, module, params] of each, for `_reload`."""
        for label, (b, params) in built.items():
            self._keep(cache, kb, key, label, origin[label], b, params)
        return [[label, origin[label], params] for label, (_, params) in built.items()]

    def _reload(self, kb: KernelBody, key: str, was: dict) -> tuple[dict, dict] | None:
        """The candidates of the unsettled decision `was` (stored under `key`), as `choose` times them: each loaded
        from the build `_keep_all` kept (checked against the reference when it was built), or built again where it
        keeps no files (extern: the body's torch calls). None, to build all from the start, where `was` lists none
        or one does not load."""
        named = was.get("candidates")
        if not named or not any(label == "extern" for label, _, _ in named):
            return None
        built, origin = {}, {}
        for label, module, params in named:
            try:
                if label == "extern":
                    b = extern.Extern(kb).build({})
                elif (entry := default_cache().get(fallback_key(key, label))) is not None:
                    b = backend_module(module).load(kb, label, entry.files, params)
                    # a loaded build comes without its files; the one that wins is stored as the choice with them
                    b.files = {name: path.read_bytes() for name, path in entry.files.items()}
                else:
                    cand = next(c for c in backend_module(module).candidates(kb, self.target) if c.backend == label)
                    b = cand.build(params)
            except Exception as e:  # noqa: BLE001 - an evicted or unloadable build: all are built again
                log.info("kernel %s: candidate %s of its unsettled decision did not load (%s: %s); building all",
                         kb.key, label, type(e).__name__, e)
                return None
            built[label], origin[label] = (b, params), module
        return built, origin

    def fallback(self, kb: KernelBody, i: int) -> BuiltKernel:
        """Fallback `i` of `kb` (`fallbacks`): measured with the others; where it came from the cache, loaded from
        the entry its first build was kept in (`_keep`), else built from the candidates; extern where that fails."""
        p = self.fallbacks[kb.key][i]
        if isinstance(p, BuiltKernel):
            return p
        label, module, params = p
        if label != "extern":
            cache = default_cache() if self.tune != "off" else None
            fkey = fallback_key(kernel_key(kb, self.target, self.prefer), label)
            try:
                entry = cache.get(fkey) if cache else None
                if entry is not None:
                    b = backend_module(module).load(kb, label, entry.files, params)
                else:
                    cand = next(c for c in backend_module(module).candidates(kb, self.target) if c.backend == label)
                    b = cand.build(params)
                    fkey = self._keep(cache, kb, fkey, label, module, b, params, derived=True)
                return BuiltKernel(kb, Choice(label, module, params, fkey), b, cached=True)
            except Exception as e:  # noqa: BLE001 - the always-correct library call instead
                _warn(kb, label, e)
        return BuiltKernel(kb, Choice("extern", "extern", {}, ""), extern.Extern(kb).build({}), cached=True)

    def _keep(self, cache, kb: KernelBody, key: str, label: str, module: str, b: Built, params: dict,
              derived: bool = False) -> str:
        """Store the build of fallback `label` of the kernel cached under `key` (`derived`: `key` is the fallback's
        own already), so a warm compile that falls back loads it instead of generating code; its key, or "" where
        nothing was stored (a build without files: the torch calls of the body, rebuilt in no time)."""
        if cache is None or not key or not b.files:
            return ""
        fkey = key if derived else fallback_key(key, label)
        meta = {"backend": label, "module": module, "params": params, "fallback_of": kb.key, "kind": kb.kind,
                "target": target_id(self.target)}
        return fkey if cache.put(fkey, b.files, meta) is not None else ""

    def _from_plan(self, kb: KernelBody) -> BuiltKernel | None:
        """The plan's backend and parameters for `kb`, built (from the cache when built before): no timing,
        no tuning. None when the plan names no choice for it, or its choice fails to build or check."""
        named = plan_kernel(self.plan, kb.key)
        if named is None:
            log.info("plan %s names no choice for kernel %s; it runs extern (the plan pins it, untimed)", self.plan,
                     kb.key)
            return None
        label, module, params = named.get("backend", ""), named.get("module", ""), named.get("params") or {}
        cache = default_cache() if self.tune != "off" else None
        key = kernel_key(kb, self.target, self.prefer) if cache else ""
        if cache:
            entry = cache.get(key)
            if (entry is not None and entry.meta.get("backend") == label and entry.meta.get("params") == params
                    and (k := self._load(kb, entry, key)) is not None):
                return k
        try:
            cand = next((c for c in backend_module(module).candidates(kb, self.target) if c.backend == label), None)
            if cand is None:
                raise ValueError(f"backend module {module!r} offers no candidate {label!r} for it")
            b = cand.build(params)
            on = ""
            if label != "extern":
                inputs = example_inputs(kb, self.target)
                ref_fn = extern.Extern(kb).build({}).fn
                sized = other_sizes(kb)
                more = [(example_inputs(kb, self.target, sizes=sized), 0.0, sizes_text(kb, sized))] if sized else []
                for x, tol, what in ((inputs, 0.0, "the example inputs"), *edge_inputs(inputs), *more):
                    on = what
                    check(label, b.fn(x), ref_fn(x), tol)
        except Exception as e:
            warnings.warn(f"fxcc: plan {self.plan}: its choice for kernel {kb.key} ({label} with {params}) failed"
                          f"{f' on {on}' if on else ''} ({type(e).__name__}: {e}); it runs extern. Run `fxcc search` "
                          "again.", stacklevel=2)
            return None
        k = BuiltKernel(kb, Choice(label, module, params, key), b)
        if cache:
            _store(cache, k, self.target, 0)
        return k


# Candidates are timed with their parameters cold: each call reads another copy of them, from a rotation of copies
# taking this many bytes together (at most ROTATE_SETS copies), so a weight has left the core's cache when its turn
# comes again, as in the model, where every other layer's weights pass between two reads of one. Timed hot, with the
# same weight at every call, the candidates that re-pack a weight at each call (the library GEMM on `x @ w.T`) looked
# nearly as fast as those reading a packed copy; in the model the difference was several times larger (README, "The
# CPU backend").
ROTATE_BYTES = 32 * 2**20
ROTATE_SETS = 16


def rotation(inputs: list[torch.Tensor], params: Iterable[int]) -> list[list[torch.Tensor]]:
    """`inputs` and copies of it whose parameters (the placeholder indices in `params`) are copies of theirs, enough
    that the parameters of all of them together take ROTATE_BYTES (at most ROTATE_SETS sets); [inputs] alone where
    there are no parameters."""
    params = [i for i in params if inputs[i].numel()]
    nbytes = sum(inputs[i].numel() * inputs[i].element_size() for i in params)
    if not nbytes or ROTATE_BYTES <= 0:
        return [inputs]
    out = [inputs]
    for _ in range(min(ROTATE_SETS, -(-ROTATE_BYTES // nbytes)) - 1):
        x = list(inputs)
        for i in params:
            x[i] = torch.nn.Parameter(_same_layout_copy(inputs[i].detach()), requires_grad=False)
        out.append(x)
    return out


def rotating(fn, sets: list[list[torch.Tensor]]):
    """A callable running `fn` on the next of `sets` at each call (`rotation`)."""
    at = [0]

    def call():
        at[0] = (at[0] + 1) % len(sets)
        return fn(sets[at[0]])
    return call


def _holding_no_copy(decision: Decision, plain: list[str]) -> Decision:
    """`decision` with its winner, a candidate keeping a weight copy (packed weights beside the parameter), replaced
    by the fastest of the candidates `plain` that keep none (the incumbent aside: the winner beat it), where its
    estimate is within SETTLE_GAIN of the winner's and the winner does not beat it beyond the noise (by MIN_GAIN, as
    any challenger must): a copy is memory held for as long as the model lives, dropped where it buys no speed.
    That candidate need not beat the incumbent beyond the noise itself: level with the winner, which did, it is
    faster than the incumbent but for the noise. The estimate's bound keeps a GEMM that the noise of a busy machine
    hides but that is much slower (tvm+rows without its prefetch was 10-20% slower on weights from memory); a bound
    of MIN_GAIN kept the copies at random, as equal GEMMs' estimates differ by more than that on such a machine."""
    ts = decision.timings
    rival = min((lb for lb in plain if lb in ts and lb != decision.incumbent), key=lambda lb: ts[lb].own, default=None)
    if (rival is None or ts[rival].own > (1 + SETTLE_GAIN) * ts[decision.winner].own
            or beats(ts[decision.winner], ts[rival], MIN_GAIN)):
        return decision
    log.debug("%s is kept: %s keeps a weight copy and does not beat it beyond the noise", rival, decision.winner)
    return Decision(ts, decision.incumbent, rival)


def fallback_key(key: str, label: str) -> str:
    """The artifact-cache key of candidate `label`'s build kept as a fallback of the kernel cached under `key`."""
    return cache_key("kernel-fallback", kernel=key, backend=label)


def copies(kb: KernelBody, label: str, module: str) -> list[tuple[int, int, str]]:
    """(placeholder index, bytes, store) of the weight copies candidate `label` of backend `module` keeps across
    calls (packed weights); [] for a backend that keeps none."""
    try:
        of = getattr(backend_module(module), "copies", None)
    except (ImportError, KeyError):  # a library not installed, a module no longer registered
        return []
    return of(kb, label) if of is not None else []


def bound_copies(gm: fx.GraphModule, nodes: list[fx.Node], kernels: dict[str, BuiltKernel], sel: Selection,
                 fraction: float) -> dict:
    """Keep the weight copies the chosen kernels make (packed weights beside the parameters they come from) within
    `fraction` of the graph's parameter bytes. Every kernel whose choice keeps copies starts from its best choice
    that keeps none (`Selection.fallbacks`); then, while the budget allows, the step that buys the most measured
    time per byte of copies is taken: a kernel moves to a faster choice (its fastest, or a faster one with other
    copies, such as oneDNN's 1x beside MKL's 3.7x-10x), its gain counted over all its uses. A weight a store holds
    for one kernel costs nothing again for another. Returns the statistics (MB of copies kept, kernels off their
    fastest choice)."""
    consts = {n.target: n.meta.get("val") for n in gm.graph.nodes if n.op == "get_attr"}
    total = sum(v.numel() * v.element_size() for v in consts.values() if isinstance(v, torch.Tensor))
    budget = fraction * total
    uses: dict[str, list[fx.Node]] = {}
    for n in nodes:
        uses.setdefault(n.args[1], []).append(n)
    size: dict[tuple[str, str], int] = {}  # (store, weight) -> bytes of its copy

    def need(key: str, label: str, module: str) -> frozenset:
        out = set()
        for i, nbytes, store in copies(kernels[key].body, label, module):
            for n in uses[key]:
                w = n.args[0][i]
                if isinstance(w, fx.Node) and w.op == "get_attr":  # a parameter: its copy is kept across calls
                    size[(store, w.target)] = nbytes
                    out.add((store, w.target))
        return frozenset(out)

    options: dict[str, list[tuple[float, frozenset, int]]] = {}  # key -> (ms, copies, fallback index; -1: chosen)
    for key in uses:
        k = kernels[key]
        if key not in sel.fallbacks or k.choice is None or not (mine := need(key, k.choice.backend, k.choice.module)):
            continue
        fast = k.timings_ms.get(k.choice.backend)
        opts = []
        for i, f in enumerate(sel.fallbacks[key]):
            label, module = (f.choice.backend, f.choice.module) if isinstance(f, BuiltKernel) else f[:2]
            t = k.timings_ms.get(label, fast if i == 0 else None)  # unknown: no gain to buy
            if t is not None and fast is not None:
                opts.append((t, need(key, label, module) if i else frozenset(), i))
        if opts and fast is not None:
            options[key] = [*opts, (fast, mine, -1)]
    at = {key: 0 for key in options}  # each kernel's current option: its plain fallback

    def spent_with(key: str | None = None, copies_now: frozenset = frozenset()) -> int:
        held = set().union(*(options[k][at[k]][1] for k in options if k != key), copies_now)
        return sum(size[sw] for sw in held)

    spent = 0
    while True:
        best = None  # (gain per byte, key, option)
        for key, opts in options.items():
            now = opts[at[key]][0]
            for j, (t, cp, _) in enumerate(opts):
                if t >= now:
                    continue
                after = spent_with(key, cp)
                if after > budget:
                    continue
                rate = (now - t) * len(uses[key]) / max(after - spent, 1)
                if best is None or rate > best[0]:
                    best = (rate, key, j)
        if best is None:
            break
        at[best[1]] = best[2]
        spent = spent_with()
    moved = 0
    for key, opts in options.items():
        t, cp, i = opts[at[key]]
        if i < 0:
            continue
        k = kernels[key]
        f = kernels[key] = sel.fallback(k.body, i)
        f.timings_ms, f.decided = f.timings_ms or k.timings_ms, k.decided  # explain shows every candidate's time
        mine = sum(size[sw] for sw in opts[-1][1])
        f.note = (f"{k.choice.backend} measured {k.timings_ms.get(k.choice.backend)} ms, but its packed weight copies "
                  f"({mine / 2**20:.1f} MB) do not fit codegen's packed={fraction} budget ({budget / 2**20:.1f} MB "
                  f"of {total / 2**20:.1f} MB parameters) where they buy most: {f.backend} ({t} ms)")
        log.info("kernel %s: %s", key, f.note)
        moved += 1
    return {"packed_mb": round(spent / 2**20, 2), "unpacked": moved} if options else {}


def _store(cache, k: BuiltKernel, target: str, tuned: int, measured: dict | None = None) -> None:
    """Record a kernel's choice (and what it built) under its key, and on `k` where it went, with how settled its
    decision was (fxcc.measure.settle_record; None: nothing was timed, so nothing is in doubt); a tuned choice replaces one
    tuned with fewer trials (or none), and any new measurement one still to be measured again (`remeasure`). A
    failed write costs time, never the compile."""
    c = k.choice
    meta = {"backend": c.backend, "module": c.module, "params": c.params, "timings_ms": k.timings_ms,
            "kernel": k.key, "kind": k.kind, "target": target_id(target), "tuned": tuned,
            **(measured or {"settled": True, "tries": 0})}

    def supersedes(old: dict) -> bool:
        return (tuned > 0 and tuned >= old.get("tuned", 0)) or (remeasure(old) and tuned >= old.get("tuned", 0))
    entry = cache.put(c.key, k.built.files, meta, supersedes=supersedes) if c.key else None
    if entry is None:
        k.stored = f"not stored ({cache.problem() or 'the artifact cache is read-only'})"
    elif entry.meta != json.loads(json.dumps(meta)):
        k.stored = (f"kept the entry already in {entry.dir} ({entry.meta.get('backend')}, "
                    f"tuned with {entry.meta.get('tuned', 0)} trials per candidate)")
    else:
        k.stored = f"stored in {entry.dir}"


def remeasure(meta: dict) -> bool:
    """Whether a stored choice is measured again instead of applied (fxcc.measure.measure_again), or, stored before
    decisions recorded whether they were settled, was chosen by timing. Never a tuned one: a cached compile does
    not search again."""
    if meta.get("tuned", 0):
        return False
    if "settled" not in meta:
        return len(meta.get("timings_ms") or {}) > 1
    return measure_again(meta)


def kernel_key(kb: KernelBody, target: str, prefer: str | None) -> str:
    """The artifact-cache key of a kernel's choice: its IR and input layouts, the target, the libraries, and the
    settings that change which candidates exist or how they run (FXCC_TVM_POOL, FXCC_TRITON_INTERPRET,
    FXCC_TRITON_WELFORD)."""
    layouts = ";".join(_layout(p) for p in kb.body.graph.nodes if p.op == "placeholder")
    s = settings()
    return cache_key("kernel", target=target, ir=kb.text, layouts=layouts, backend=prefer or "auto",
                     candidates=CANDIDATES, pool=s.tvm_pool, triton_interpret=str(s.triton_interpret),
                     triton_welford=str(s.triton_welford))


def _layout(p: fx.Node) -> str:
    """A placeholder's strides and offset for the key; symbolic ones named as the body's size arguments (in order
    of first use, as its canonical text names them), so the key depends neither on export's numbering nor on
    the example's sizes."""
    v = p.meta["val"]
    try:
        stride, (offset,) = tg.sizes_of(v.stride(), p.graph), tg.sizes_of([v.storage_offset()], p.graph)
    except tg.Unsupported:  # a size no input has (no generated candidate takes such a body): as export names it
        stride, offset = tuple(v.stride()), v.storage_offset()
    return f"{tuple(stride)}+{offset}"


def _warn(kb: KernelBody, backend: str, e: Exception, on: str = "") -> None:
    """The warning of a candidate dropped: its build failed, or (`on`: which input) it ran wrong or failed on it."""
    what = f"kernel {kb.key} ({kb.kind})"
    what = f"failed on {on} for {what}" if on else f"could not build {what}"
    msg = f"fxcc: {backend} {what}: {type(e).__name__}: {e}; using another backend"
    warnings.warn(msg, stacklevel=2)


class Probe:
    """What the graph feeds each kernel, for timing it as it will run: which inputs are the model's
    parameters (a backend may keep a derived copy of those, such as packed weights, across calls), and,
    from the compile's example inputs run once through the graph on first need, the values of its
    boolean and integer inputs (masks, indices, lengths: small tensors)."""

    def __init__(self, gm: fx.GraphModule, example: tuple):
        self.gm, self.example, self.seen = gm, example, None
        self._params: dict[str, set[int]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in KERNEL_OPS and n.args[1] not in self._params:
                self._params[n.args[1]] = {i for i, a in enumerate(n.args[0])
                                           if isinstance(a, fx.Node) and a.op == "get_attr"}

    def params(self, kb: KernelBody) -> set[int]:
        return self._params.get(kb.key, set())

    def __call__(self, kb: KernelBody) -> dict[int, torch.Tensor]:
        if not any(_is_data(p) for p in kb.body.graph.nodes if p.op == "placeholder") or not self.example:
            return {}
        if self.seen is None:
            self.seen = self._run()
        return self.seen.get(kb.key, {})

    def _run(self) -> dict[str, dict[int, torch.Tensor]]:
        seen: dict[str, dict[int, torch.Tensor]] = {}

        class Recorder(fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target not in KERNEL_OPS:
                    return super().call_function(target, args, kwargs)
                ins, key = args[0], args[1]  # the body's key; a graph after codegen also holds its choice
                seen.setdefault(key, {i: t for i, t in enumerate(ins)
                                      if isinstance(t, torch.Tensor) and not t.dtype.is_floating_point})
                return list(kernel_body(key).body(*ins))  # as written: kernels built so far play no part
        try:
            with torch.no_grad():
                Recorder(self.gm).run(*ir.flatten_inputs(*self.example)[0])
        except Exception as e:  # timing on random masks is still correct, only less representative
            log.info("codegen times kernels on random masks and indices: the example inputs did not "
                     "run through the graph (%s: %s)", type(e).__name__, e)
        return seen


def _is_data(p: fx.Node) -> bool:
    v = p.meta.get("val")
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point


def example_inputs(kb: KernelBody, target: str, real: dict[int, torch.Tensor] | None = None,
                   params: set[int] = frozenset(), sizes: dict | None = None) -> list[torch.Tensor]:
    """Inputs shaped, strided and typed like the kernel's placeholders: random (a fixed seed), except the
    entries of `real` (placeholder index -> the value the model feeds it) that match their placeholder.
    The placeholders in `params` come as parameters, as the model's own do. Symbolic sizes take their
    example's values, or those in `sizes` (symbol -> value: `other_sizes`). They are drawn on the target device:
    drawn on the host and copied, GPU-sized inputs took most of a compile (14 of hinge_loss's 18 s, 36 of an LSTM
    cell loop's 89, on an H100's host)."""
    device = torch.device(target)
    gen = torch.Generator(device=device).manual_seed(0)
    out = []

    def value(s) -> int:
        return int(s.node.expr.xreplace(sizes)) if sizes and ir.is_symbolic(s) else ir.hint(s)

    for i, p in enumerate(n for n in kb.body.graph.nodes if n.op == "placeholder"):
        v = p.meta["val"]
        r = (real or {}).get(i)
        shape, stride, offset = tuple(map(value, v.shape)), tuple(map(value, v.stride())), value(v.storage_offset())
        size = offset + ir.extent(shape, stride)
        if v.dtype.is_floating_point:  # drawn in float32: not every float type has a normal sampler (fp8)
            base = torch.randn(size, generator=gen, device=device).to(v.dtype)
        elif v.dtype.is_complex:  # rotary embeddings written with complex numbers (DeepSeek-V2)
            base = torch.randn(size, generator=gen, dtype=v.dtype, device=device)
        elif v.dtype == torch.bool:
            base = torch.rand(size, generator=gen, device=device) > 0.2
        else:
            base = torch.randint(0, 8, (size,), generator=gen, dtype=v.dtype, device=device)
        t = base.as_strided(shape, stride, offset)
        if r is not None and tuple(r.shape) == shape and r.dtype == v.dtype:
            # a broadcast (stride-0) dimension is one slice in memory; the values are alike along it
            at = tuple(0 if st == 0 and n > 1 else slice(None) for n, st in zip(shape, stride))
            t[at].copy_(r[at])
        out.append(torch.nn.Parameter(t, requires_grad=False) if i in params else t)
    return out


def other_sizes(kb: KernelBody) -> dict | None:
    """For a kernel of symbolic sizes, values of its symbols other than the example's (each moved by the same
    step, so relations between them hold, within each symbol's range): None for a static kernel or when no
    step fits the ranges."""
    syms: dict = {}
    for p in kb.body.graph.nodes:
        v = p.meta.get("val") if p.op == "placeholder" else None
        for s in (*v.shape, *v.stride(), v.storage_offset()) if isinstance(v, torch.Tensor) else ():
            if ir.is_symbolic(s):
                syms.update(dict.fromkeys(s.node.expr.free_symbols, s.node.shape_env))
    if not syms:
        return None
    fits = []
    for step in (3, 2, -1, 1, -3, 7):
        out = {}
        for sym, env in syms.items():
            hints = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
            value, rng = int(hints[sym]) + step, env.var_to_range.get(sym)
            if value < 2 or (rng is not None and not (rng.lower <= value <= rng.upper)):
                break
            out[sym] = sympy.Integer(value)
        else:
            fits.append(out)
    # preferably odd sizes: a size that is a multiple of the vector width hides a wrong remainder loop
    return next((o for o in fits if all(v % 2 for v in o.values())), fits[0] if fits else None)


def _same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` over a copy of its storage: the same strides and offset, broadcast dimensions included."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride())


def sizes_text(kb: KernelBody, sizes: dict) -> str:
    """`other_sizes`' values as a check's warning names them: each symbol with its value there and the example's."""
    hints = {}
    for p in kb.body.graph.nodes:
        v = p.meta.get("val") if p.op == "placeholder" else None
        for s in (*v.shape, *v.stride(), v.storage_offset()) if isinstance(v, torch.Tensor) else ():
            if ir.is_symbolic(s) and s.node.expr in sizes:
                hints[s.node.expr] = ir.hint(s)
    return "the inputs at other sizes (" + ", ".join(
        f"{sym}={int(v)}" + (f" for {hints[sym]}" if sym in hints else "") for sym, v in sizes.items()) + ")"


def edge_inputs(inputs: list[torch.Tensor],
                params: Iterable[int] = ()) -> list[tuple[list[torch.Tensor], float, str]]:
    """Inputs a kernel must get right beyond the random example, each with the tolerance it is checked to and
    what it is (for the warning of a candidate that fails on it):
    boolean masks whose first row along the last dim is all False (an attention row with no key: eager gives
    zeros), at the dtype's tolerance; and large magnitudes in the floating activations, at 1e-2, since they are
    there to catch overflow (inf, NaN, a saturation gone wrong), and a sum of terms 1e3 times larger, summed in
    another order, then squashed by tanh or a norm, differs from eager's by more than fp32's 1e-4 (the pooler
    of a BERT: 2e-3 where the GEMM's terms cancel). Parameters (the indices in `params`) keep their values.
    Non-finite inputs are not among them:
    eager's own result for them depends on its kernel path (a score that is -inf by masking gives a zero row,
    one that is -inf by arithmetic gives NaN), so no candidate could be held to it."""
    params = set(params)
    out = []
    masks = [i for i, x in enumerate(inputs) if x.dtype == torch.bool and x.dim() >= 1 and x.numel()]
    if masks:
        x = list(inputs)
        for i in masks:  # in the kernel's layout: a clone of a broadcast (stride-0) mask would not be
            x[i] = _same_layout_copy(inputs[i])
            row = x[i][(0,) * (x[i].dim() - 1)]
            (row[:1] if row.stride(-1) == 0 else row).fill_(False)  # a row broadcast along the last dim: one place
        out.append((x, 0.0, "the edge inputs with an all-False mask row"))
    big = [i for i, x in enumerate(inputs) if i not in params and x.numel()
           and x.dtype in (torch.float32, torch.float64, torch.bfloat16)]
    if big:
        out.append(([x * 1e3 if i in big else x for i, x in enumerate(inputs)], 1e-2,
                    "the edge inputs at 1e3 times the example's magnitude"))
    return out
