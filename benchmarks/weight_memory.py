"""Tensor memory a compiled model keeps alive, against its parameter bytes.

    python benchmarks/weight_memory.py [--models llama bert gpt2] [--no-tp] [--load model state_dict safetensors]
                                       [--breakdown]

For each tiny config (random weights, CPU, fp32): compile with the default pipeline, call once, then drop
every reference the script holds to the model and its parameters (the compiled object still holds the
module), collect garbage and count the bytes of live tensor storage: every tensor the garbage collector
tracks plus those the compiled module reaches (bound constants, the backends' packed copies), deduplicated
by storage. "ratio" is live / parameter bytes: 1.0 means each weight is held once. The model is called once more
after the drop: at that call the compiled module finds itself the model's only holder and holds the weights its
kernels read only as oneDNN's packed copies as those copies alone (fxcc.held). The inputs and outputs of the calls
are dropped too; what remains is weights, constants and the kernels' scratch buffers.
`--breakdown` prints those bytes by owner: the model's weights, each backend's packed copies, the graphs' constants
and the rest (the kernels' scratch buffers).

The tp rows compile Llama with `tp-shard{tp=2}` in two processes (gloo) and report each rank's live bytes
against the whole model's parameter bytes (the goal is about 0.5 per rank). "graph MB" is what tp-shard left in
that rank's graph (replicated norms and embeddings, half of every projection). Once the compiled module is the
model's only holder (the call after the drop), a rank lets go of the whole projections its graph holds only shards
of: their bytes go to an unnamed file under the artifact cache's directory and come back from there, bit for bit,
when state_dict, an attribute or the eager fallback reads the model (fxcc.held). `--passes` applies to the tp rows
too (tp-shard inserted after raise); `--breakdown` prints each rank's live MB by owner as well.

`--load state_dict` / `safetensors` build the model on the meta device and compile it with
`fxcc.compile(model, state_dict=...)` (the dict dropped after the compile, the file written first): the graph
holds each weight once and each tp rank reads only its shards.

The backends' packed weight copies (oneDNN's blocked layout and MKL's packed panels, opaque tensors counted by
their elements' bytes; TVM's column panels) are bounded by the codegen pass: `codegen{packed=0.05}` lets them
take at most 0.05 of the graph's parameter bytes, `codegen{packed=100}` (the default) bounds nothing (what either
costs in speed: benchmarks/packed_speed.py). For the weights a pass derives alone, pass
`--passes "decompose,canonicalize,raise,merge-linears,fuse,codegen{backend=extern}"`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import weakref

import torch

MB = 2**20


def llama():
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=4096)
    return LlamaModel(cfg).eval(), torch.randint(0, 4096, (1, 32)), {"use_cache": False}


def bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                     vocab_size=4096)
    return BertModel(cfg, add_pooling_layer=False).eval(), torch.randint(0, 4096, (1, 32)), {}


def gpt2():
    from transformers import GPT2Config, GPT2Model
    cfg = GPT2Config(n_embd=512, n_layer=4, n_head=8, vocab_size=4096, n_positions=128)
    return GPT2Model(cfg).eval(), torch.randint(0, 4096, (1, 32)), {"use_cache": False}


MODELS = {"llama": llama, "bert": bert, "gpt2": gpt2}


def _storages(objs) -> dict[int, int]:
    """Storage data pointer -> bytes of every tensor among `objs` (and the tensors inside containers they
    hold, one level down: the backends' packed-weight caches keep tuples)."""
    out: dict[int, int] = {}

    def add(t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu":
            return  # FakeTensors in graph metadata hold no memory
        if t.is_mkldnn:  # an opaque oneDNN / MKL packed weight: no storage to ask; its elements' bytes
            out[-id(t)] = t.numel() * t.element_size()
            return
        try:  # the address read without asking for write access: a copy-on-write snapshot stays shared
            base = torch._C._data_address(t)  # the storage's data pointer
            n = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if base and n:
            out[base] = max(out.get(base, 0), n)

    for o in objs:
        add(o)
    return out


def live_bytes() -> int:
    """Bytes of all live CPU tensor storage the garbage collector can see, each storage once."""
    return sum(live_storages().values())


def live_storages() -> dict[int, int]:
    """Every live CPU tensor storage the garbage collector can see (`_storages`' keys) and its bytes."""
    gc.collect()
    objs = gc.get_objects()
    # tensors inside untracked containers (tuples of tensors are untracked once they hold only atomics): look
    # one level into every tracked container as well
    extra = []
    for o in objs:
        if type(o) in (dict, list, tuple):
            vals = list(o.values()) if type(o) is dict else o
            try:
                for v in vals:
                    if type(v) in (torch.Tensor, torch.nn.Parameter):
                        extra.append(v)
                    elif type(v) is tuple:
                        extra.extend(x for x in v if type(x) in (torch.Tensor, torch.nn.Parameter))
            except RuntimeError:
                continue
    return _storages(objs + extra)


def _store_values(store: dict) -> list[torch.Tensor]:
    """The tensors a derived-weight store keeps (fxcc.codegen.derived: id -> (weakref, snapshots, key, value))."""
    vals = [e[3] for e in store.values()]
    return [x for v in vals for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, torch.Tensor)]


def owners(compiled, model_tensors: dict[int, int]) -> list[tuple[str, dict[int, int]]]:
    """(owner, its storages) in the order `breakdown` attributes a storage: the first owner that holds it counts it."""
    from fxcc.codegen import mkl, onednn, quant, tvm
    out = [("the model's parameters and buffers (merged weights: their rows are the model's)", model_tensors)]
    # TVM's panels apart by what they pack: the model's own parameters, or a weight a pass made (merged Q/K/V and
    # gate/up, whose rows are the model's parameters)
    own = {k: e for k, e in tvm._PANELS.items() if isinstance(e[0](), torch.nn.Parameter)}
    made = {k: e for k, e in tvm._PANELS.items() if k not in own}
    out += [(f"packed copies: {name}", _storages(_store_values(store)))
            for name, store in (("oneDNN blocked", onednn._PACKED), ("MKL packed", mkl._PACKED),
                                ("TVM column panels of parameters", own),
                                ("TVM column panels of merged weights", made), ("TVM aligned copies", tvm._ALIGNED),
                                ("int8 packed", quant._PACKED))]
    graph = []
    for v in compiled.variants:  # what the graphs hold: folded constants, weights a pass derived or loaded
        for n in v.gm.graph.nodes:
            if n.op == "get_attr":
                obj = v.gm
                for part in n.target.split("."):
                    obj = getattr(obj, part, None)
                graph.append(obj)
        graph += v.bound  # where only TVM kernels read a loaded constant as panels, the panels in its place
    out.append(("graph constants (folded, derived by a pass, loaded from a checkpoint; held as TVM column panels "
                "where only those read it)", _storages(graph)))
    return out


def breakdown(new: dict[int, int], compiled, model_tensors: dict[int, int]) -> list[tuple[str, float]]:
    """MB of the storages in `new` (live after the compile, not before) by owner; what no owner names is the
    kernels' scratch buffers (reused across calls) and anything else alive."""
    left, rows = dict(new), []
    for name, held in owners(compiled, model_tensors):
        rows.append((name, sum(left.pop(k) for k in list(left) if k in held) / MB))
    rows.append(("other: kernels' scratch buffers, caches", sum(left.values()) / MB))
    return rows


def measure(make, passes: str | None = None, load: str = "model", tmp: str = "",
            parts: list | None = None) -> tuple[float, float, float | None]:
    """(parameter MB, live MB, graph MB) of the compiled model once the script's references are dropped; graph
    MB: the constants tp-shard left in this rank's graph (its `param_bytes`), None without tp-shard. `parts`, if
    given, receives the live MB by owner (`breakdown`).

    load "model": fxcc.compile(model); "state_dict": the model built on the meta device, compiled with
    state_dict=<its weights> (the dict dropped after the compile); "safetensors": the same from a file written
    first (the model and its weights dropped before the compile)."""
    import fxcc
    before = live_storages()
    base = sum(before.values())
    model, ids, kwargs = make()
    params = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.state_dict().values()}.values())
    # kept compiled even where it measures slower than eager (it would be kept anyway, for fxcc.explain)
    opts = fxcc.CompileOptions(time_vs_eager=False)
    sd = None
    if load != "model":
        sd = {**model.state_dict(), **dict(model.named_buffers())}  # non-persistent buffers too (rotary)
        with torch.device("meta"):
            model = make()[0]
        if load == "safetensors":
            from safetensors.torch import save_file
            path = os.path.join(tmp, f"weights{os.getpid()}.safetensors")
            save_file({k: v.contiguous() for k, v in sd.items()}, path)
            sd = path
    compiled = fxcc.compile(model, passes=passes, options=opts, state_dict=sd)
    del sd
    with torch.no_grad():
        out = compiled(ids, **kwargs)
    tp = [r.result.stats for r in compiled.variants[-1].records if r.spec.startswith("tp-shard")]
    graph = tp[0]["param_bytes"] / MB if tp else None
    ref = weakref.ref(next(model.parameters()))
    held = _storages(list(model.parameters()) + list(model.buffers()))  # after the compile: merged rows moved
    del model, out
    with torch.no_grad():  # the first call after the caller let go: the compiled module may hold weights once
        compiled(ids, **kwargs)
    del ids, kwargs
    now = live_storages()
    live = sum(now.values()) - base
    if parts is not None:
        parts += breakdown({k: n for k, n in now.items() if k not in before}, compiled, held)
    assert ref() is not None  # the compiled module holds the model (on the meta device when loaded)
    del compiled
    gc.collect()
    return params / MB, live / MB, graph


