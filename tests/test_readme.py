"""The README's Python blocks run as written, in order, in one namespace (as a reader runs them one after the
other); a block marked ```python no-run (it needs a database server) must still parse. The sample IR the
README shows is what its tour prints."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[str, str, int]]:
    """(info string, code, line) of every fenced block."""
    text = README.read_text()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _normal(line: str) -> str:
    """Content hashes (kernel ids, cache keys) vary with library versions: compared as a placeholder."""
    return re.sub(r'"k?[0-9a-f]{12,}"', '"#"', " ".join(line.split()))


def sample_ir() -> list[str]:
    """The IR lines the README shows after 'The IR prints MLIR-like'."""
    text = README.read_text()
    after = text[text.index("The IR prints MLIR-like"):]
    return [line for line in FENCE.search(after).group(2).splitlines() if line.strip()]


def test_python_blocks_are_runnable_or_marked():
    infos = {info for info, _, _ in blocks() if info.startswith("python")}
    assert infos <= {"python", "python no-run"}, infos
    for info, code, line in blocks():
        if info == "python no-run":
            compile(code, f"README.md:{line}", "exec")


def test_readme_python_blocks_run_and_print_the_sample_ir(capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a kernel candidate dropped on this machine is not a failure
        for info, code, line in blocks():
            if info != "python":
                continue
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"README.md block at line {line} fails: {type(e).__name__}: {e}")
    out = capfd.readouterr()
    printed = {_normal(x) for x in (out.out + out.err).splitlines()}
    missing = [x for x in sample_ir() if _normal(x) not in printed]
    assert not missing, f"README's sample IR lines not printed by its tour: {missing}"
