"""Guards see every change that changes the result: each kind of change to a model after it was compiled is
either read live by the compiled code or makes it compile again; the outputs equal eager's either way."""

from __future__ import annotations

import copy
import dataclasses
import enum
import types

import fxcc
import pytest
import torch
import torch.nn as nn
from conftest import assert_outputs_close
from fxcc import codegen, guards, watch
from fxcc.codegen import mkl, onednn, tvm
from fxcc.guards import ModuleState

EXTERN = "canonicalize,raise,fuse,codegen{backend=extern}"  # one candidate per kernel: no timing at compile


@dataclasses.dataclass
class Config:
    shift: float = 0.5


class Siblings(nn.Module):
    """Two linears of one input (merged into one by merge-linears: weights copied into a constant), a
    parameter-only subgraph (folded into a constant), a LeakyReLU, a tensor attribute and a config field."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d))
        self.act = nn.LeakyReLU(0.01)
        self.scale = torch.tensor(2.0)
        self.config = Config()

    def forward(self, x):
        h = self.act(self.a(x) - self.b(x)) * (self.w * 2 + 1)
        return h * self.scale + self.config.shift


def _change(m: nn.Module, how: str) -> None:
    with torch.no_grad():
        if how == "data.mul_ (merged)":
            m.a.weight.data.mul_(3)
        elif how == "data.mul_ (folded)":
            m.w.data.mul_(3)
        elif how == "data = (merged)":
            m.b.weight.data = torch.randn_like(m.b.weight)
        elif how == "data = same values":
            m.w.data = m.w.data.clone()  # new storage, same values: compiled code must stay right
        elif how == "mul_ (folded)":
            m.w.mul_(2)
        elif how == "detach().numpy() write":
            m.w.detach().numpy()[0] += 5.0
        elif how == "primitive attribute":
            m.act.negative_slope = 0.5
        elif how == "tensor attribute in place":
            m.scale.mul_(3)
        elif how == "tensor attribute replaced":
            m.scale = torch.tensor(-1.0)
        elif how == "config field":
            m.config.shift = -3.0
        elif how == "submodule replaced":
            m.act = nn.ReLU()
        elif how == "parameter replaced":
            m.w = nn.Parameter(torch.ones(16))


KINDS = ["data.mul_ (merged)", "data.mul_ (folded)", "data = (merged)", "data = same values", "mul_ (folded)",
         "detach().numpy() write", "primitive attribute", "tensor attribute in place", "tensor attribute replaced",
         "config field", "submodule replaced", "parameter replaced"]


@pytest.mark.parametrize("how", KINDS)
def test_every_kind_of_change_to_an_mlp_is_seen(how):
    torch.manual_seed(0)
    m, x = Siblings().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m)
    torch.testing.assert_close(cm(x), m(x))
    before = m(x)
    _change(m, how)
    if how != "data = same values":
        assert not torch.allclose(m(x), before)  # the change changes the result
    torch.testing.assert_close(cm(x), m(x))
    torch.testing.assert_close(cm(x), m(x))  # and stays right on the next call (fast path)


def test_a_change_that_keeps_the_values_does_not_recompile():
    torch.manual_seed(0)
    m, x = Siblings().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m)
    cm(x)
    with torch.no_grad():
        m.a.weight.copy_(m.a.weight.clone())  # written, same bits
        m.a.weight.detach().numpy()  # a writable pointer was asked for, nothing written
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.compiles == 1 and cm.stats.param_recompiles == 0
    m.b.weight.data.add_(1)
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def _llama():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaModel(cfg).eval(), torch.randint(0, 64, (1, 8))


LLAMA = {
    "q_proj.data.mul_": lambda m: m.layers[0].self_attn.q_proj.weight.data.mul_(3),  # merged with k, v
    "up_proj.data =": lambda m: setattr(m.layers[1].mlp.up_proj.weight, "data",
                                        torch.randn_like(m.layers[1].mlp.up_proj.weight)),
    "norm.data.mul_": lambda m: m.norm.weight.data.mul_(-2),
    "rms eps attribute": lambda m: setattr(m.layers[0].input_layernorm, "variance_epsilon", 0.5),
    "inv_freq buffer": lambda m: m.rotary_emb.inv_freq.data.mul_(7),
}


@pytest.mark.parametrize("how", list(LLAMA))
def test_every_kind_of_change_to_a_tiny_llama_is_seen(how):
    m, ids = _llama()
    cm = fxcc.compile(m)
    assert_outputs_close(cm(ids), m(ids), atol=1e-4, rtol=1e-4)
    before = m(ids).last_hidden_state
    with torch.no_grad():
        LLAMA[how](m)
    assert not torch.allclose(m(ids).last_hidden_state, before, atol=1e-3)
    assert_outputs_close(cm(ids), m(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pack", ["mkl", "onednn", "tvm panels"])
def test_packed_weight_caches_see_writes_through_data(pack):
    if pack == "mkl" and not mkl.available() or pack == "onednn" and not onednn.available():
        pytest.skip(f"{pack} is not in this torch build")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 16), requires_grad=False)
    x = torch.randn(4, 16)
    kept = {"mkl": mkl._PACKED, "onednn": onednn._PACKED, "tvm panels": tvm._PANELS}[pack]

    def check():
        if pack == "tvm panels":  # [N/8, K, 8] panels hold w
            torch.testing.assert_close(tvm._packed(w, 8).transpose(1, 2).reshape(32, 16), w)
        else:
            got = (mkl if pack == "mkl" else onednn).linear(x, w)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=1e-4, rtol=1e-4)

    check()
    packed = kept[id(w)][3]
    check()
    assert kept[id(w)][3] is packed  # kept while the weight is unchanged
    for change in (lambda: w.data.mul_(3), lambda: setattr(w, "data", torch.randn(32, 16)), lambda: w.mul_(-1)):
        change()
        check()
        assert kept[id(w)][3] is not packed
        packed = kept[id(w)][3]


def test_derived_values_follow_every_source():
    store: dict = {}
    w, b = torch.randn(4), torch.randn(4)
    made = []

    def value():
        return codegen.derived(store, w, None, lambda: made.append(1) or w + b, (b,))

    v = value()
    assert value() is v and len(made) == 1
    b.data.add_(1)  # a source besides the weight (a bias packed with it)
    torch.testing.assert_close(value(), w + b)
    assert len(made) == 2


def test_a_snapshot_sees_writes_not_reads():
    t = torch.randn(64)
    s = watch.Snapshot(t)
    assert s.same(t)
    t.numpy()  # asks for a writable pointer: the buffer moves, the bits stay
    assert s.same(t) and s.same(t)
    t.data[3] = float("nan")
    assert not s.same(t)
    s = watch.Snapshot(t)
    assert s.same(t)  # NaN equals the same NaN
    t.data = torch.randn(8, 8)
    assert not s.same(t)
    s = watch.Snapshot(t)
    whole = torch.cat([torch.randn(8, 8), t.detach()])
    t.data = whole[8:]  # moved into a larger buffer with its values (as merging weights does): the same
    assert t.storage_offset() == 64 and s.same(t) and s.same(t)
    for rows in (4, 12):  # moved again (another merge): still watched copy-on-write, not a plain copy
        t.data = torch.cat([torch.randn(rows, 8), t.detach()])[rows:]
        assert s.same(t) and s.cow
    t.data[1, 0] += 1  # and a write to the new buffer is seen
    assert not s.same(t)


def test_weights_over_foreign_memory_are_watched_by_copy_on_write(tmp_path):
    """Weights mmapped from a file (as `from_pretrained` loads safetensors) get memory of their own, in place,
    so their snapshot is copy-on-write rather than a comparison of every byte on every call."""
    path = tmp_path / "w.bin"
    torch.arange(64, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=64, dtype=torch.float32)
    p = nn.Parameter(mapped.view(8, 8), requires_grad=False)
    alias = p.detach()[1]  # another tensor on the same storage
    s = watch.Snapshot(p)
    assert s.cow and torch._C._is_cow_tensor(p)
    assert p.untyped_storage()._cdata == alias.untyped_storage()._cdata  # still one storage
    assert s.same(p)
    alias.mul_(10)  # a write through any alias is seen
    assert not s.same(p) and p[1, 0].item() == 80.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["data = (merged)", "data.mul_ (merged)", "data = same values", "primitive attribute"])
def test_changes_are_seen_by_a_replayed_cuda_graph(how):
    """A CUDA graph replays the addresses it captured: `.data =` must recompile even with the same values."""
    torch.manual_seed(0)
    m, x = Siblings().cuda().eval(), torch.randn(4, 16, device="cuda")
    m.scale = m.scale.cuda()  # a plain tensor attribute: .cuda() does not move it
    cm = fxcc.compile(m)
    for _ in range(2):  # capture, then replay
        torch.testing.assert_close(cm(x), m(x))
    _change(m, how)
    for _ in range(2):
        torch.testing.assert_close(cm(x), m(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["siblings", "llama"])
def test_steady_calls_on_a_gpu_neither_copy_nor_recompile(model):
    """Kernels read watched weights by address (fxcc.codegen.launch): a call must not give a weight a fresh
    buffer (its copy-on-write snapshot would then fail the next call's guard, every call)."""
    torch.manual_seed(0)
    if model == "llama":
        m, x = _llama()
        m, x = m.cuda(), x.cuda()
    else:
        m, x = Siblings().cuda().eval(), torch.randn(4, 16, device="cuda")
        m.scale = m.scale.cuda()
    expected = m(x)  # eager first: an eager op may ask a weight for a writable pointer (a copy, once)
    cm = fxcc.compile(m)
    for _ in range(3):
        cm(x)
    addresses = [torch._C._data_address(p) for p in m.parameters()]
    for _ in range(5):
        assert_outputs_close(cm(x), expected, atol=1e-4, rtol=1e-4)
    assert [torch._C._data_address(p) for p in m.parameters()] == addresses
    assert cm.stats.param_recompiles == 0 and cm.stats.compiles == 1
    with torch.no_grad():
        next(m.parameters()).data.mul_(3)  # and a write is still seen
    assert_outputs_close(cm(x), m(x), atol=1e-4, rtol=1e-4)
    assert cm.stats.param_recompiles <= 1


def test_a_model_writing_its_own_buffer_leaves_its_weights_watched_in_place():
    """A variant that writes a buffer of the model (a KV cache it holds) re-takes only the snapshots over the
    memory it wrote: finding which those are must not ask the other watched tensors for writable pointers
    (which gives each a copy of itself, then a bit-for-bit comparison at the next call)."""

    class Accumulate(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.linspace(-1, 1, 16))
            self.register_buffer("total", torch.zeros(4, 16))

        def forward(self, x):
            self.total.add_(x * self.scale.exp())  # scale.exp() is folded: scale is watched
            return self.total * 2

    torch.manual_seed(0)
    m, x = Accumulate().eval(), torch.randn(4, 16)
    ref = copy.deepcopy(m)
    cm = fxcc.compile(m)
    for _ in range(2):
        torch.testing.assert_close(cm(x), ref(x))
    address = torch._C._data_address(m.scale)
    assert torch._C._is_cow_tensor(m.scale)  # its snapshot shares its memory
    for _ in range(3):
        torch.testing.assert_close(cm(x), ref(x))
        assert torch._C._is_cow_tensor(m.scale) and torch._C._data_address(m.scale) == address
    assert cm.stats.param_recompiles == 0 and cm.stats.compiles == 1
    m.scale.mul_(2)  # a write by the user is still seen
    ref.scale.mul_(2)
    torch.testing.assert_close(cm(x), ref(x))
    assert cm.stats.param_recompiles == 1


@pytest.mark.parametrize("how", ["stride", "shape", "dtype"])
def test_a_layout_change_is_seen_whatever_the_dispatch_state(how):
    """ModuleState compares layouts in one C++ pass (fxcc.watch.Layouts): a call in inference mode or after
    requires_grad_ changes the dispatch keys that pass also compares, which is no change; a new stride, shape
    or dtype under `.data =` is one, in either state."""
    m = Siblings().eval()
    state = ModuleState(m, None)
    assert state.changed() is None
    for _ in range(2):  # the second time through the C++ guard taken again under this state
        with torch.inference_mode():
            assert state.changed() is None
    m.w.requires_grad_(False)
    assert state.changed() is None and state.changed() is None
    w = m.a.weight.data
    new = {"stride": lambda: w.t().contiguous().t(), "shape": lambda: w[:, :-1].clone(),
           "dtype": lambda: w.double()}[how]()
    m.a.weight.data = new
    with torch.inference_mode():
        assert "changed layout" in state.changed()
    assert "changed layout" in state.changed()
    m.a.weight.data = w
    assert state.changed() is None


def test_a_weight_other_code_keeps_asking_for_a_writable_pointer_stops_being_copied():
    """Other code over the same weights (torch.compile's kernels call `data_ptr()`) breaks a copy-on-write
    snapshot at each call without writing: after `watch.BREAKS` such breaks the snapshot keeps a plain copy,
    the weight stays where it is from then on, and a write is still seen."""
    t = torch.randn(32, 16)
    s = watch.Snapshot(t)
    for _ in range(watch.BREAKS):
        t.numpy()  # a writable pointer, nothing written
        assert s.same(t)
    assert not s.cow
    at = torch._C._data_address(t)
    for _ in range(3):
        t.numpy()
        assert s.same(t) and torch._C._data_address(t) == at  # no longer copied by the request
    t.data[1, 2] += 1  # through an alias with a version counter of its own
    assert not s.same(t)
    t.data[1, 2] -= 1
    t.numpy()[0, 0] += 2  # through the pointer itself
    assert not s.same(t)


def test_a_graph_reads_a_kept_copy_where_a_weight_moved_with_its_values():
    """A tensor a CUDA graph reads where it was captured (`live`) that moved with its values (other code asked it
    for a writable pointer, or `.data =` a copy): the snapshot keeps the memory the graph reads, so nothing
    changed and no recompile captures the graph again; once the tensor is written, it changed."""
    for how in ("writable pointer", ".data = a copy"):
        m = nn.Linear(16, 16)
        at = torch._C._data_address(m.weight)
        state = ModuleState(m, [m.weight], live=[m.weight])
        if how == "writable pointer":
            m.weight.detach().numpy()
        else:
            m.weight.data = m.weight.data.clone()
        assert torch._C._data_address(m.weight) != at
        for _ in range(2):
            assert state.changed() is None, how
            assert state.watched[0][1].holds(at)  # the graph's memory, kept
        with torch.no_grad():
            m.weight.data[0, 0] += 1
        assert state.changed() is not None, how


def test_a_graph_reading_a_merged_weight_keeps_its_memory_when_a_row_of_it_moves():
    """A merged weight of fxcc's own (Q/K/V) that a CUDA graph reads shares its memory with the model's weights,
    its rows. A writable pointer asked of one row (torch.compile's launches, on the same model) moves that
    memory for all of them; the graph reads the old memory, which the rows' snapshots must keep. Before, the
    snapshots were taken again and the old memory freed: the graph read freed memory (on an H100, token 0 from
    the NaNs of another tensor after torch.compile reduce-overhead ran in the same process)."""
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    merged = torch.cat([m[0].weight.detach(), m[1].weight.detach()])
    m[0].weight.data, m[1].weight.data = merged[:16], merged[16:]  # as fxcc.ir.concat_rows rebinds them
    at = torch._C._data_address(merged)
    state = ModuleState(m, [m[0].weight, m[1].weight], live=[merged])
    m[1].weight.detach().numpy()  # a writable pointer to one row
    assert torch._C._data_address(merged) != at  # the merged buffer moved with it
    for _ in range(2):
        assert state.changed() is None
        assert any(s.holds(at) for _, s in state.watched)  # the graph's memory, kept
    with torch.no_grad():
        m[0].weight.data[0, 0] += 1
    assert state.changed() is not None


def test_a_kept_copy_costs_no_comparison_while_the_moved_weight_is_not_asked_again(monkeypatch):
    """After a weight a CUDA graph reads moved once with its values (the model run eagerly beside it, asking for
    writable pointers), its checks are address compares again: the tensor's new buffer is watched copy-on-write.
    Each new request costs one comparison; a write through any alias is still seen, where the graph reads."""
    compared = []
    same_bits = watch.same_bits
    monkeypatch.setattr(watch, "same_bits", lambda a, b: compared.append(1) or same_bits(a, b))
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    live = [m[0].weight, m[1].weight]
    state = ModuleState(m, live, live=live)
    at = torch._C._data_address(m[0].weight)
    m[0].weight.detach().numpy()  # a writable pointer: the buffer moves, the bits stay
    assert state.changed() is None and len(compared) == 1
    assert state.watched[0][1].holds(at)  # the graph's memory, kept
    compared.clear()
    for _ in range(5):
        assert state.changed() is None
    assert compared == []  # address compares only
    m[0].weight.detach().numpy()  # asked again: one comparison, then address compares again
    assert state.changed() is None and state.changed() is None and len(compared) == 1
    with torch.no_grad():
        m[0].weight.data[0, 0] *= 2  # through an alias with a version counter of its own
    assert state.changed() is not None
    with torch.no_grad():
        m[0].weight.data[0, 0] /= 2  # the old bits again (+1 then -1 would round them away)
    assert state.changed() is None
    m[0].weight.detach().numpy()[1, 1] += 2  # through the pointer itself
    assert state.changed() is not None


def test_a_kept_copy_asked_at_every_call_is_compared_then_watched_again():
    """A moved weight a graph reads whose new buffer is asked for a writable pointer at every call (torch.compile's
    kernels over the same model): after `watch.BREAKS` re-watches it is compared at every check, so the other
    code is not given a copy per call, and it is watched again after `patience` checks; a write is seen throughout."""
    t = torch.randn(8, 8)
    s = watch.Snapshot(t)
    t.numpy()
    assert s.same(t, keep=True) and s.kept and s.watch is not None
    for _ in range(watch.BREAKS):
        t.numpy()
        assert s.same(t) and s.watch is not None
    t.numpy()
    assert s.same(t) and s.watch is None  # compared from now on
    at = torch._C._data_address(t)
    for _ in range(watch.PATIENCE - 1):
        t.numpy()
        assert s.same(t) and torch._C._data_address(t) == at  # no longer copied by the request
    assert s.same(t) and s.watch is not None and s.patience == 2 * watch.PATIENCE
    t.data.add_(1)
    assert not s.same(t)


def test_a_plain_copy_snapshot_is_copy_on_write_again_once_the_requests_stop():
    t = torch.randn(8, 8)
    s = watch.Snapshot(t)
    for _ in range(watch.BREAKS):
        t.numpy()
        assert s.same(t)
    assert not s.cow
    for _ in range(watch.PATIENCE):
        assert s.same(t)
    assert s.cow  # copy-on-write again: an unchanged tensor is one address compare per check
    t.numpy()
    assert s.same(t) and not s.cow and s.patience == 2 * watch.PATIENCE  # broken again: a copy, twice as long
    t.data.add_(1)
    assert not s.same(t)


def test_a_change_seen_while_only_eager_variants_are_left_is_said_once():
    """Signatures that run eagerly depend on nothing: their calls do not look at the module's state (no cost over
    eager's call); a compiled signature's next call finds the change, once, and compiles again."""
    torch.manual_seed(0)
    m = Siblings().eval()
    cm = fxcc.compile(m, options=fxcc.CompileOptions(max_variants=1, dynamic=False))
    small, large = torch.randn(4, 16), torch.randn(8, 16)
    cm(small)
    torch.testing.assert_close(cm(large), m(large))  # over max_variants: eager
    m.act.negative_slope = 0.2  # an attribute the graph folded in
    for _ in range(3):
        torch.testing.assert_close(cm(large), m(large))
    assert cm.stats.param_recompiles == 0 and cm.stats.compiles == 1 and cm.stats.eager_calls == 4
    torch.testing.assert_close(cm(small), m(small))  # compiled again, with the module as it is now
    assert cm.stats.param_recompiles == 1 and cm.stats.compiles == 2
    m.a.weight.data.add_(1)
    torch.testing.assert_close(cm(small), m(small))
    assert cm.stats.param_recompiles == 2


# ------------------------------------------------------------------ attributes added to or deleted from a module


class Lookups(nn.Module):
    """A forward that reads attributes a user may add later: `getattr` with a default, `hasattr`, a class
    attribute an instance may shadow, a method an instance may shadow, and a parameter that may appear."""

    gain = 1.0  # a class attribute: `m.gain = ...` shadows it

    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.tag = {"kind": "kept"}  # neither primitive nor a tensor: guarded by identity and contents

    def act(self, h):
        return torch.relu(h)

    def forward(self, x):
        h = self.act(self.lin(x)) * getattr(self, "scale", 1.0) * self.gain
        if hasattr(self.lin, "shift"):
            h = h + self.lin.shift
        bias = getattr(self, "bias2", None)
        return h if bias is None else h + bias


def _lookups():
    torch.manual_seed(0)
    return Lookups().eval(), torch.randn(4, 16)


def _recompiled(cm, m, x, reason: str, caplog) -> None:
    """cm(x) equals eager after a change that must recompile, with `reason` in the recompile log."""
    before = cm.stats.param_recompiles
    caplog.clear()
    with caplog.at_level("INFO", logger="fxcc.recompiles"):
        torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == before + 1
    assert reason in caplog.text
    torch.testing.assert_close(cm(x), m(x))  # and the next call, on the fast path


CHANGES = {  # what the forward reads, added after the compile; the reason the recompile gives
    "getattr with a default": (lambda m: setattr(m, "scale", 2.0), "attribute scale was added: the compiled code "
                               "looked it up and did not find it"),
    "hasattr on a submodule": (lambda m: setattr(m.lin, "shift", 3.0), "attribute lin.shift was added: the compiled "
                               "code looked it up"),
    "class attribute shadowed": (lambda m: setattr(m, "gain", -2.0), "shadows the class attribute Lookups.gain"),
    "method shadowed": (lambda m: setattr(m, "act", torch.tanh), "shadows the class attribute Lookups.act"),
    "parameter added": (lambda m: setattr(m, "bias2", nn.Parameter(torch.ones(16))), "parameter bias2 was added"),
    "buffer added": (lambda m: m.register_buffer("bias2", torch.full((16,), 2.0)), "buffer bias2 was added"),
}


@pytest.mark.parametrize("how", list(CHANGES))
def test_an_attribute_the_compiled_code_can_read_recompiles_when_added(how, caplog):
    m, x = _lookups()
    cm = fxcc.compile(m)
    torch.testing.assert_close(cm(x), m(x))
    before = m(x)
    change, reason = CHANGES[how]
    change(m)
    assert not torch.allclose(m(x), before)
    _recompiled(cm, m, x, reason, caplog)


def test_an_added_attribute_that_was_read_keeps_its_value_guarded_and_its_deletion_recompiles(caplog):
    m, x = _lookups()
    cm = fxcc.compile(m)
    cm(x)
    m.scale = 2.0
    _recompiled(cm, m, x, "attribute scale was added", caplog)
    m.scale = 3.0
    _recompiled(cm, m, x, "attribute scale changed from 2.0 to 3.0", caplog)
    del m.scale
    _recompiled(cm, m, x, "attribute scale was deleted", caplog)
    del m.tag  # there at the compile: what reads it is not recorded
    _recompiled(cm, m, x, "attribute tag was deleted", caplog)


def test_an_attribute_no_compiled_code_can_read_does_not_recompile():
    m, x = _lookups()
    cm = fxcc.compile(m)
    cm(x)
    m.note, m.lin.counter, m.cached = "a user's note", 3, torch.ones(2)  # names nothing looked up or has
    for _ in range(2):
        torch.testing.assert_close(cm(x), m(x))
    m.counter = 4
    del m.note  # added after the compile: nothing compiled can have read it
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.compiles == 1 and cm.stats.param_recompiles == 0
    m.scale = 2.0  # but one the forward looks up still recompiles
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


class Holder(nn.Module):
    """A submodule that looks a name up and does not find it, and one that looks nothing up, called through its
    class's forward (as fxcc's decode step calls its model)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.looks, self.plain = Lookups(d), nn.Linear(d, d)

    def forward(self, x):
        return self.looks(x) + type(self.plain).forward(self.plain, x)


@pytest.mark.parametrize("where", ["root", "a submodule that looked nothing up", "a submodule that missed a name"])
def test_an_attribute_added_where_no_compiled_code_looked_it_up_does_not_recompile(where, caplog):
    """Capture records the names looked up and missed on every module of the tree, none missed included: a name
    added that none of them looked up cannot change what the compiled code computes. One looked up still does."""
    torch.manual_seed(0)
    m, x = Holder().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m, passes=EXTERN)
    torch.testing.assert_close(cm(x), m(x))
    target = {"root": m, "a submodule that looked nothing up": m.plain, "a submodule that missed a name": m.looks}[where]
    target.note, target._previous_max_cache_length, target.cache = "a user's note", 12, {"k": torch.ones(2)}
    for _ in range(2):
        torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.compiles == 1 and cm.stats.param_recompiles == 0, cm.stats.reasons
    m.looks.scale = 2.0  # one the forward looked up and missed
    _recompiled(cm, m, x, "attribute looks.scale was added: the compiled code looked it up and did not find it",
                caplog)


def test_a_static_cache_generate_compiles_its_prefill_and_step_once(monkeypatch):
    """transformers' generate sets attributes of its own on the model (`_previous_max_cache_length` at a
    static-cache generate) and marks a StaticCache its caller passed (`_is_user_defined`); no forward reads either, so
    generates that alternate the caller's cache and generate's own compile the prefill and the step once each."""
    transformers = pytest.importorskip("transformers")
    from test_generate import FAST, llama

    torch.manual_seed(0)
    model = llama().eval()
    model.generation_config.disable_compile = True
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    cm = fxcc.compile(model, passes=FAST)
    for new in (2, 5, 2, 5):
        kw = {"cache_implementation": "static"} if new == 5 else {"cache_implementation": None}
        got, expected = (gm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw, **(
            {} if new == 5 else {"cache": transformers.StaticCache(config=model.config, max_cache_len=12)}))
            for gm in (cm, model))
        assert torch.equal(got, expected) and cm.decode_loop.last[0] == "fxcc's decode loop"
    (step,) = cm.decode_loop.steps.values()
    assert (cm.stats.compiles, step.stats.compiles) == (1, 1), (cm.stats.reasons, step.stats.reasons)


def test_an_attribute_read_and_added_while_another_is_deleted_recompiles():
    """The number of attributes stays the same (one deleted, one added): the looked-up name is still seen."""
    m, x = _lookups()
    cm = fxcc.compile(m)
    cm(x)
    m.note = "added after the compile"
    cm(x)
    del m.note
    m.scale = 2.0
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def test_a_graph_from_the_graph_cache_keeps_the_names_its_capture_looked_up():
    m, x = _lookups()
    for _ in range(2):  # the second stores the graph under the key the third finds (a process's first compile
        fxcc.compile(m)(x)  # imports modules that can change how the key sees the model's code)
    cm = fxcc.compile(m)
    torch.testing.assert_close(cm(x), m(x))
    assert "IR from the graph cache" in cm.variants[0].captured.method
    m.note = "nothing reads it"
    cm(x)
    assert cm.stats.param_recompiles == 0
    m.scale = 2.0
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def test_a_config_field_added_recompiles():
    """What compiled code looks up on a config object is not recorded: a field added or deleted recompiles."""
    torch.manual_seed(0)
    m, x = Siblings().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m)
    cm(x)
    m.config.extra = 1
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def test_a_submodule_appended_to_a_sequential_recompiles(caplog):
    """Sequential's forward iterates its submodules: one appended after the compile changes the result."""
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval(), torch.randn(4, 16)
    cm = fxcc.compile(m)
    torch.testing.assert_close(cm(x), m(x))
    m.append(nn.Linear(16, 16))
    _recompiled(cm, m, x, "submodule 2 was added", caplog)


