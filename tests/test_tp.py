"""Tensor parallelism: tp-shard and fuse-allreduce-rmsnorm IR, two gloo processes against eager, errors."""

from __future__ import annotations

import pytest
import torch
from fxcc import ir
from fxcc.autotune.tp_plan import CostModel, Rates, TPPlan, compare, fit_allreduce, launch, space
from fxcc.codegen.allreduce_rmsnorm import split_rows
from fxcc.options import CompileOptions
from fxcc.pipeline import PipelineError, parse_pipeline
from fxcc.runtime import CompiledModule
from fxcc.tp_bench import kernel_count, plan_graphs

pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)


def tiny_llama(layers: int = 2, **over):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(**{**TINY, "num_hidden_layers": layers, **over})).eval()


def compiled_ir(model, passes: str, ids: torch.Tensor) -> str:
    cm = CompiledModule(model, CompileOptions(passes=passes, verify_each=True))
    return ir.print_graph(cm.compile_for((ids,), {"use_cache": False}).gm)


IDS = torch.arange(8).reshape(1, 8) % 100
SHARD = "canonicalize,raise,tp-shard{tp=2,rank=1}"


def test_shard_ir(golden):
    golden("tp_shard_llama.mlir", compiled_ir(tiny_llama(1), SHARD, IDS))


def test_fuse_ir(golden):
    golden("tp_fuse_allreduce_rmsnorm.mlir", compiled_ir(tiny_llama(1), SHARD + ",fuse-allreduce-rmsnorm", IDS))


def test_fuse_split_ir_absorbs_projection():
    text = compiled_ir(tiny_llama(1), SHARD + ",fuse-allreduce-rmsnorm{split=true,ratio=0.25}", IDS)
    assert text.count("tx.linear_all_reduce_rms_norm(") == 2
    assert "tx.all_reduce(" not in text and "tx.rms_norm(%embedding" in text
    assert "ratio = 0.25" in text


def test_tp_not_dividing_kv_heads_is_named():
    with pytest.raises(Exception, match=r"2 heads.*tp=4 does not divide"):
        compiled_ir(tiny_llama(1), "canonicalize,raise,tp-shard{tp=4,rank=0}", IDS)


def test_tp_not_dividing_features_is_named():
    with pytest.raises(Exception, match=r"q_proj.weight has 64 features.*not divisible by tp=3"):
        compiled_ir(tiny_llama(1), "canonicalize,raise,tp-shard{tp=3,rank=0}", IDS)


def test_tp_without_distributed_says_how_to_launch():
    with pytest.raises(Exception, match=r"torchrun --nproc-per-node 2"):
        compiled_ir(tiny_llama(1), "canonicalize,raise,tp-shard{tp=2}", IDS)


def test_pass_options_are_checked():
    with pytest.raises(PipelineError, match="impl must be one of"):
        parse_pipeline("fuse-allreduce-rmsnorm{impl=magic}")
    with pytest.raises(PipelineError, match="ratio"):
        parse_pipeline("fuse-allreduce-rmsnorm{ratio=1.5}")
    assert parse_pipeline("tp-shard{tp=1}")[0].tp == 1


def test_split_rows_is_wave_aware():
    assert split_rows(2048, 0.5) == 1024
    assert split_rows(2048, 0.3) % 128 == 0 and 0 < split_rows(2048, 0.3) < 2048
    assert split_rows(8, 0.5) == 0  # decode-shaped: too few rows for two waves of tiles
    assert split_rows(200, 0.5) == 0


# --------------------------------------------------------------------- two gloo processes (CPU)


PIPES = {
    "unfused": "tp-shard{tp=2}",
    "fused": "tp-shard{tp=2},fuse-allreduce-rmsnorm",
    "fused_split": "tp-shard{tp=2},fuse-allreduce-rmsnorm{split=true}",
    "fused_codegen": "tp-shard{tp=2},fuse-allreduce-rmsnorm,fuse,codegen{backend=extern}",
}


