"""Plan files: what `fxcc search` chose for one model on one target, as readable JSON.

A plan holds the model's fingerprint (class, parameter names/shapes/dtypes, a hash of the weights, the
input signature), the target and library versions it was measured with, and every choice a compile makes:
the pipeline text (its passes and their options), the mixed-precision assignment per linear, each kernel's
backend and parameters, whether the runtime replays a CUDA graph, and the measured latency (the whole-graph
decision against eager) and quality error. `fxcc.compile(model, plan="plan.json")` applies it with no search
and no measurement: what the plan does not name takes its deterministic default. A plan that does not match
the model, the target or the library versions is refused with a `PlanError` that says which, and what to do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fxcc.store import library_versions, target_id, tensor_bytes
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

PLAN_VERSION = 1
_REQUIRED = ("fingerprint", "target", "versions", "pipeline", "kernels")


class PlanError(ValueError):
    """A plan file that cannot be read, or does not fit the model, target or libraries it is applied to."""


@dataclass
class Plan:
    """One plan. `kernels`: kernel key -> {"backend": label, "module": backend module, "params": {...}}.

    target: {"kind": "cpu"|"cuda", "id": what kernel code depends on (device model, CPU threads)}.
    precision: the mixed-precision pass's assignment, linear (graph node) -> {"module": its module path,
    "precision": e.g. "int8-weight" or "keep", "kernel": the quantized kernel}; empty without that pass.
    cuda_graph: whether the runtime replays the compiled call as a CUDA graph (None: not decided, CPU).
    latency_ms / eager_ms: measured with the plan applied, and of the uncompiled model beside it; applying
    the plan keeps the compiled model where latency_ms <= eager_ms, else runs eagerly (no timing).
    quality_error: 1 - min cosine similarity of the outputs against the uncompiled model (0 = exact).
    parallel: the parallel plan, empty for one process: {"tp": ranks, "allreduce": "unfused" | "fused[impl]",
    "split": ratio or null, "backend": "gloo" | "nccl", "eager_threads": the threads eager was timed with}. A plan
    with tp > 1 applies in each of `tp` processes (torchrun); the pipeline holds its tp-shard and
    fuse-allreduce-rmsnorm; latency_ms is the slowest rank's.
    """

    fingerprint: dict
    target: dict
    versions: str
    pipeline: str
    kernels: dict[str, dict] = field(default_factory=dict)
    precision: dict[str, dict] = field(default_factory=dict)
    cuda_graph: bool | None = None
    latency_ms: float | None = None
    eager_ms: float | None = None
    quality_error: float | None = None
    objective: str = "latency"
    search: dict = field(default_factory=dict)
    created: str = ""
    parallel: dict = field(default_factory=dict)

    def to_json(self) -> str:
        body = {"fxcc_plan": PLAN_VERSION, **asdict(self)}
        return json.dumps(body, indent=2, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename), so a reader never sees half a plan."""
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)


def read_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan file's form (not yet whether it fits a model): PlanError naming the problem."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise PlanError(f"fxcc: cannot read plan {path!r}: {e.strerror or e}; write one with `fxcc search`") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"fxcc: plan {path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        "write it again with `fxcc search`") from None
    if not isinstance(data, dict) or "fxcc_plan" not in data:
        raise PlanError(f"fxcc: {path!r} is not an fxcc plan (no \"fxcc_plan\" version field); plans are "
                        "written by `fxcc search`")
    if data["fxcc_plan"] != PLAN_VERSION:
        raise PlanError(f"fxcc: plan {path!r} has format version {data['fxcc_plan']!r}; this fxcc reads version "
                        f"{PLAN_VERSION}. Run `fxcc search` again with this fxcc to write a current plan.")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise PlanError(f"fxcc: plan {path!r} lacks {', '.join(missing)}; write it again with `fxcc search`")
    data.pop("fxcc_plan")
    problem = _malformed(data)
    if problem:
        raise PlanError(f"fxcc: plan {path!r} is malformed: {problem}; write it again with `fxcc search`")
    known = set(Plan.__dataclass_fields__)
    return Plan(**{k: v for k, v in data.items() if k in known})


_NUMBER = (int, float)
# field -> (allowed types, what it should be); optional fields may also be null
_FIELDS = {
    "fingerprint": (dict, "an object"), "target": (dict, "an object"), "versions": (str, "text"),
    "pipeline": (str, "text"), "kernels": (dict, "an object"), "precision": (dict, "an object"),
    "cuda_graph": (bool, "true or false"), "latency_ms": (_NUMBER, "a number"),
    "eager_ms": (_NUMBER, "a number"), "quality_error": (_NUMBER, "a number"), "objective": (str, "text"),
    "search": (dict, "an object"), "created": (str, "text"), "parallel": (dict, "an object"),
}
_OPTIONAL = ("latency_ms", "eager_ms", "quality_error", "cuda_graph")


