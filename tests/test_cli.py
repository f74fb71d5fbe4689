"""The `fxcc` command: explain, bench and passes, and its errors on bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import fxcc
import pytest
import torch
from fxcc import bench_generate as bg
from fxcc import cli
from fxcc.capture import forward_as

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "llama_tiny.py")


def test_explain_shows_tx_ops_for_every_llama_layer(capsys):
    assert cli.main(["explain", f"{EXAMPLE}:model", "--ir"]) == 0
    out = capsys.readouterr().out
    after_raise = out.split("IR after raise")[1].split("IR after")[0]
    layers = 2
    assert after_raise.count("= tx.rms_norm(") == 2 * layers + 1
    assert after_raise.count("= tx.attention(") == layers
    assert "== where ops run" in out and "kernel.fused[reduction]" in out


def test_explain_kernels_prints_bodies(capsys):
    assert cli.main(["explain", f"{EXAMPLE}:model", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "== kernels" in out and "func @reduction(" in out
    assert "IR after raise" not in out


@pytest.mark.parametrize("spec, message", [
    ("examples/missing.py:model", "no file"),
    (f"{EXAMPLE}:modle", "defines no 'modle'"),
    (f"{EXAMPLE}", "PATH.py:NAME"),
])
def test_explain_bad_model_spec(capsys, spec, message):
    assert cli.main(["explain", spec]) == 2
    assert message in capsys.readouterr().err


def test_explain_bad_pipeline_is_reported_with_a_caret(capsys):
    assert cli.main(["explain", f"{EXAMPLE}:model", "--passes", "canonicalize,rase"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'rase'" in err and "did you mean 'raise'" in err
    assert "\n  " + " " * len("canonicalize,") + "^" in err


@pytest.mark.parametrize("name, message", [
    ("NUM", "holds a value of type int, not a function that takes no arguments"),
    ("number", "returned a value of type int"),
    ("needs_arg", "must take no arguments"),
])
def test_a_model_spec_that_names_no_factory_is_a_usage_error(tmp_path, capsys, name, message):
    f = tmp_path / "m.py"
    f.write_text("import torch\nNUM = 3\n\ndef number():\n    return 42\n\ndef needs_arg(n):\n"
                 "    return torch.nn.Linear(2, 2)\n\ndef inputs():\n    return (torch.randn(1, 2),)\n")
    assert cli.main(["explain", f"{f}:{name}"]) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_not_python_and_bad_counts_are_usage_errors(tmp_path, capsys):
    f = tmp_path / "broken.py"
    f.write_text("this is not python (\n")
    assert cli.main(["explain", f"{f}:model"]) == 2
    assert "is not valid Python" in capsys.readouterr().err
    assert cli.main(["bench", "breadth", "--size", "small", "--only", "relu", "--reps", "0"]) == 2
    assert "--reps must be at least 1" in capsys.readouterr().err
    out = tmp_path / "no" / "dir" / "plan.json"
    assert cli.main(["search", f"{EXAMPLE}:model", "--trials", "1", "--output", str(out)]) == 2
    assert "no directory" in capsys.readouterr().err


def test_inputs_must_return_a_tuple(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text("import torch\n\ndef model():\n    return torch.nn.Linear(2, 2)\n\n"
                 "def inputs():\n    return torch.randn(1, 2)\n")
    assert cli.main(["explain", f"{f}:model"]) == 2
    assert "must return a tuple" in capsys.readouterr().err


def test_bench_llama_prints_the_side_by_side_table(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    argv = ["bench", "llama", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
            "--intermediate", "64", "--seq", "8", "--reps", "2", "--warmup", "1", "--threads", "1",
            "--engines", "eager,fxcc", "--json", str(out_json)]
    before = os.environ.get("FXCC_CACHE_DIR")
    assert cli.main(argv) == 0
    assert os.environ.get("FXCC_CACHE_DIR") == before  # the bench's own cache dir does not leak into the caller
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.startswith(("eager", "fxcc"))}
    assert rows == {"eager", "fxcc"}
    data = json.loads(out_json.read_text())
    fx = next(r for r in data["results"] if r["engine"] == "fxcc")
    assert fx["max_abs_err"] <= 1e-5 and fx["compile_s"] > 0
    # the warm compile in a new process took the IR and every kernel from the cache, with the same outputs
    assert "outputs identical to the cold compile's" in out
    warm = fx["extra"]["warm"]
    assert "graph cache" in warm["method"] and not warm["codegen"].get("built")



# `fxcc bench generate` on a one-layer Llama of hidden 32 (seconds per run)
TINY_GENERATE = ["bench", "generate", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
                 "--intermediate", "64", "--prompt", "8", "--threads", "1"]


def test_bench_generate_reports_tokens_and_compiles_per_generate(capsys, tmp_path):
    argv = [*TINY_GENERATE, "--new-tokens", "3", "--reps", "1",
            "--engines", "eager,fxcc", "--json", str(tmp_path / "generate.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    table, _, alone = out.partition("TTFT against the prefill compiled alone")
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("eager ", "fxcc "))}
    assert set(rows) == {"eager", "fxcc"}
    # fxcc: prefill and decode compiled in the first generate, nothing in the second; tokens equal eager's
    assert rows["fxcc"][-4] == "2+0" and rows["fxcc"][-2] == "same" and rows["eager"][-1] == "1.00-1.00x"
    # TTFT split into generate's setup and its first forward; fxcc's also against its prefill compiled alone
    split = {line.split()[0]: line.split() for line in alone.splitlines() if line.startswith(("eager ", "fxcc "))}
    assert len(split["eager"]) == 4 and len(split["fxcc"]) == 9 and split["fxcc"][5].endswith("x")
    assert "fxcc: 1 compile" in alone and "during the timed rounds" not in alone
    saved = json.loads((tmp_path / "generate.json").read_text())
    assert saved["warmup"] == 1 and saved["reps"] == 1 and saved["report"] in out
    fx = next(e for e in saved["engines"] if e["name"] == "fxcc")
    assert fx["compiles_first"] == 2 and fx["compiles_again"] == 0 and fx["same_tokens"] is True
    assert len(fx["decode_tps"]) == 1
    # one static compile of the prefill alone, timed once per round; the ratios are those of the rounds' pairs
    assert fx["alone_compiles"] == 1 and fx["compiles_timed"] == fx["alone_compiles_timed"] == 0
    assert len(fx["alone_ms"]) == len(fx["first_ms"]) == len(fx["setup_ms"]) == 1 and fx["alone_ms"][0] > 0
    assert fx["ttft_vs_alone"]["median"] == pytest.approx(fx["ttft_ms"][0] / fx["alone_ms"][0])
    assert fx["first_vs_alone"]["median"] == pytest.approx(fx["first_ms"][0] / fx["alone_ms"][0])
    assert fx["ttft_ms"][0] == pytest.approx(fx["setup_ms"][0] + fx["first_ms"][0])
    eager = next(e for e in saved["engines"] if e["name"] == "eager")
    assert "ttft_vs_alone" not in eager and eager["alone_ms"] == []


def test_bench_generate_times_fxccs_own_decode_loop_as_an_engine(capsys, tmp_path):
    argv = [*TINY_GENERATE, "--new-tokens", "5", "--reps", "2",
            "--engines", "eager,fxcc:loop", "--json", str(tmp_path / "generate.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("eager ", "fxcc:loop "))}
    # the prefill and the decode step compiled in the first generate, nothing for a new prompt length; eager's ids
    assert rows["fxcc:loop"][1] == "static" and rows["fxcc:loop"][-4] == "2+0" and rows["fxcc:loop"][-2] == "same"
    assert "fxcc:loop: == generate: fxcc's decode loop (greedy decoding with a static cache)" in out
    loop = next(e for e in json.loads((tmp_path / "generate.json").read_text())["engines"] if e["name"] == "fxcc:loop")
    # no forward call of its steps is clocked, the end of its prefill is (its model's `_prefill`): TTFT is the generate
    # up to there, the steps the rest, both times of this generate (not differences of two)
    assert len(loop["ttft_ms"]) == len(loop["step_ms"]) == 2 and loop["setup_ms"] == loop["first_ms"] == []
    assert all(math.isfinite(t) and t > 0 for t in loop["ttft_ms"] + loop["step_ms"]) and loop["alone_ms"] == []
    from transformers import LlamaForCausalLM
    assert "_prefill" not in vars(LlamaForCausalLM)  # the wrapper is gone after the generate


def test_bench_generate_reports_an_engine_that_raises_as_its_row(capsys, monkeypatch, tmp_path):
    """An engine that raises (torch.compile's CUDA-graph trees did, on a static cache) is a row with its error;
    the other engines are still measured. One that fails after the first generates keeps its earlier rounds."""
    made = bg.engines

    def with_broken(model, names, device, defer="fxcc"):
        es = made(model, ["eager"], device, defer)
        own = type(model).forward.__get__(model)
        calls = {"late": 0}

        def broken(*args, **kwargs):
            raise RuntimeError("boom: the engine cannot run\nsecond line")

        def late(*args, **kwargs):  # fine for the two first generates (3 calls each), then raises
            calls["late"] += 1
            if calls["late"] > 6:
                raise ValueError("late failure")
            return own(*args, **kwargs)

        return es + [bg.Engine("broken", broken), bg.Engine("late", late)]

    monkeypatch.setattr(bg, "engines", with_broken)
    argv = [*TINY_GENERATE, "--new-tokens", "3", "--reps", "2",
            "--warmup", "0", "--json", str(tmp_path / "generate.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("eager ", "broken ", "late "))}
    assert "failed: RuntimeError during its first generates: boom: the engine cannot run" in rows["broken"]
    assert "second line" not in out and "x" in rows["eager"].split()[-1]
    # "late" raised in the first timed round: no times, its error on its row
    assert "failed: ValueError during timed round 1: late failure" in rows["late"]
    saved = json.loads((tmp_path / "generate.json").read_text())
    by = {e["name"]: e for e in saved["engines"]}
    assert by["eager"]["error"] is None and len(by["eager"]["decode_tps"]) == 2
    assert by["broken"]["error"].startswith("RuntimeError") and by["late"]["decode_tps"] == []


def test_bench_generate_says_why_the_second_generate_compiled(capsys, monkeypatch, tmp_path):
    """An engine that compiles again for the second generate's shorter prompt (here fxcc with dynamic=False) has
    each of those compiles' reasons, as fxcc recorded them, in the report and the JSON; one that does not has none."""
    made = bg.engines

    def with_static(model, names, device, defer="fxcc"):
        es = made(model, names, device, defer)
        fn = fxcc.compile(type(model).forward.__get__(model), dynamic=False)
        return es + [bg.Engine("static", fn, None, lambda: fn.fxcc.stats.compiles,
                               why=lambda: {"forward": list(fn.fxcc.stats.reasons)})]

    monkeypatch.setattr(bg, "engines", with_static)
    argv = [*TINY_GENERATE, "--new-tokens", "2", "--reps", "1", "--warmup", "0", "--no-prefill-alone",
            "--engines", "eager,fxcc", "--json", str(tmp_path / "generate.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    by = {e["name"]: e for e in json.loads((tmp_path / "generate.json").read_text())["engines"]}
    assert by["fxcc"]["compiles_again"] == 0 and by["fxcc"]["again_why"] == []
    static = by["static"]
    assert static["compiles_again"] > 0 and len(static["again_why"]) == static["compiles_again"]
    assert all(why.startswith("forward: ") for why in static["again_why"])
    lines = [line for line in out.splitlines() if line.startswith("static: the second generate compiled (forward: ")]
    assert len(lines) == static["compiles_again"]
    assert not any(line.startswith("fxcc: the second generate compiled") for line in out.splitlines())


def test_bench_generate_reports_the_complete_rounds_when_stopped(capsys, monkeypatch, tmp_path):
    """A time limit's SIGTERM during the timed rounds (a device run's `timeout`): the complete rounds are reported,
    the one it cut is dropped."""
    import os
    import signal
    made = bg.engines

    def stopping(model, names, device, defer="fxcc"):
        (e,) = made(model, ["eager"], device, defer)
        own, calls = type(model).forward.__get__(model), {"n": 0}

        def forward(*args, **kwargs):  # 2 first generates + 1 warm-up + 1 timed round, 3 calls each
            calls["n"] += 1
            if calls["n"] == 14:  # in the second timed round
                os.kill(os.getpid(), signal.SIGTERM)
            return own(*args, **kwargs)
        return [e, bg.Engine("stopping", forward)]

    monkeypatch.setattr(bg, "engines", stopping)
    argv = [*TINY_GENERATE, "--new-tokens", "3", "--reps", "3",
            "--warmup", "1", "--json", str(tmp_path / "generate.json")]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "stopped (SIGTERM) after 1 complete rounds of 3" in captured.err
    assert "medians of 1 generates" in captured.out and "stopping " in captured.out
    saved = json.loads((tmp_path / "generate.json").read_text())
    assert saved["reps"] == 1 and all(len(e["decode_tps"]) == 1 for e in saved["engines"])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the rounds


def test_bench_generate_records_the_first_forward_inputs_with_the_engines_cache():
    """The prefill alone gets what generate passes its first forward: a fresh cache of the engine's kind (a static
    one of the generate's length), the prompt, untouched by the forward (generate stops before it runs)."""
    from transformers import DynamicCache, StaticCache

    model = bg.llama(32, 1, 2, 1, 64, torch.float32, "cpu")
    ids = torch.randint(2, 32000, (1, 6), generator=torch.Generator().manual_seed(0))
    seen = []
    forward = type(model).forward.__get__(model)
    with torch.inference_mode(), forward_as(model, lambda **k: seen.append(k["cache"]) or forward(**k)):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    for cache, kind in ((None, DynamicCache), ("static", StaticCache)):
        args, kwargs = bg.first_call_inputs(model, bg.Engine("x", None, cache), ids, 4, "cpu")
        got = kwargs["cache"]
        assert args == () and type(got) is kind and torch.equal(kwargs["input_ids"], ids)
        assert got.get_seq_length() == 0 and not any(layer.is_initialized and layer.keys.any() for layer in got.layers)
        if kind is StaticCache:  # as long as the one a whole generate allocates
            assert [layer.max_cache_len for layer in got.layers] == [layer.max_cache_len for layer in seen[0].layers]


def _rank_order(model, ids):
    """Eager's float32 logits for the token after one row of `ids` (no padding), by a plain forward of its own."""
    with torch.inference_mode():
        return model(ids).logits[0, -1].float()


def test_bench_generate_finds_where_ids_part_from_eagers_and_eagers_gap_there():
    """Per differing row: the first differing new token, and eager's logits over the shared ids there (a left-padded
    row with the mask and positions generate gave it: the same logits as the row without its padding)."""
    model = bg.llama(32, 1, 2, 1, 64, torch.float32, "cpu")
    ids = torch.randint(2, 32000, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[1, :2] = 0  # the pad id: row 1 is left-padded
    mask = bg.prompt_mask(model, ids)
    assert mask[1].tolist() == [0, 0, 1, 1, 1, 1] and bool(mask[0].all())
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    got = ref.clone()
    first = _rank_order(model, ref[0:1, :6 + 3])  # row 0 parts at new token 3, with eager's 4th choice
    third = int(first.argsort(descending=True)[3])
    got[0, 6 + 3:] = torch.tensor([third, 5])
    second = _rank_order(model, ref[1:2, 2:6 + 2])  # row 1 at new token 2, unpadded: its positions start at 0
    last = int(second.argmin())
    got[1, 6 + 2] = last  # row 2 stays eager's
    ds = bg.divergences(model, ref, got, 6, mask)
    assert [(d.row, d.position, d.eager_token, d.token) for d in ds] == [
        (0, 3, int(ref[0, 9]), third), (1, 2, int(ref[1, 8]), last)]
    assert ds[0].rank == 3 and ds[1].rank == second.numel() - 1
    for d, logits, token in ((ds[0], first, third), (ds[1], second, last)):
        top2 = logits.topk(2).values
        assert d.top == pytest.approx(top2[0].item(), abs=1e-5)
        assert d.gap == pytest.approx((top2[0] - logits[token]).item(), abs=1e-5)
        assert d.top2_gap == pytest.approx((top2[0] - top2[1]).item(), abs=1e-5)
        assert d.ulps == pytest.approx(d.gap / (torch.finfo(torch.float32).eps * abs(d.top)))
        assert abs(d.eager_gap) < 1e-5  # eager's own token is its plain forward's top
    assert bg.divergences(model, ref, ref.clone(), 6, mask) == []


def test_bench_generate_flags_a_token_eager_ranks_far_below_and_not_a_tie():
    """A token eager ranks last is WRONG?; one whose logit ties eager's top (a duplicated output row) is not."""
    model = bg.llama(32, 1, 2, 1, 64, torch.float32, "cpu")
    ids = torch.randint(2, 32000, (1, 6), generator=torch.Generator().manual_seed(0))
    top = int(_rank_order(model, ids).argmax())
    twin = 31999 if top != 31999 else 31998
    with torch.no_grad():
        model.lm_head.weight[twin] = model.lm_head.weight[top]  # eager's argmax keeps `top`, the first of the tie
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert int(ref[0, 6]) == top
    tie, far = ref.clone(), ref.clone()
    tie[0, 6] = twin
    far[0, 6] = int(_rank_order(model, ids).argmin())
    (near,) = bg.divergences(model, ref, tie, 6)
    (wrong,) = bg.divergences(model, ref, far, 6)
    assert near.position == wrong.position == 0 and near.ulps <= 1 and not near.wrong
    assert wrong.wrong and wrong.ulps > bg.WRONG_ULPS and wrong.gap > 0.1
    e = bg.Engine("x", None, same_tokens=False, divergences=[near, wrong])
    assert bg._tokens_cell(e).startswith("DIFF@0 WRONG? gap ")
    assert bg._tokens_cell(bg.Engine("x", None, same_tokens=False, divergences=[near])) == (
        f"DIFF@0 gap {near.gap:.2g} ({near.ulps:.3g} ulp)")


def test_bench_generate_reports_where_and_how_far_an_engines_tokens_part_from_eagers(capsys, monkeypatch, tmp_path):
    """An engine whose logits are wrong (one token's pushed up) shows DIFF@0 WRONG? in its row, a line per engine with
    its rows, and each row's divergence in --json; eager's row stays "same"."""
    made = bg.engines

    def with_skewed(model, names, device, defer="fxcc"):
        es = made(model, ["eager"], device, defer)
        own = type(model).forward.__get__(model)

        def skewed(*args, **kwargs):
            out = own(*args, **kwargs)
            out.logits[..., 7] += 100.0
            return out
        return es + [bg.Engine("skewed", skewed)]

    monkeypatch.setattr(bg, "engines", with_skewed)
    argv = [*TINY_GENERATE, "--new-tokens", "3", "--reps", "1", "--warmup", "0", "--batch", "2",
            "--no-prefill-alone", "--json", str(tmp_path / "generate.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("eager ", "skewed "))}
    assert " same " in rows["eager"] and re.search(r" DIFF@0 WRONG\? gap [0-9.]+ \([0-9.e+]+ ulp\) ", rows["skewed"])
    assert "skewed: ids part from eager's in 4 of 4 rows: " in out and "WRONG?: over 16 ulp" in out
    saved = json.loads((tmp_path / "generate.json").read_text())
    by = {e["name"]: e for e in saved["engines"]}
    assert by["eager"]["divergences"] == []
    got = by["skewed"]["divergences"]
    assert [(d["generate"], d["row"], d["position"], d["token"]) for d in got] == [
        ("prompt", 0, 0, 7), ("prompt", 1, 0, 7), ("other", 0, 0, 7), ("other", 1, 0, 7)]
    assert all(d["wrong"] and d["rank"] > 0 and d["gap"] > 0 for d in got)


def test_passes_lists_the_registry(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("canonicalize", "raise", "fuse", "codegen"):
        assert f"\n{name} " in out


# ------------------------------------------------------------------------------------- fxcc cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def put_entries(n: int):
    from fxcc.store import ArtifactCache, cache_key

    c = ArtifactCache()
    keys = [c.put(cache_key("kernel", ir=str(i)), {"lib.so": b"\0" * 1000, "source.py": b"pass\n"},
                  {"backend": "tvm", "target": "cpu", "params": {"block": i}}).key for i in range(n)]
    return c, keys


def test_cache_ls_and_show(cache_dir, capsys):
    _, keys = put_entries(2)
    assert cli.main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in keys) and "2 entries" in out and str(cache_dir) in out
    assert cli.main(["cache", "show", keys[1][:10]]) == 0
    out = capsys.readouterr().out
    assert keys[1] in out and "lib.so" in out and '"block": 1' in out
    assert cli.main(["cache", "show", "zz"]) == 2
    assert "no cache entry or kernel matches 'zz'" in capsys.readouterr().err


def test_cache_verify_finds_a_planted_corruption(cache_dir, capsys):
    c, keys = put_entries(3)
    lib = cache_dir / "entries" / keys[1] / "lib.so"
    lib.write_bytes(b"\1" + lib.read_bytes()[1:])
    assert cli.main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"{keys[1]}: file lib.so fails its sha256 check" in out and keys[0] not in out
    assert cli.main(["cache", "verify", "--evict"]) == 0
    assert cli.main(["cache", "verify"]) == 0
    assert "2 entries" in capsys.readouterr().out


def test_cache_prune_keeps_the_most_recently_used(cache_dir, capsys):
    c, keys = put_entries(3)
    for i, k in enumerate(keys):
        os.utime(cache_dir / "entries" / k / "manifest.json", (1000 + i, 1000 + i))
    c.get(keys[0])  # now the most recently used
    assert cli.main(["cache", "prune", "--max-size", str(c.get(keys[0]).size + 10)]) == 0
    assert "evicted 2 least recently used entries" in capsys.readouterr().out
    assert [e.key for e in c.entries()] == [keys[0]]


def test_cache_prune_rejects_a_bad_size(cache_dir, capsys):
    assert cli.main(["cache", "prune", "--max-size", "lots"]) == 2
    assert "--max-size 'lots'" in capsys.readouterr().err


def test_cache_clear(cache_dir, capsys):
    put_entries(2)
    assert cli.main(["cache", "clear"]) == 0
    assert "evicted 2 entries" in capsys.readouterr().out
    assert cli.main(["cache", "ls"]) == 0 and "0 entries" in capsys.readouterr().out


@pytest.mark.parametrize("text, size", [("500M", 500 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("4096", 4096),
                                        ("64kb", 64 << 10)])
def test_sizes_take_binary_units(text, size):
    assert cli.parse_size(text) == size


def test_a_closed_pipe_ends_quietly(cache_dir):
    """`fxcc cache ls | head`: the reader leaves before fxcc writes; no BrokenPipeError traceback."""
    put_entries(2)
    proc = subprocess.Popen([sys.executable, "-m", "fxcc.cli", "cache", "ls"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "FXCC_CACHE_DIR": str(cache_dir)})
    proc.stdout.close()  # before the child has imported torch, so its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_version_and_log_topics_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("fxcc 0.")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "FXCC_LOGS" in capsys.readouterr().out


def test_an_unknown_fxcc_setting_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("FXCC_LOGS", "graphcache")
    assert cli.main(["passes"]) == 2
    assert "unknown log topic 'graphcache'; topics: recompiles, passes, kernels, tuning, graph_cache" in \
        capsys.readouterr().err


def test_every_option_of_every_command_has_help():
    import argparse

    def missing(p: argparse.ArgumentParser, where: str) -> list[str]:
        out = []
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    out += missing(sub, f"{where} {name}")
            elif a.help is None:
                out.append(f"{where} {'/'.join(a.option_strings) or a.dest}")
        return out
    assert missing(cli.parser(), "fxcc") == []


def test_threads_is_checked_where_timings_depend_on_it(capsys):
    assert cli.main(["tune", "examples/llama_tiny.py:model", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_the_search_budget_counts_from_the_process_start():
    assert 0.0 < cli.process_age() < 24 * 3600  # this process started before this test, not at it


def test_explain_is_concise_and_its_kernel_ids_open_cache_entries(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["explain", f"{EXAMPLE}:model"]) == 0
    out = capsys.readouterr().out
    assert "IR after raise" not in out and "== where ops run" in out
    kernel = re.search(r"\bk[0-9a-f]{16}\b", out).group(0)
    assert cli.main(["cache", "show", kernel]) == 0
    shown = capsys.readouterr().out
    assert f'"kernel": "{kernel}"' in shown
    assert cli.main(["cache", "ls"]) == 0 and kernel in capsys.readouterr().out


def test_bench_generate_gives_torch_compile_its_own_model_and_reduce_overhead_an_eager_prefill():
    """torch.compile's engine runs on its own copy of the weights (its launches ask each weight for a writable
    pointer, which on a shared model moved the weights fxcc's CUDA graphs read); under reduce-overhead the
    prefill runs eagerly and each one-token step compiled, as transformers' generate runs a static cache."""
    model = bg.llama(64, 1, 4, 2, 128, torch.float32, "cpu")
    (e,) = bg.engines(model, ["torch.compile:reduce-overhead"], "cpu")
    assert e.model is not model and e.model.training == model.training
    for (n, a), b in zip(model.named_parameters(), e.model.parameters()):
        assert torch.equal(a, b) and torch._C._data_address(a) != torch._C._data_address(b), n
    assert isinstance(e.forward, bg.DecodeCompiled)
    calls = []
    e.forward.eager = lambda *a, **k: calls.append("eager")
    e.forward.compiled = lambda *a, **k: calls.append("compiled")
    e.forward(torch.zeros(1, 5, dtype=torch.long))
    e.forward(input_ids=torch.zeros(1, 1, dtype=torch.long))
    assert calls == ["eager", "compiled"]
