"""Every knob in one place: CompileOptions (one compile), Settings (the process: environment variables map
onto it and nowhere else) and the constants that version what the artifact cache holds."""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .logs import parse as parse_logs

TARGETS = ("auto", "cpu", "cuda")
TUNE_MODES = ("off", "cached", "search")
TVM_POOLS = ("openmp", "tvm")
# torch.compile's modes in fxcc's options: "max-autotune" tunes every kernel now (tune="search"); fxcc replays
# CUDA graphs by default where every tensor is on the GPU, so "default" and "reduce-overhead" are the same
MODES = {"default": {}, "reduce-overhead": {"cuda_graphs": True},
         "max-autotune": {"tune": "search", "cuda_graphs": True},
         "max-autotune-no-cudagraphs": {"tune": "search", "cuda_graphs": False}}

# part of every kernel choice's cache key: bump when a backend gains a candidate, so that choices cached before
# it existed are measured again instead of reused (2: extern's MKL packed-weight GEMM; 3: padding-aware
# attention, TVM GEMMs on packed weights, timing on real masks and parameters; 4: TVM kernels of symbolic sizes;
# 5: tvm+wxt, the library GEMM as weight @ input.T under a generated epilogue; 6: tvm+rows, the generated GEMM on
# the weight as it is; 7: tvm+rows prefetches the next column tile's weight rows)
CANDIDATES = "7"


@dataclass(frozen=True)
class Settings:
    """Process-wide settings, read from the environment when asked for (`settings()`).

    cache_dir: the artifact cache (FXCC_CACHE_DIR, default ~/.cache/fxcc).
    cache_shared, cache_trust: a read-only team cache searched after your own (FXCC_CACHE_SHARED, a directory)
        and the key file that signed its entries (FXCC_CACHE_TRUST); used only when both are set.
    tvm_pool: where TVM kernels run their parallel loops: "openmp" (torch's threads, default) or "tvm"
        (TVM's own pool) (FXCC_TVM_POOL).
    triton_interpret: let the Triton backend build for the CPU under Triton's interpreter (tests):
        FXCC_TRITON_INTERPRET=1 together with Triton's own TRITON_INTERPRET=1.
    triton_welford: a looped Triton row reduction accumulates a mean and the squared deviations from it in one
        pass over the row (Welford); FXCC_TRITON_WELFORD=0 gives the variance a loop of its own after the mean's.
    verify_each, print_ir_after: FXCC_VERIFY_EACH=1, FXCC_PRINT_IR_AFTER=raise,fuse (added to CompileOptions;
        pass names are checked where the pipeline is known, at `fxcc.compile`).
    logs: FXCC_LOGS=recompiles,+passes: log topics and levels (fxcc.logs).
    A value fxcc does not know (FXCC_VERIFY_EACH=maybe, FXCC_LOGS=typo) is an error listing the valid ones.
    check_eager: FXCC_CHECK_EAGER=0 turns CompileOptions.check_eager off; FXCC_CHECK_EAGER=always makes a
        first-call check (check_eager=True) check every call.
    time_vs_eager: FXCC_TIME_VS_EAGER=0 turns CompileOptions.time_vs_eager off (tests of generated code use it).
    settle_tries: FXCC_SETTLE_TRIES=n: a decision made by measurement and cached (a kernel's choice, compiled vs
        eager, the TVM pool) whose timings were too noisy to settle it is measured again by the next compile, up to
        n compiles in all (default 3); then its last outcome is final. 1: the first measurement is final.
    int4_loops: FXCC_INT4_LOOPS=1,2: the decode inner loops whose configs int4_linear's first call measures beside
        loop 0's (fxcc.codegen.triton_int4.LOOPS); default 1, `0` loop 0 alone.
    """

    cache_dir: str
    cache_shared: str | None = None
    cache_trust: str | None = None
    tvm_pool: str = "openmp"
    triton_interpret: bool = False
    triton_welford: bool = True
    verify_each: bool = False
    print_ir_after: tuple[str, ...] = ()
    check_eager: bool | str = True
    time_vs_eager: bool = True
    logs: tuple[tuple[str, int], ...] = ()
    settle_tries: int = 3
    int4_loops: tuple[int, ...] = (1,)