def _malformed(data: dict) -> str | None:
    """What is wrong with a plan's fields (their types, the kernel entries, the fingerprint), or None."""
    for name, (types, what) in _FIELDS.items():
        if name not in data or (data[name] is None and name in _OPTIONAL):
            continue
        v = data[name]
        if (isinstance(v, bool) and types is not bool) or not isinstance(v, types):
            return f"field {name!r} must be {what}, not {type(v).__name__} ({v!r:.60})"
    fp, target = data["fingerprint"], data["target"]
    for name, typ in (("module", str), ("weights_sha256", str), ("tensors", list), ("inputs", list)):
        if name in fp and not isinstance(fp[name], typ):
            return f"fingerprint.{name} must be {'text' if typ is str else 'a list'}"
    for name in ("kind", "id"):
        if name in target and not isinstance(target[name], str):
            return f"target.{name} must be text"
    for key, choice in data["kernels"].items():
        if not isinstance(choice, dict):
            return f"kernels[{key!r}] must be an object with backend, module and params"
        for name, typ in (("backend", str), ("module", str), ("params", dict)):
            if name in choice and choice[name] is not None and not isinstance(choice[name], typ):
                return f"kernels[{key!r}].{name} must be {'text' if typ is str else 'an object'}"
    tp = data.get("parallel", {}).get("tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        return f"parallel.tp must be a whole number of ranks >= 1, not {tp!r:.30}"
    for node, choice in data.get("precision", {}).items():
        if not isinstance(choice, dict) or not all(isinstance(choice.get(k), str) for k in ("precision", "kernel")):
            return f"precision[{node!r}] must be an object with text fields precision and kernel"
    return None


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> Plan:
    return read_plan(path)


def load_plan(path: str | os.PathLike) -> Plan:
    """`read_plan`, read once per process while the file is unchanged (codegen asks for every kernel)."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError:
        return read_plan(path)  # raises the PlanError naming the file
    return _load_cached(path, st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------- fingerprints


def model_fingerprint(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> dict:
    """Class, parameters and buffers (names, shapes, dtypes), sha256 of their values, the input signature."""
    h = hashlib.sha256()
    tensors = []
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            tensors.append(f"{name}: {str(t.dtype).replace('torch.', '')}{list(t.shape)}")
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(tensor_bytes(t))
    return {"module": _class_name(model), "tensors": tensors, "weights_sha256": h.hexdigest(),
            "inputs": input_signature(args, kwargs or {})}


def _class_name(model: nn.Module) -> str:
    """The class (or function) by qualified name within its file: the file's module name depends on how it
    was imported (`fxcc search` loads PATH.py under a private name), so it is not part of the fingerprint."""
    inner = getattr(model, "fn", None)
    if type(model).__name__ == "FunctionModule" and inner is not None:
        return getattr(inner, "__qualname__", repr(inner))
    return type(model).__qualname__


def input_signature(args: tuple, kwargs: dict) -> list[str]:
    """Every input leaf with where it sits: ["args[0]: f32[8, 16]", "kwargs['mask']: i64[8, 16]", "args[1]: 3"]."""
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(sorted(kwargs.items()))))
    out = []
    for path, x in leaves:
        where = ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
        if isinstance(x, torch.Tensor):
            out.append(f"{where}: {str(x.dtype).replace('torch.', '')}{list(x.shape)} {x.device.type}")
        else:
            out.append(f"{where}: {x!r:.60}")
    return out


def target_info(kind: str) -> dict:
    """The plan's target: its kind and the id kernel code and timings depend on (see codegen.target_id)."""
    return {"kind": kind, "id": target_id(kind), "devices": torch.cuda.device_count() if kind == "cuda" else 1}


# ---------------------------------------------------------------------------------------- validation


def check_versions(plan: Plan, where: str) -> None:
    """Refuse a plan measured with other library versions (generated code and timings depend on them)."""
    now = library_versions()
    if plan.versions == now:
        return
    then_d = dict(p.split("=", 1) for p in plan.versions.split(";") if "=" in p)
    now_d = dict(p.split("=", 1) for p in now.split(";") if "=" in p)
    diff = [f"{k} {then_d.get(k, 'absent')} in the plan, {now_d.get(k, 'absent')} here"
            for k in sorted(set(then_d) | set(now_d)) if then_d.get(k) != now_d.get(k)]
    raise PlanError(f"fxcc: plan {where} was searched with other library versions ({'; '.join(diff)}). "
                    "Run `fxcc search` again with these libraries, or install the versions the plan names.")


def check_target(plan: Plan, kind: str, where: str) -> None:
    """Refuse a plan made for another target: another device kind, device model or CPU thread count."""
    if plan.target.get("kind") != kind:
        raise PlanError(f"fxcc: plan {where} was searched for target {plan.target.get('kind')!r}, but this compile "
                        f"targets {kind!r}. Compile with target={plan.target.get('kind')!r} (and the model on that "
                        "device), or run `fxcc search --target` for this one.")
    now = target_id(kind)
    if plan.target.get("id") != now:
        then, here = str(plan.target.get("id")), now
        hint, threads = "", re.search(r"threads=(\d+)", then)
        if threads and re.sub(r"threads=\d+", "", then) == re.sub(r"threads=\d+", "", here):
            hint = f" Only the thread count differs: call torch.set_num_threads({threads[1]}) first."
        raise PlanError(f"fxcc: plan {where} was searched on {then!r}; this process compiles for {here!r}. "
                        f"Kernel choices and timings do not carry over.{hint} Otherwise run `fxcc search` here.")


def check_model(plan: Plan, model: nn.Module, args: tuple, kwargs: dict, where: str) -> None:
    """Refuse a plan made for another model (class, parameters or weights); warn on other input shapes."""
    fp = model_fingerprint(model, args, kwargs)
    want = plan.fingerprint
    what = None
    if fp["module"] != want.get("module"):
        what = f"it was made for {want.get('module')!r}, this model is {fp['module']!r}"
    elif fp["tensors"] != want.get("tensors"):
        what = _first_tensor_difference(want.get("tensors") or [], fp["tensors"])
    elif fp["weights_sha256"] != want.get("weights_sha256"):
        what = "the parameter names, shapes and dtypes match but the weight values differ (other checkpoint?)"
    if what:
        raise PlanError(f"fxcc: plan {where} does not match this model: {what}. Run `fxcc search` for this "
                        "model, or compile the model the plan was searched for.")
    if fp["inputs"] != want.get("inputs"):
        warnings.warn(f"fxcc: plan {where} was searched with inputs {want.get('inputs')}; this call passes "
                      f"{fp['inputs']}. The plan's pipeline applies; kernels the plan does not name use the "
                      "artifact cache's or default choices.", stacklevel=3)


def _first_tensor_difference(want: list, got: list) -> str:
    w = dict(str(x).split(": ", 1) for x in want)
    g = dict(str(x).split(": ", 1) for x in got)
    for name in w:
        if name not in g:
            return f"this model has no parameter or buffer {name!r}"
    for name in g:
        if name not in w:
            return f"this model has {name!r}, which the plan's model had not"
    for name, typ in w.items():
        if g[name] != typ:
            return f"{name!r} is {g[name]} here, {typ} in the plan's model"
    return "its parameters are in another order"


def plan_options(opts: Any) -> Any:
    """CompileOptions for `compile(plan=...)`: checks the plan's form, versions and (when explicit) target,
    and takes its pipeline. The model is checked at the first call (`check_call_plan`)."""
    path = os.path.abspath(os.fspath(opts.plan))
    plan = load_plan(path)
    where = repr(os.fspath(opts.plan))
    check_versions(plan, where)
    if opts.target != "auto":
        check_target(plan, opts.target, where)
    if opts.passes is not None and opts.passes != plan.pipeline:
        raise PlanError(f"fxcc: plan {where} sets the pipeline ({plan.pipeline!r}); passes={opts.passes!r} "
                        "conflicts with it. Give either passes= or plan=.")
    join_ranks(plan, where)
    budget = opts.quality_budget
    if budget is not None and plan.quality_error is not None and plan.quality_error > budget:
        raise PlanError(f"fxcc: plan {where} measured a quality error of {plan.quality_error:.3g}, over "
                        f"quality_budget={budget:g}. Search again with `--quality-budget {budget:g}`.")
    return opts.replace(plan=path, passes=plan.pipeline)


def join_ranks(plan: Plan, where: str) -> None:
    """A parallel plan runs in `tp` processes: the process group is the caller's, or, when none is initialised,
    fxcc's from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with the plan's backend."""
    tp = plan.parallel.get("tp", 1)
    if tp == 1:
        return
    import torch.distributed as dist

    how = f"launch it with `torchrun --nproc-per-node {tp} your_script.py`"
    if not dist.is_available():
        raise PlanError(f"fxcc: plan {where} runs on {tp} ranks; this torch has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise PlanError(f"fxcc: plan {where} runs on {tp} ranks, one process each, and this process is not one "
                            f"of them (no process group, and {', '.join(missing)} unset): {how}")
        backend = plan.parallel.get("backend") or ("nccl" if plan.target.get("kind") == "cuda" else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group(backend)
        log.info("plan %s: joined process group (%s) as rank %d of %d", where, backend, dist.get_rank(),
                 dist.get_world_size())
    if dist.get_world_size() != tp:
        raise PlanError(f"fxcc: plan {where} runs on {tp} ranks; this process group has {dist.get_world_size()}: "
                        f"{how}")


def check_call_plan(opts: Any, model: nn.Module, args: tuple, kwargs: dict, target: str) -> None:
    """At a variant's compile: the plan must fit this model, these inputs' target, and these libraries."""
    plan = load_plan(opts.plan)
    where = repr(opts.plan)
    check_versions(plan, where)
    check_target(plan, target, where)
    check_model(plan, model, args, kwargs, where)


def plan_kernel(path: str, key: str) -> dict | None:
    """The plan's choice for kernel `key` (backend label, module, params), or None when it names none."""
    return load_plan(path).kernels.get(key)
