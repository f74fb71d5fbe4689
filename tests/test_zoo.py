"""The CI-sized model zoo: architectures chosen for spread, each built shrunk from its config by
`fxcc.zoo_models`, run by eager and fxcc on two input shapes, every output leaf (caches included)
equal within 1e-4 of its scale: the same check `fxcc zoo` runs on the whole AutoModel mapping.

Kernels come from the extern backend here (TVM builds would not fit the suite's time budget); every
other backend's candidate is checked against that reference when the codegen pass chooses it.
"""

from __future__ import annotations

import math

import pytest
from fxcc import zoo
from fxcc.pipeline import DEFAULT_PIPELINE

PIPELINE = DEFAULT_PIPELINE.replace("codegen", "codegen{backend=extern}")

SUBSET = [
    # encoders
    "bert", "deberta-v2", "distilbert", "albert", "mpnet",
    # decoders
    "gpt2", "llama", "qwen3", "gemma2", "opt", "falcon", "gpt_neox",
    # encoder-decoders
    "t5", "bart",
    # vision (and vision-text)
    "vit", "swin", "convnext", "resnet", "clip",
    # audio
    "whisper", "wav2vec2",
    # mixture of experts
    "mixtral", "qwen3_moe",
    # state space
    "mamba", "falcon_mamba",
]


@pytest.mark.parametrize("arch", SUBSET)
def test_architecture_matches_eager_on_two_shapes(arch):
    res = zoo.run_one(arch, PIPELINE)
    assert res.status == zoo.EQUAL, f"{arch}: {res.status}: {res.message}"
    assert res.leaves > 0 and math.isfinite(res.max_rel) and res.max_rel <= 1e-4


def test_mismatch_is_reported_with_the_leaf_and_error():
    import torch
    from fxcc.outputs import compare

    got = {"a": torch.ones(3), "b": (torch.zeros(2), torch.tensor([1, 2]))}
    want = {"a": torch.ones(3) * 2, "b": (torch.zeros(2), torch.tensor([1, 2]))}
    c = compare(got, want)
    assert not c.equal and c.worst == "out['a']" and c.max_rel == pytest.approx(0.5) and c.leaves == 3
    c = compare({"a": torch.ones(3)}, want)
    assert not c.equal and "output structure differs" in c.detail


def test_select_by_name_glob_and_unknown_name():
    types = ["bert", "gpt2", "gpt_neox", "t5"]
    assert zoo.select(types, "gpt*,t5") == ["gpt2", "gpt_neox", "t5"]
    with pytest.raises(ValueError, match="no model type .* matches nosuch"):
        zoo.select(types, "bert,nosuch")


def test_cli_names_an_unknown_model_type(tmp_path, capsys):
    from fxcc import cli

    assert cli.main(["zoo", "--only", "bert,nosuch", "--output", str(tmp_path)]) == 2
    assert "no model type in transformers' AutoModel mapping matches nosuch" in capsys.readouterr().err


def test_a_model_past_its_timeout_is_a_row_and_the_sweep_goes_on(tmp_path):
    """The worker is killed (its process group) and the row says where the time ran out."""
    rows = zoo.sweep(["bert"], jobs=1, timeout=0.5, passes=None, threads=1, logdir=tmp_path)
    assert [(r.model, r.status) for r in rows] == [("bert", zoo.CANNOT_BUILD)]
    assert rows[0].message.startswith("timed out after 0 s in ")
    zoo.write(rows, tmp_path, "fxcc zoo --only bert")
    assert "| bert | cannot build |" in (tmp_path / "zoo.md").read_text()