# ------------------------------------------------------- changes no Python-level hook sees (the dicts' version tags)


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if self.training else x


class Listed(Siblings):
    """Siblings with a list attribute the forward reads (folded in by export, changeable in place) and a
    submodule whose forward reads its own training flag."""

    def __init__(self, d: int = 16):
        super().__init__(d)
        self.factors = [3.0, 0.5]
        self.gate = Gate()

    def forward(self, x):
        return self.gate(super().forward(x) * self.factors[0])


BYPASS = {  # each changes what the model computes without nn.Module.__setattr__, __delattr__ or register_*
    "vars(m)[k] = v": lambda m: vars(m.act).__setitem__("negative_slope", 0.5),
    "dict.__setitem__(vars(m), k, v)": lambda m: dict.__setitem__(vars(m.act), "negative_slope", 0.5),
    "object.__setattr__": lambda m: object.__setattr__(m.act, "negative_slope", 0.5),
    "vars(m).update (tensor attribute)": lambda m: vars(m).update(scale=torch.tensor(-1.0)),
    "_modules[k] = v": lambda m: m._modules.__setitem__("act", nn.ReLU()),
    "_parameters[k] = v": lambda m: m._parameters.__setitem__("w", nn.Parameter(torch.ones(16))),
    "vars(config)[k] = v": lambda m: vars(m.config).__setitem__("shift", -3.0),
    "training flag in vars(submodule)": lambda m: vars(m.gate).__setitem__("training", True),
    "list attribute changed in place": lambda m: m.factors.__setitem__(0, -1.0),
    "parameter .data = (new layout)": lambda m: setattr(m.w, "data", torch.randn(1)),
    "in-place write into a folded weight": lambda m: m.w.data.copy_(torch.randn(16)),
}