def _tp_worker(rank: int, world: int, device: str = "cpu") -> dict:
    """One rank: capture once, then every pipeline of PIPES on its own copy of the raised graph."""
    from fxcc.capture import capture, flatten_inputs
    from fxcc.pipeline import PassContext, PassManager
    from fxcc.tp_bench import build_variant

    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    model = tiny_llama(2).to(dev)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        ref = model(ids, use_cache=False).last_hidden_state
    kwargs = {"use_cache": False}
    ctx = PassContext(options=CompileOptions(), module=model, example_inputs=((ids,), kwargs), target=dev.type)
    cap = capture(model, (ids,), kwargs)
    base = PassManager(parse_pipeline("canonicalize,raise")).run(cap.gm, ctx)
    flat, _ = flatten_inputs((ids,), kwargs)
    out, outs = {}, {}
    for name, passes in PIPES.items():
        v = build_variant(base, cap, passes, ctx, name, cuda_graphs=False)
        got = v.run(flat).last_hidden_state
        outs[name] = got
        out[name] = (got - ref).abs().max().item()
        out[name + "_ops"] = sorted({n.target.__name__ for n in v.gm.graph.nodes
                                     if n.op == "call_function" and "all_reduce" in str(n.target)})
    out["fused_vs_unfused"] = (outs["fused"] - outs["unfused"]).abs().max().item()
    out["checksum"] = outs["fused"].double().sum().item()
    return out