BOOLEANS = {"": False, "0": False, "false": False, "no": False, "off": False,
            "1": True, "true": True, "yes": True, "on": True}


def _flag(env: os._Environ | dict, name: str) -> bool:
    value = env.get(name, "")
    if value.strip().lower() not in BOOLEANS:
        raise ValueError(f"{name}={value!r} is not a yes/no value; use one of 1, 0, true, false, yes, no, on, off "
                         f"(or leave {name} unset)")
    return BOOLEANS[value.strip().lower()]


def _check_eager(env: os._Environ | dict) -> bool | str:
    """FXCC_CHECK_EAGER: "always" (every call), else a yes/no value (the first call of each signature, or none)."""
    value = env.get("FXCC_CHECK_EAGER", "").strip()
    if not value:
        return True
    return "always" if value.lower() == "always" else _flag(env, "FXCC_CHECK_EAGER")


# every FXCC_* variable fxcc reads (Settings above), and those only fxcc's own tests read
ENVIRONMENT = ("FXCC_CACHE_DIR", "FXCC_CACHE_SHARED", "FXCC_CACHE_TRUST", "FXCC_TVM_POOL", "FXCC_TRITON_INTERPRET",
               "FXCC_TRITON_WELFORD", "FXCC_VERIFY_EACH", "FXCC_PRINT_IR_AFTER", "FXCC_LOGS", "FXCC_CHECK_EAGER",
               "FXCC_TIME_VS_EAGER", "FXCC_SETTLE_TRIES", "FXCC_INT4_LOOPS", "FXCC_DECODE_LOOP")
TEST_ENVIRONMENT = ("FXCC_UPDATE_GOLDEN", "FXCC_BREADTH_ALL", "FXCC_FUZZ_SEEDS")
_warned_names: set[str] = set()


def _warn_unknown_names(env: os._Environ | dict) -> None:
    """One warning per process for each FXCC_* variable fxcc does not read (a typo would otherwise do nothing)."""
    for name in env:
        if name.startswith("FXCC_") and name not in ENVIRONMENT + TEST_ENVIRONMENT and name not in _warned_names:
            _warned_names.add(name)
            close = difflib.get_close_matches(name, ENVIRONMENT, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            warnings.warn(f"fxcc does not read the environment variable {name}; {hint}fxcc reads "
                          f"{', '.join(ENVIRONMENT)}", UserWarning, stacklevel=3)


def settings() -> Settings:
    """The settings the environment gives now (read at every call: tests and tools change it)."""
    env = os.environ
    _warn_unknown_names(env)
    pool = env.get("FXCC_TVM_POOL", "openmp")
    if pool not in TVM_POOLS:
        raise ValueError(f"FXCC_TVM_POOL={pool!r}; use one of {', '.join(TVM_POOLS)}")
    return Settings(
        cache_dir=env.get("FXCC_CACHE_DIR") or str(Path.home() / ".cache" / "fxcc"),
        cache_shared=env.get("FXCC_CACHE_SHARED") or None,
        cache_trust=env.get("FXCC_CACHE_TRUST") or None,
        tvm_pool=pool,
        triton_interpret=env.get("TRITON_INTERPRET") == "1" and _flag(env, "FXCC_TRITON_INTERPRET"),
        triton_welford=_flag(env, "FXCC_TRITON_WELFORD") if env.get("FXCC_TRITON_WELFORD", "").strip() else True,
        verify_each=_flag(env, "FXCC_VERIFY_EACH"),
        print_ir_after=tuple(x.strip() for x in env.get("FXCC_PRINT_IR_AFTER", "").split(",") if x.strip()),
        logs=parse_logs(env.get("FXCC_LOGS", "")),
        check_eager=_check_eager(env),
        time_vs_eager=_flag(env, "FXCC_TIME_VS_EAGER") if env.get("FXCC_TIME_VS_EAGER", "").strip() else True,
        settle_tries=_settle_tries(env),
        int4_loops=_int4_loops(env))


def _int4_loops(env: os._Environ | dict) -> tuple[int, ...]:
    raw = env.get("FXCC_INT4_LOOPS", "").strip()
    if not raw:
        return Settings.int4_loops
    parts = [x.strip() for x in raw.split(",")]
    if any(x not in ("0", "1", "2") for x in parts):
        raise ValueError(f"FXCC_INT4_LOOPS={raw!r}: give the int4 decode loops to measure beside loop 0, among 1 "
                         "(MMA on weights dequantized in registers) and 2 (CUDA cores), comma-separated, or 0 for "
                         "loop 0 alone")
    return tuple(sorted({int(x) for x in parts} - {0}))


def _settle_tries(env: os._Environ | dict) -> int:
    raw = env.get("FXCC_SETTLE_TRIES", "").strip()
    if not raw:
        return Settings.settle_tries
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"FXCC_SETTLE_TRIES={raw!r}: give the number of compiles (1 or more) that measure an "
                         "unsettled decision before its outcome is final")
    return int(raw)