@pytest.mark.parametrize("how", list(BYPASS))
def test_changes_made_past_every_hook_are_seen(how):
    """The module-state guard's fast path (the dicts' version tags, fxcc.guards) sees a change however it is
    made: through the dicts themselves, object.__setattr__, a list changed in place, a tensor's layout or
    contents; the next call equals eager's, and so does the one after it (on the fast path again)."""
    torch.manual_seed(0)
    m, x = Listed().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m)
    torch.testing.assert_close(cm(x), m(x))
    state = cm._params
    assert state.tags_hold()  # the fast path is armed
    before = m(x)
    with torch.no_grad():
        BYPASS[how](m)
    assert before.shape != m(x).shape or not torch.allclose(m(x), before)  # the change changes the result
    assert state.changed() is not None
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1
    torch.testing.assert_close(cm(x), m(x))
    assert cm._params.versions is not None and cm._params.changed() is None


def test_a_change_that_does_not_matter_takes_the_tags_again():
    """An attribute nothing compiled reads, added through the module's dict, moves its dict's tag: the entries
    are compared once, found the same, and the tags taken again; past _REARMS such changes the entries are
    compared at every call, and a change that matters still recompiles."""
    m, x = _lookups()
    cm = fxcc.compile(m)
    cm(x)
    state = cm._params
    vars(m.lin)["note"] = "nothing reads it"
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 0 and state.rearms == 1 and state.tags_hold()
    for i in range(guards._REARMS):
        vars(m.lin)["counter"] = i
        assert state.changed() is None
    assert state.versions is None  # given up: entry by entry from now on
    torch.testing.assert_close(cm(x), m(x))
    vars(m)["scale"] = 2.0  # looked up and not found at capture
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def test_a_root_attribute_written_at_every_call_takes_only_the_roots_tag_again(monkeypatch):
    """transformers' generate records its state on the model at every call (the root module's dict moves): the
    entries are compared and the root's tag alone taken again. Nothing is rebuilt (a tag guard over every module
    dict: milliseconds on an 8-layer model, at each generate's first forward) and nothing counts toward
    _REARMS; a change that matters is still seen."""
    m, x = _lookups()
    cm = fxcc.compile(m)
    cm(x)
    state = cm._params
    builds = []
    monkeypatch.setattr(guards, "_dict_versions", lambda dicts: builds.append(1))
    for i in range(guards._REARMS + 4):
        vars(m)["_last_generate"] = i
        torch.testing.assert_close(cm(x), m(x))
    assert not builds and state.rearms == 0 and state.tags_hold()
    vars(m)["scale"] = 2.0  # looked up and not found at capture
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