@pytest.mark.slow
def test_tp2_gloo_matches_eager_and_fused_matches_unfused():
    tiny_llama(1)  # import transformers' Llama here: forked ranks inherit it instead of importing it twice
    ranks = launch(_tp_worker, 2, backend="gloo", start_method="fork")
    for r in ranks:
        for name in PIPES:
            assert r[name] < 2e-5, (name, r)
        assert r["fused_vs_unfused"] < 1e-6
        assert r["unfused_ops"] == ["all_reduce.default"]
        assert r["fused_ops"] == ["all_reduce_rms_norm.default"]
        assert r["fused_split_ops"] == ["linear_all_reduce_rms_norm.default"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # every rank ends with the same replicated output


def _tp_cached_worker(rank: int, world: int, cache_dir: str) -> dict:
    """One rank: fxcc.compile with tp-shard twice over one artifact cache (cold, then graph-cache hit)."""
    import os

    import fxcc

    os.environ["FXCC_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)
    model = tiny_llama(2)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).last_hidden_state
    out = {}
    for run in ("cold", "warm"):
        cm = fxcc.compile(model, passes="canonicalize,raise,tp-shard{tp=2},fuse,codegen{backend=extern}")
        got = cm(ids, use_cache=False).last_hidden_state
        out[run] = (got - ref).abs().max().item()
        out[run + "_method"] = cm.variants[-1].captured.method
    return out


@pytest.mark.slow
def test_tp2_graph_cache_hit_is_per_rank(tmp_path):
    """The graph cache keys on rank and world size: a warm compile loads this rank's shard, not another's."""
    tiny_llama(1)
    ranks = launch(_tp_cached_worker, 2, str(tmp_path), backend="gloo", start_method="fork")
    for r in ranks:
        assert "graph cache" in r["warm_method"], r
        assert r["cold"] < 2e-5 and r["warm"] < 2e-5, r


# ---------------------------------------------------------------------- kernels and cost model


def test_triton_residual_rms_norm_matches_unfused():
    pytest.importorskip("triton")
    from fxcc.codegen import allreduce_rmsnorm_triton as k
    from fxcc.dialects import rms_norm

    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton interpreter not enabled")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(5, 48, generator=g).to(dev) for _ in range(2))
    w = torch.randn(48, generator=g).to(dev)
    y, s = k.residual_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, rms_norm(x + r, w, 1e-6), atol=1e-5, rtol=1e-5)
    # the symmetric-memory kernel: every "rank's" partial sums, addressed through a table of pointers
    parts = [torch.randn(5, 48, generator=g).to(dev) for _ in range(2)]
    ptrs = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64, device=dev)
    y2, s2 = k.symm_all_reduce_rms_norm(ptrs, parts[0], r, w, 1e-6, 2)
    torch.testing.assert_close(s2, parts[0] + parts[1] + r)
    torch.testing.assert_close(y2, rms_norm(parts[0] + parts[1] + r, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_cost_model_on_plan_irs():
    """The model reads each plan's IR (built here for tp up to 4 without ranks) and ranks it by its terms."""
    model = tiny_llama(1, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    ids = torch.zeros(1, 512, dtype=torch.long)
    plans = space(4) + [TPPlan(2, True, True, 0.5, "nccl")]
    graphs = plan_graphs(model, (ids,), {"use_cache": False}, plans + [TPPlan(8)])
    assert "tp8-unfused" not in graphs  # 4 KV heads cannot be split 8 ways: skipped, not an error
    slow_chip = dict(matmul=1e12, hbm=1e10, launch=0.0)  # compute-bound, so the split of work shows
    fast_link = CostModel(Rates(**slow_chip, allreduce={"nccl": (1e-9, 1e15), "symm": (1e-9, 1e15)}))
    t = {k: fast_link.graph_time(g, int(k[2])) for k, g in graphs.items()}
    assert t["tp4-unfused"] < t["tp2-unfused"] < t["tp1"]  # free communication: more ranks, less work each
    assert t["tp2-fused[auto]"] < t["tp2-unfused"]  # one pass instead of add + norm
    slow_link = CostModel(Rates(**slow_chip, allreduce={"nccl": (1e-9, 1e9), "symm": (1e-9, 1e9)}))
    s = {k: slow_link.graph_time(g, int(k[2])) for k, g in graphs.items()}
    assert s["tp1"] < s["tp2-unfused"]  # costly communication: TP does not pay
    assert s["tp2-fused[auto]-split0.5"] < s["tp2-fused[auto]"]  # overlap hides part of it
    assert kernel_count(graphs["tp2-fused[auto]"]) < kernel_count(graphs["tp2-unfused"])
    lat, bw = fit_allreduce([(32768, 2e-5 + 32768 / 1e11), (8 << 20, 2e-5 + (8 << 20) / 1e11)])
    assert lat == pytest.approx(2e-5, rel=1e-3) and bw == pytest.approx(1e11, rel=1e-3)
    c = compare({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 1.0})
    assert c["pairwise_order_agreement"] == 0.0 and c["best_measured"] == "b"


def test_plan_passes_text():
    assert TPPlan(1).passes() == ""
    assert TPPlan(2, True, True, 0.25, "nccl").passes() == \
        "tp-shard{tp=2},fuse-allreduce-rmsnorm{impl=nccl,split=true,ratio=0.25}"
    for p in space(4):
        parse_pipeline("raise," + p.passes() if p.passes() else "raise")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_fused_kernels_match_reference():
    ranks = launch(_tp_worker, 2, "cuda", backend="nccl")
    for r in ranks:
        assert r["fused_vs_unfused"] < 1e-5


def test_tp_without_projections_says_so():
    with pytest.raises(Exception, match=r"found no projection to split.*%linear.*is a model output"):
        cm = CompiledModule(torch.nn.Sequential(torch.nn.Linear(8, 8)), CompileOptions(passes="tp-shard{tp=2,rank=0}"))
        cm.compile_for((torch.randn(2, 8),), {})


# ------------------------------------------------------- projections found from the graph, any architecture


def _renamed_llama():
    """A Llama whose projections are called wq/wk/wv/wo and w1/w3/w2 (as in Meta's checkpoints)."""
    from transformers.models.llama import modeling_llama as ml

    names = {ml.LlamaAttention: {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"},
             ml.LlamaMLP: {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}
    model = tiny_llama(2, hidden_size=32, intermediate_size=64)
    for mod in list(model.modules()):
        rename = names.get(type(mod))
        if rename is None:
            continue
        mod._modules = {rename.get(k, k): v for k, v in mod._modules.items()}
        # the class's forward still says self.q_proj: properties lead it to the renamed child
        props = {old: property(lambda self, new=new: self._modules[new]) for old, new in rename.items()}
        mod.__class__ = type("Renamed" + type(mod).__name__, (type(mod),), props)
    return model


def tiny_arch(name: str, experts: str = "batched_mm"):
    """(model, kwargs) of a tiny random-weight model of each architecture tp-shard must recognise; `experts`:
    the experts implementation of the mixture-of-experts ones (transformers' `experts_implementation`)."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=100, max_position_embeddings=64)
    moe = dict(num_experts_per_tok=2, num_key_value_heads=2, experts_implementation=experts)
    if name == "mixtral":
        return T.MixtralModel(T.MixtralConfig(**small, **moe, num_local_experts=4)).eval(), {"use_cache": False}
    if name in ("qwen2_moe", "qwen3_moe"):  # Qwen2-MoE adds a shared expert (a dense MLP) and its sigmoid gate
        cls, cfg = (T.Qwen2MoeModel, T.Qwen2MoeConfig) if name == "qwen2_moe" else (T.Qwen3MoeModel, T.Qwen3MoeConfig)
        extra = dict(shared_expert_intermediate_size=64) if name == "qwen2_moe" else {}
        return cls(cfg(**small, **moe, **extra, num_experts=4, moe_intermediate_size=32)).eval(), {"use_cache": False}
    if name == "llama":
        return tiny_llama(2, hidden_size=32, intermediate_size=64), {"use_cache": False}
    if name == "renamed_llama":
        return _renamed_llama(), {"use_cache": False}
    if name == "qwen2":
        return T.Qwen2Model(T.Qwen2Config(**small, num_key_value_heads=2)).eval(), {"use_cache": False}
    if name == "qwen3":  # RMSNorm of q and k over head_dim, after the view into heads
        return T.Qwen3Model(T.Qwen3Config(**small, num_key_value_heads=2, head_dim=8)).eval(), {"use_cache": False}
    if name == "gemma3":  # the same after the transpose (q/k norms of [batch, heads, tokens, head_dim]), 1 + weight
        cfg = T.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=8, sliding_window=8)
        return T.Gemma3TextModel(cfg).eval(), {"use_cache": False}
    if name == "olmo2":  # RMSNorm of q and k over all their features (every head at once), before the view
        cfg = T.Olmo2Config(**small, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.Olmo2Model(cfg).eval(), {"use_cache": False}
    if name == "mistral":
        return T.MistralModel(T.MistralConfig(**small, num_key_value_heads=2)).eval(), {"use_cache": False}
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
        return T.GPT2Model(cfg).eval(), {"use_cache": False}
    if name == "bert":
        return T.BertModel(T.BertConfig(**small), add_pooling_layer=False).eval(), {}
    raise KeyError(name)


ARCHS = ["llama", "renamed_llama", "qwen2", "qwen3", "gemma3", "mistral", "gpt2", "bert",
         "gpt2+decompose",  # +decompose: q, k, v
         "mixtral", "qwen2_moe", "qwen3_moe", "mixtral@grouped_mm+decompose"]  # of GPT-2's fused c_attn are then three
# slices instead of a split; @: the experts implementation (batched_mm unless named)
MOE = {"mixtral": 1, "qwen2_moe": 2, "qwen3_moe": 1}  # replicated projections per layer: router (+ shared gate)


def _arch_worker(rank: int, world: int, name: str) -> dict:
    """One rank: tp-shard{tp=2} of `name` against eager; this rank's weight bytes against the whole model's."""
    from fxcc.capture import capture, flatten_inputs
    from fxcc.pipeline import PassContext, PassManager
    from fxcc.tp_bench import build_variant

    torch.set_num_threads(1)
    arch, _, front = name.partition("+")
    arch, _, experts = arch.partition("@")
    model, kwargs = tiny_arch(arch, experts or "batched_mm")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, **kwargs).last_hidden_state
    ctx = PassContext(options=CompileOptions(), module=model, example_inputs=((ids,), kwargs), target="cpu")
    cap = capture(model, (ids,), kwargs)
    base = PassManager(parse_pipeline(",".join(filter(None, [front, "canonicalize,raise"])))).run(cap.gm, ctx)
    pm = PassManager(parse_pipeline("tp-shard{tp=2}"))
    sharded = pm.run(ir.clone_graph(base), ctx)
    got = build_variant(sharded, cap, "", ctx, name, cuda_graphs=False).run(flatten_inputs((ids,), kwargs)[0])
    held = {t.untyped_storage().data_ptr() for t in [*sharded.parameters(), *sharded.buffers()]}
    linears = [m.weight for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")
               and not n.endswith("shared_expert_gate")]  # a [1, hidden] gate: nothing to split
    linears += [p for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    return {"err": (got.last_hidden_state - ref).abs().max().item(), "stats": pm.records[-1].result.stats,
            "linear_bytes": sum(w.numel() * w.element_size() for w in linears),
            "full_weights_held": sum(w.untyped_storage().data_ptr() in held for w in linears),
            "checksum": got.last_hidden_state.double().sum().item()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_tp2_gloo_each_architecture_matches_eager(name):
    """Projections found from the graph: every linear is split, outputs equal eager, each rank holds its shards."""
    arch = name.partition("+")[0].partition("@")[0]
    tiny_arch(arch)  # import the architecture here: forked ranks inherit it
    ranks = launch(_arch_worker, 2, name, backend="gloo", start_method="fork")
    for r in ranks:
        s = r["stats"]
        assert r["err"] < 2e-5, r
        assert s["column"] >= 2 * 2 and s["all_reduce"] == 2 * 2, s  # 2 layers: attention + MLP (or experts)
        if arch in MOE:  # every expert's gate_up and down split; the router (and a shared expert's gate) whole
            assert s["expert"] == 2 * 2 and s["replicated"] == 2 * MOE[arch], s
            assert s["row"] == 2 * (3 if arch == "qwen2_moe" else 2), s  # the shared expert's sum joins the experts'
        else:
            assert s["row"] == 2 * 2 and "replicated" not in s and "expert" not in s, s
        assert r["full_weights_held"] == 0, r
        # this rank's constants: the replicated ones and half of every projection weight (column biases halve too)
        assert s["param_bytes"] <= s["param_bytes_tp1"] - r["linear_bytes"] // 2, s
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


class _SoftmaxMLP(torch.nn.Module):
    """Two MLPs side by side: a GELU one tp-shard splits, and one whose softmax over the hidden features
    mixes what ranks would hold apart, so it cannot be proved and stays replicated."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.mix1, self.mix2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) + self.mix2(torch.softmax(self.mix1(x), -1))


def test_unprovable_projection_stays_replicated(caplog):
    cm = CompiledModule(_SoftmaxMLP().eval(), CompileOptions(passes="canonicalize,raise,tp-shard{tp=2,rank=0}"))
    with caplog.at_level("INFO", logger="fxcc.passes.tp_shard"):
        text = ir.print_graph(cm.compile_for((torch.randn(2, 16),), {}).gm)
    assert text.count("tx.all_reduce(") == 1 and "%tp_fc1_weight" in text and "%tp_mix1_weight" not in text
    assert "(mix1) stays replicated" in caplog.text and "cannot take a split value" in caplog.text


def test_norm_over_all_heads_stays_replicated(caplog):
    """OLMo-2 normalises q and k over all their features at once: split by heads, that norm would need every
    rank's sum of squares, so the attention stays replicated (and says why) while its MLP is split."""
    model, kwargs = tiny_arch("olmo2")
    cm = CompiledModule(model, CompileOptions(passes="canonicalize,raise,tp-shard{tp=2,rank=0}"))
    with caplog.at_level("INFO", logger="fxcc.passes.tp_shard"):
        gm = cm.compile_for((IDS,), kwargs).gm
    shards = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("tp_")}
    assert shards == {f"tp_layers_{i}_mlp_{p}_proj_weight" for i in range(2) for p in ("gate", "up", "down")}
    assert "(layers.0.self_attn.q_proj) stays replicated: %linear flows into fxcc_tx.rms_norm.default at " \
           "%rms_norm_default_1 (layers.0.self_attn.q_norm), which normalises all 32 output features" in caplog.text
    assert "(layers.0.self_attn.k_norm), which normalises all 16 output features" in caplog.text
    assert "(layers.0.self_attn.v_proj) stays replicated: attention" in caplog.text


def test_fused_qkv_is_split_per_block():
    """GPT-2's c_attn computes q, k and v in one Conv1D: each rank keeps its heads' part of each of the three."""
    import transformers as T

    torch.manual_seed(0)
    model = T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64)).eval()
    cm = CompiledModule(model, CompileOptions(passes="canonicalize,raise,tp-shard{tp=2,rank=1}"))
    gm = cm.compile_for((IDS,), {"use_cache": False}).gm
    text = ir.print_graph(gm)
    assert "aten.split.Tensor(%view_2) {split_size = 16, dim = 2}" in text
    w = model.h[0].attn.c_attn.weight
    torch.testing.assert_close(gm.tp_h_0_attn_c_attn_weight, torch.cat([w[:, 16:32], w[:, 48:64], w[:, 80:96]], 1))


# ------------------------------------------------------------------------------------------ mixture of experts


def test_experts_loop_is_refused_naming_batched_mm():
    """transformers' "eager" experts loop over the experts hit (data-dependent): refused before DyCL would run
    every decoder layer eagerly and whole on every rank, naming the implementation to use instead."""
    model, kwargs = tiny_arch("mixtral", "eager")
    cm = CompiledModule(model, CompileOptions(passes="canonicalize,raise,tp-shard{tp=2,rank=0}"))
    with pytest.raises(Exception, match=r"layers.0.mlp.experts \(MixtralExperts.*experts_implementation='eager'.*"
                                        r"set_experts_implementation\(\"batched_mm\"\)"):
        cm.compile_for((IDS,), kwargs)


def test_experts_sharded_per_matrix(caplog):
    """Each rank keeps its block of every expert's gate and of its up features (chunk(2) still pairs them), the
    matching inputs of down_proj, and one all-reduce after the routing-weighted combine; the router stays whole."""
    model, kwargs = tiny_arch("mixtral")
    cm = CompiledModule(model, CompileOptions(passes="canonicalize,raise,tp-shard{tp=2,rank=1}"))
    with caplog.at_level("INFO", logger="fxcc.passes.tp_shard"):
        gm = cm.compile_for((IDS,), kwargs).gm
    experts = model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj  # [4, 2 * 64, 32], [4, 32, 64]
    torch.testing.assert_close(gm.tp_layers_0_mlp_experts_gate_up_proj,
                               torch.cat([gate_up[:, 32:64], gate_up[:, 96:128]], 1))
    torch.testing.assert_close(gm.tp_layers_0_mlp_experts_down_proj, down[:, :, 32:64])
    text = ir.print_graph(gm)
    assert "aten.chunk(%squeeze) {chunks = 2, dim = -1} : (tensor<16x64xf32>) -> (tensor<16x32xf32>" in text
    assert "tx.all_reduce(%reshape_7) {op = \"sum\", group = \"\"} : (tensor<1x8x32xf32>)" in text  # after the combine
    assert "(layers.0.mlp.gate) stays replicated" in caplog.text


@pytest.mark.parametrize("experts", ["batched_mm", "grouped_mm", "eager"])
def test_moe_single_process_matches_eager(experts):
    """No tp: every experts implementation compiles (eager's loop as a DyCL host program) and equals eager."""
    import fxcc

    model, kwargs = tiny_arch("mixtral", experts)
    with torch.no_grad():
        ref = model(IDS, **kwargs).last_hidden_state
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    if experts == "eager":  # the decoder layer holding the loop is a segment that runs eagerly, and says so
        with pytest.warns(UserWarning, match=r"seg4 .* runs eagerly: .*control flow depends on tensor values"):
            got = cm(IDS, **kwargs).last_hidden_state
    else:
        got = cm(IDS, **kwargs).last_hidden_state
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert ("DyCL" in cm.explain()) == (experts == "eager")
