"""Generation on decoder families the other tests do not name (tests/generate_archs.py runs them all): greedy
tokens equal eager's for two prompt lengths, with the default and a static cache, and nothing runs eagerly."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from generate_archs import check  # noqa: E402


@pytest.mark.parametrize("arch, cache", [
    ("phi", None), ("phi3", "static"), ("falcon", None), ("bloom", "static"), ("gptj", None),
    ("mixtral", "static"), ("stablelm", None), ("olmo2", "static"),
])
def test_generate_equals_eager(arch, cache):
    row = check(arch, cache, tokens=6)
    assert row["same"], row
    assert row["eager_calls"] == 0, row["warnings"]


@pytest.mark.parametrize("arch", ["gpt_neox", "mistral"])  # `generate_archs.py --loop`: every family
def test_fxccs_decode_loop_equals_eager(arch):
    """fxcc's own decode loop (static cache): eager's ids for two prompt lengths and a left-padded batch, a second
    prompt length compiling nothing more. (Families it declines say why: tests/test_decode_loop.py.)"""
    from generate_archs import check_loop

    row = check_loop(arch, tokens=6, calls=("greedy7", "greedy5", "padded"))
    calls = {c["call"]: c for c in row["calls"]}
    assert all(c.get("same") for c in calls.values()), row
    assert {c["loop"][0] for c in calls.values()} == {"fxcc's decode loop"}
    first, second = calls["greedy7"], calls["greedy5"]
    assert (second["compiles"], second["step_compiles"]) == (first["compiles"], first["step_compiles"])