# --------------------------------------------- attributes that are no plain numbers, closures, a method's object

class Mode(enum.Enum):
    A = 1
    B = 2


class Held(nn.Module):
    """A forward that reads attributes that are no primitives: a dict, an options object, an Enum member, a
    function, and a list of Enum members."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.cfg = {"scale": 1.0, "inner": {"shift": 0.0}}
        self.opts = types.SimpleNamespace(bias=0.0)
        self.mode = Mode.A
        self.act = torch.relu
        self.modes = [Mode.A]

    def forward(self, x):
        y = self.act(self.lin(x)) * self.cfg["scale"] + self.cfg["inner"]["shift"] + self.opts.bias
        y = y if self.mode is Mode.A else -y
        return y if self.modes[0] is Mode.A else y * 2


HELD = {
    "dict entry": lambda m: m.cfg.__setitem__("scale", 3.0),
    "nested dict entry": lambda m: m.cfg["inner"].__setitem__("shift", 2.0),
    "namespace field": lambda m: setattr(m.opts, "bias", 5.0),
    "enum": lambda m: setattr(m, "mode", Mode.B),
    "function": lambda m: setattr(m, "act", torch.tanh),
    "list of enums": lambda m: m.modes.__setitem__(0, Mode.B),
}


@pytest.mark.parametrize("how", list(HELD))
def test_an_attribute_that_is_no_primitive_is_guarded(how):
    torch.manual_seed(0)
    m, x = Held().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m, passes=EXTERN)
    torch.testing.assert_close(cm(x), m(x))
    before = m(x)
    HELD[how](m)
    assert not torch.allclose(m(x), before)
    torch.testing.assert_close(cm(x), m(x))
    torch.testing.assert_close(cm(x), m(x))  # the fast path, after the recompile
    assert cm.stats.param_recompiles == 1


def test_a_containers_entry_added_recompiles_and_an_untouched_one_does_not(caplog):
    torch.manual_seed(0)
    m, x = Held().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m, passes=EXTERN)
    cm(x)
    m.cfg["scale"] = 1.0  # the same value again
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 0
    with caplog.at_level("INFO", logger="fxcc.recompiles"):
        m.cfg["extra"] = 1
        torch.testing.assert_close(cm(x), m(x))
    # a dict of primitives is compared by value (replaced by an equal one is no change)
    assert cm.stats.param_recompiles == 1 and "attribute cfg changed from {'scale': 1.0" in caplog.text
    m.cfg = {**m.cfg}  # an equal dict in its place
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def test_closure_variables_are_guarded():
    def make():
        scale, box = 2.0, [1.0]

        def f(x):
            return x * scale + box[0]

        def set_scale(v):
            nonlocal scale
            scale = v

        return f, set_scale, box

    f, set_scale, box = make()
    cm, x = fxcc.compile(f, passes=EXTERN), torch.ones(3)
    torch.testing.assert_close(cm(x), f(x))
    set_scale(2.0)  # an equal value: no change
    torch.testing.assert_close(cm(x), f(x))
    assert cm.fxcc.stats.compiles == 1
    set_scale(5.0)
    torch.testing.assert_close(cm(x), f(x))
    assert cm.fxcc.stats.compiles == 2 and "variable scale of the closure of" in cm.fxcc.stats.reasons[-1]
    box[0] = 4.0  # a list in a cell, changed in place
    torch.testing.assert_close(cm(x), f(x))
    assert cm.fxcc.stats.compiles == 3


def _inner():
    shift = 1.0

    def inner(x):
        return x + shift

    def set_shift(v):
        nonlocal shift
        shift = v

    return inner, set_shift


INNER, SET_SHIFT = _inner()


def _calls_a_closure_through_a_global(x):
    return INNER(x) * 2


def test_the_closure_of_a_function_reached_through_a_global_is_guarded():
    cm, x = fxcc.compile(_calls_a_closure_through_a_global, passes=EXTERN), torch.ones(3)
    try:
        torch.testing.assert_close(cm(x), _calls_a_closure_through_a_global(x))
        SET_SHIFT(3.0)
        torch.testing.assert_close(cm(x), _calls_a_closure_through_a_global(x))
        assert cm.fxcc.stats.compiles == 2
    finally:
        SET_SHIFT(1.0)


def _make_scaled(scale):
    """A class a factory function defines: its forward reads the factory's argument through its closure."""

    class Scaled(nn.Module):
        def forward(self, x):
            return x * scale

    def set_scale(v):
        nonlocal scale
        scale = v

    return Scaled, set_scale


