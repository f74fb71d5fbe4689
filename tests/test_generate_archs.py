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