@dataclass(frozen=True)
class CompileOptions:
    """Options of one `fxcc.compile`.

    target: "auto" (the device of the model's parameters), "cpu" or "cuda".
    passes: pipeline text; None means the default pipeline.
    tune: "off" (defaults), "cached" (tuned parameters from the artifact cache), "search" (tune now).
    tune_budget: Optuna trials per kernel when tuning; None means the tuner's default (30).
    cuda_graphs: on CUDA, capture each static-shape variant as one CUDA graph and replay it.
    graph_cache: keep the IR before codegen in the artifact cache, so a warm compile skips capture and the
        graph passes (see fxcc.graph_cache for what its key covers; turn off for a forward that reads
        mutable globals).
    plan: a plan file written by `fxcc search`: it pins every choice (pipeline, mixed-precision assignment,
        kernels, CUDA graph, compiled or eager), and the compile applying it times and searches nothing.
    quality_budget: largest quality loss approximate passes may spend.
    verify_each: re-check shapes/dtypes with FakeTensors after every pass (env FXCC_VERIFY_EACH=1).
    print_ir_after: pass names (or "all") whose output IR is printed (env FXCC_PRINT_IR_AFTER=raise,fuse).
    max_variants: compiled variants (input shapes/dtypes) of one input structure (the call's pytree: a generate's
        prefill and its decode steps are two), and input structures, kept before new signatures run eagerly; all
        variants together at most twice as many.
    dycl: when capture fails on tensor-dependent control flow, split the program into compiled segments
        and a generated host program (fxcc.dycl); False keeps the CaptureError.
    check_eager: compare the first call of each compiled signature with eager (fxcc.eager_check); where
        they differ, that signature runs eagerly, with a warning (env FXCC_CHECK_EAGER=0 turns it off).
        "always" (env FXCC_CHECK_EAGER=always) compares every call, for debugging: each costs an eager run (and
        copies of its inputs); a call that differs returns eager's result, its variant runs eagerly from then
        on, and the warning and `explain()` name the call, the output and where it first differs (the kernel,
        or a DyCL program's segment).
    dynamic: symbolic sizes (fxcc.dynamic). None: the first compile is static and a size that changes
        recompiles once with that dimension symbolic (calls with a KV cache: symbolic from the start);
        True: every dimension symbolic from the first compile; False: one static variant per shape.
    time_vs_eager: time each compiled variant against eager on the example inputs and run eagerly where the
        compiled one is slower (with a warning; fxcc.autotune.vs_eager). Env FXCC_TIME_VS_EAGER=0 turns it off.
    fullgraph: as torch.compile's: whatever would not run as one compiled graph is an error naming the reason
        (a DyCL split, a signature that would run eagerly, a call in training mode with gradients enabled)
        instead of a warning and eager. Ops without a kernel inside the graph still run as torch ops.
    """

    target: str = "auto"
    passes: str | None = None
    tune: str = "cached"
    tune_budget: int | None = None
    cuda_graphs: bool = True
    graph_cache: bool = True
    plan: str | None = None
    quality_budget: float | None = None
    verify_each: bool = False
    print_ir_after: tuple[str, ...] = ()
    max_variants: int = 8
    dycl: bool = True
    check_eager: bool | str = True
    dynamic: bool | None = None
    time_vs_eager: bool = True
    fullgraph: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.check_eager, bool) or self.check_eager == "always"):
            raise TypeError(f"fxcc: check_eager must be True (the first call of each signature), False or "
                            f"'always' (every call), got {self.check_eager!r}")
        for name in ("cuda_graphs", "graph_cache", "verify_each", "dycl", "time_vs_eager", "fullgraph"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"fxcc: {name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.print_ir_after, (tuple, list)) or not all(isinstance(x, str)
                                                                         for x in self.print_ir_after):
            raise TypeError(f"fxcc: print_ir_after must be a tuple of pass names (or ('all',)), got "
                            f"{self.print_ir_after!r}; e.g. print_ir_after=('raise', 'fuse')")
        object.__setattr__(self, "print_ir_after", tuple(self.print_ir_after))
        if self.target not in TARGETS:
            raise ValueError(f"fxcc: unknown target {self.target!r}; use one of {', '.join(TARGETS)}")
        if self.tune not in TUNE_MODES:
            raise ValueError(f"fxcc: unknown tune mode {self.tune!r}; use one of {', '.join(TUNE_MODES)}")
        if self.tune_budget is not None and (isinstance(self.tune_budget, bool) or not isinstance(self.tune_budget, int)
                                             or self.tune_budget < 1):
            raise ValueError(f"fxcc: tune_budget must be a positive number of trials per kernel (or None), "
                             f"got {self.tune_budget!r}")
        qb = self.quality_budget
        if qb is not None and (isinstance(qb, bool) or not isinstance(qb, (int, float)) or not 0 <= qb < 1):
            raise ValueError(f"fxcc: quality_budget is the largest quality loss (1 - min cosine) approximate passes "
                             f"may spend: a number in [0, 1) such as 0.01, or None; got {qb!r}")
        if isinstance(self.max_variants, bool) or not isinstance(self.max_variants, int) or self.max_variants < 1:
            raise ValueError(f"fxcc: max_variants must be a positive integer, got {self.max_variants!r}")
        if self.dynamic not in (None, True, False):
            raise ValueError(f"fxcc: dynamic must be None, True or False, got {self.dynamic!r}")
        if self.passes is not None and not isinstance(self.passes, str):
            raise TypeError(f"fxcc: passes must be a pipeline string, got {type(self.passes).__name__}")

    def replace(self, **changes) -> CompileOptions:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def from_env(base: CompileOptions | None = None) -> CompileOptions:
        """Apply FXCC_VERIFY_EACH, FXCC_CHECK_EAGER, FXCC_PRINT_IR_AFTER and FXCC_TIME_VS_EAGER on top of `base`."""
        opts = base or CompileOptions()
        env = settings()
        if env.verify_each:
            opts = opts.replace(verify_each=True)
        if env.check_eager is False:
            opts = opts.replace(check_eager=False)
        elif env.check_eager == "always" and opts.check_eager is True:  # a check turned off stays off
            opts = opts.replace(check_eager="always")
        if env.print_ir_after:
            opts = opts.replace(print_ir_after=opts.print_ir_after + env.print_ir_after)
        if not env.time_vs_eager:
            opts = opts.replace(time_vs_eager=False)
        return opts


# ------------------------------------------------------------------- the plan search's pass knobs


@dataclass(frozen=True)
class Knob:
    """Options of one pass that join the plan search (`fxcc search`) when the pass is registered.

    choices: option -> values to try; an empty tuple takes the option's Literal values, or True/False for a
    bool. (The parallel plan is not a pass knob: fxcc.autotune.search.Parallel.) With `alternatives`, only the first option the
    registered pass has is searched (layer-skip takes speedup= or skip=, not both). Every knob can also be
    "off" (the pass is left out). Where the pass goes follows its `reads`: aten -> before raise, else after.
    """

    pass_name: str
    choices: dict[str, tuple]
    alternatives: bool = False
    min_devices: int = 1
    fixed: dict = field(default_factory=dict)  # options set whenever the knob is on (when the pass has them)


KNOBS: list[Knob] = [
    Knob("layer-skip", {"speedup": (1.2, 1.5, 2.0), "skip": (1, 2, 3)}, alternatives=True),
    Knob("token-merge", {"r": (4, 8, 16, 32)}),
    # policy=auto chooses each layer's precision inside the pass; its own search is kept small per trial
    Knob("mixed-precision", {"budget": (0.001, 0.01, 0.05)}, fixed={"trials": 24}),
]