class HoldsScaled(nn.Module):
    def __init__(self, sub):
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return self.sub(x) + 1


@pytest.mark.parametrize("how", ["its closure variable rebound", "replaced by one of another such class"])
def test_a_submodules_class_closure_is_guarded(how):
    """Nothing the compiled forward holds leads to the submodule's class: its forward's closure is guarded all the
    same (fxcc.capture.global_reads), as is a submodule replaced (by identity)."""
    scaled, set_scale = _make_scaled(2.0)
    m, x = HoldsScaled(scaled()).eval(), torch.ones(3)
    cm = fxcc.compile(m, passes=EXTERN, options=fxcc.CompileOptions(check_eager=False, time_vs_eager=False))
    torch.testing.assert_close(cm(x), m(x))
    set_scale(2.0)  # an equal value: no change
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.compiles == 1
    if how == "its closure variable rebound":
        set_scale(5.0)
    else:
        m.sub = _make_scaled(3.0)[0]()
    torch.testing.assert_close(cm(x), m(x))
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.compiles == 2 and all(v.gm is not None for v in cm.variants), cm.stats.reasons
    if how == "its closure variable rebound":
        assert "variable scale of the closure of _make_scaled.<locals>.Scaled.forward" in cm.stats.reasons[-1]


class Scaler:
    def __init__(self):
        self.k = 2.0
        self.opts = types.SimpleNamespace(shift=0.0)

    def apply(self, x):
        return x * self.k + self.opts.shift