def test_a_worker_build_past_its_memory_limit_fails_in_the_worker():
    """A config the meta-device measure cannot check (its constructor fails on meta) may ask for gigabytes when
    built: the worker's heap limit turns that into an allocation error (a row), not the machine's OOM killer."""
    import subprocess
    import sys

    code = ("import torch; from fxcc import zoo; zoo.limit_memory(0.5)\n"
            "try:\n    torch.empty(2**30)\nexcept RuntimeError as e:\n    print('refused', 'allocate' in str(e))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "refused True", out.stderr[-2000:]


_BY_NAME: dict = {}


def _decorated(fn):
    """A decorator DyCL cannot re-apply around a program: its wrapper reaches the function by name, not by a
    closure variable."""
    import functools

    _BY_NAME[fn.__qualname__] = fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _BY_NAME[wrapper.__qualname__](*args, **kwargs)
    return wrapper


def test_a_model_that_ran_all_eagerly_is_not_counted_equal():
    """A forward DyCL leaves as written (here: behind a decorator it cannot re-apply) gives eager's result, but nothing was
    compiled: the row says so instead of `equal`. The same forward undecorated runs compiled segments."""
    import fxcc
    import torch
    import torch.nn as nn

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return torch.relu(x) * 2
            return x - 1

    class Wrapped(Branchy):
        forward = _decorated(Branchy.forward)

    x = torch.randn(4, 8)
    reasons = []
    for model in (Branchy(), Wrapped()):
        cm = fxcc.compile(model, passes=PIPELINE)
        for sign in (1, -1):
            torch.testing.assert_close(cm(sign * x.abs()), model(sign * x.abs()))
        reasons.append(zoo._nothing_compiled(cm))
    assert reasons[0] == ""
    assert "runs eagerly, as written" in reasons[1] and "decorator" in reasons[1]


def test_a_config_that_derives_per_layer_lists_from_a_fixed_default_is_built_with_them_cut():
    """Llama-4's config derives `layer_types` from a default of its full depth, which its validator then
    rejects for the shrunk depth; the shrinker builds it again with the per-layer lists cut to that depth."""
    from fxcc.zoo_models import shrunk_config

    config = shrunk_config("llama4_text")
    assert len(config.layer_types) == config.num_hidden_layers < 48


def test_state_space_heads_are_shrunk_to_cover_the_expanded_width():
    """Mamba-2 validates num_heads * head_dim == expand * hidden_size; shrinking each alone broke that, and
    the zoo could not build it."""
    from fxcc.zoo_models import shrunk_config

    config = shrunk_config("mamba2")
    assert config.num_heads * config.head_dim == config.expand * config.hidden_size
    assert config.num_heads % config.n_groups == 0 and config.hidden_size <= 64


@pytest.mark.parametrize("entry", ["torch", "torch-dynamic"])
def test_architecture_through_torch_compile_matches_eager(entry):
    """`--entry torch`: the model reaches fxcc as torch.compile(model, backend="fxcc") gives it, graph by graph."""
    res = zoo.run_one("albert", PIPELINE, entry=entry)
    assert res.status == zoo.EQUAL, f"albert via {entry}: {res.status}: {res.message}"
    assert res.leaves > 0 and res.max_rel <= 1e-4


def test_fxcc_failing_on_a_dynamo_graph_is_an_fxcc_error(monkeypatch):
    """torch.compile's backend runs dynamo's graph as it is where fxcc fails on it: the outputs are eager's, but
    the row is an fxcc error, named by the backend's warning, not equal."""
    from fxcc import api

    def fail(*args, **kwargs):
        raise NotImplementedError("no lowering for the op")

    monkeypatch.setattr(api, "_compiled_graph", fail)
    res = zoo.run_one("albert", PIPELINE, entry="torch")
    assert res.status == zoo.FXCC_ERROR and res.message.startswith(zoo.BACKEND_FAILED)
    assert "NotImplementedError: no lowering for the op" in res.message


def test_a_difference_torch_compile_makes_without_fxcc_is_named_so():
    """A model whose code takes another path under dynamo (PaliGemma: transformers builds the causal mask it
    skips in eager when nothing is padded) differs with backend="eager" too: the row says so, for fxcc is not
    the cause."""
    import torch

    class Branchy(torch.nn.Module):
        def __init__(self, differs):
            super().__init__()
            self.differs = differs

        def forward(self, x):
            return x + 1 if self.differs and torch.compiler.is_compiling() else x

    class Recipe:
        def make(self, model, s):
            return {"x": torch.ones(2, 3 + s)}

    recipe = Recipe()
    refs = [recipe.make(None, s)["x"] for s in range(2)]
    assert zoo._dynamo_alone_differs(Branchy(True), recipe, refs)
    assert not zoo._dynamo_alone_differs(Branchy(False), recipe, refs)