def _tp_worker(rank: int, port: int, q, passes: str | None, load: str, tmp: str, by_owner: bool) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        parts = [] if by_owner else None
        q.put((rank, (measure(llama, _tp_pipeline(passes), load, tmp, parts), parts)))
    except Exception as e:  # reported by the parent
        q.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


def _tp_pipeline(passes: str | None) -> str:
    """`passes` (default: fxcc's default pipeline) with tp-shard{tp=2} right after raise."""
    from fxcc.pipeline import DEFAULT_PIPELINE
    steps = (passes or DEFAULT_PIPELINE).split(",")
    at = steps.index("raise") + 1 if "raise" in steps else 1
    return ",".join(steps[:at] + ["tp-shard{tp=2}"] + steps[at:])


def tp_rows(passes: str | None, load: str, tmp: str, breakdown: bool = False) -> list[tuple]:
    """(row name, (param MB, live MB, graph MB) or the error, live MB by owner or None) for each rank."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_tp_worker, args=(r, port, q, passes, load, tmp, breakdown)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    return [(f"llama tp=2 rank {r} {load}", *(got[r] if isinstance(got[r], tuple) else (got[r], None)))
            for r in sorted(got)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--passes", default=None, help="pipeline (default: fxcc's default pipeline)")
    ap.add_argument("--no-tp", action="store_true", help="skip the tp-shard{tp=2} rows (two processes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true",
                    help="also print each row's live MB by owner: the model's weights, each backend's packed "
                         "copies, the graphs' constants, the rest (kernels' scratch buffers)")
    ap.add_argument("--load", nargs="+", default=["model", "safetensors"], choices=["model", "state_dict", "safetensors"],
                    help="how the weights reach the compile: the model itself, or a meta-device model plus "
                         "state_dict=<dict> or <.safetensors file> (fxcc.compile(..., state_dict=...))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="fxcc-weights-") as tmp:
        for load in args.load:
            for name in args.models:
                parts = [] if args.breakdown else None
                rows.append((f"{name} {load}", measure(MODELS[name], args.passes, load, tmp, parts)))
                if parts:
                    details.append((f"{name} {load}", parts))
        if not args.no_tp:
            for load in args.load:
                for name, r, parts in tp_rows(args.passes, load, tmp, args.breakdown):
                    rows.append((name, r))
                    if parts:
                        details.append((name, parts))
    print(f"torch {torch.__version__}, CPU fp32, pipeline {args.passes or 'default'}")
    print(f"{'model, weights from':<30} {'param MB':>9} {'live MB':>9} {'ratio':>6} {'graph MB':>9}")
    for name, r in rows:
        if isinstance(r, str):
            print(f"{name:<30} failed: {r}")
            continue
        p, live, graph = r
        print(f"{name:<30} {p:>9.1f} {live:>9.1f} {live / p:>6.2f} {'' if graph is None else f'{graph:>9.1f}'}")
    for name, parts in details:
        print(f"\n{name}: live MB by owner (each storage counted once, under the first owner that holds it)")
        for owner, mb in parts:
            if mb >= 0.005:
                print(f"  {mb:>8.2f}  {owner}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