@pytest.mark.parametrize("how", ["attribute", "attribute of an attribute"])
def test_the_attributes_of_a_compiled_methods_object_are_guarded(how):
    o, x = Scaler(), torch.ones(3)
    cm = fxcc.compile(o.apply, passes=EXTERN)
    torch.testing.assert_close(cm(x), o.apply(x))
    if how == "attribute":
        o.k = 7.0
    else:
        o.opts.shift = 3.0
    torch.testing.assert_close(cm(x), o.apply(x))
    assert cm.fxcc.stats.compiles == 2 and "of the compiled method's Scaler changed" in cm.fxcc.stats.reasons[-1]


def test_state_that_changes_at_every_call_stops_recompiling_with_one_warning():
    torch.manual_seed(0)
    m, x = Siblings().eval(), torch.randn(4, 16)
    cm = fxcc.compile(m, passes=EXTERN)
    with pytest.warns(UserWarning, match="runs eagerly from now on: its state changed") as record:
        for i in range(guards.Churn.LIMIT + 4):
            m.act.negative_slope = 0.01 * (i + 1)  # set before every call
            torch.testing.assert_close(cm(x), m(x))
    assert sum("runs eagerly from now on" in str(w.message) for w in record) == 1
    assert cm.stats.compiles == guards.Churn.LIMIT and cm.stats.eager_calls == 4


def test_a_change_after_many_calls_starts_the_count_anew():
    churn = guards.Churn()
    assert not any(churn.note("a", 1) for _ in range(guards.Churn.LIMIT - 1))
    assert not churn.note("a", guards.Churn.QUICK + 1)  # after many calls: weights updated now and then
    assert not any(churn.note("a", 1) for _ in range(guards.Churn.LIMIT - 2))
    assert churn.note("a", 1)
