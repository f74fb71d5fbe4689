"""Shared test helpers: golden-file comparison and output comparison over every tensor leaf."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "golden"

# Triton fixes its interpreter mode when first imported (transformers imports it), so the CPU tests that run
# Triton kernels (tests/test_triton.py, which also opts fxcc in) need it set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check the code fxcc generates: a compiled variant must not turn eager because a timing on a loaded machine
# said so (CompileOptions.time_vs_eager; tests/test_vs_eager.py turns it on where it tests the check itself).
os.environ.setdefault("FXCC_TIME_VS_EAGER", "0")
# Likewise a warm compile must not measure a choice again because the cold one's timings, on a loaded machine, were
# too noisy to settle it (FXCC_SETTLE_TRIES; tests of that re-measurement set it themselves).
os.environ.setdefault("FXCC_SETTLE_TRIES", "1")
# Parallel workers (pytest -n, the Makefile's `make test`) share the cores: each gets its share of threads, else
# every worker's torch (and TVM, which takes torch's count) spins one thread per core and they contend. The processes
# a test starts get the same count (the environment): the thread count is part of a CPU kernel choice's cache key,
# and a test's new process must find what the test stored.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def check_golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/<name>; FXCC_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN_DIR / name
    text = text.rstrip("\n") + "\n"
    if os.environ.get("FXCC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run with FXCC_UPDATE_GOLDEN=1 to write it")
    expected = path.read_text()
    assert text == expected, (f"output differs from {path} (FXCC_UPDATE_GOLDEN=1 rewrites it)\n"
                              f"--- expected\n{expected}\n--- got\n{text}")


@pytest.fixture(autouse=True, scope="session")
def _private_artifact_cache(tmp_path_factory):
    """Tests never read or fill the user's ~/.cache/fxcc: one fresh cache directory per test session."""
    old = os.environ.get("FXCC_CACHE_DIR")
    os.environ["FXCC_CACHE_DIR"] = str(tmp_path_factory.mktemp("fxcc-cache"))
    yield
    if old is None:
        os.environ.pop("FXCC_CACHE_DIR", None)
    else:
        os.environ["FXCC_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test that sets torch's thread count (the bench CLI does) must not change it for the tests after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Kernels a test builds run in Triton's interpreter without a GPU (the backend's explicit CPU opt-in); seeded."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    torch.manual_seed(0)


@pytest.fixture
def scratch_registry():
    """Passes a test registers are gone after it: the pass registry is restored."""
    from fxcc.pipeline import PASSES

    before = dict(PASSES)
    yield
    PASSES.clear()
    PASSES.update(before)


@pytest.fixture
def golden():
    return check_golden


def tensor_leaves(x: Any, path: str = "out") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a model output, with where it sits: ModelOutputs, dicts, sequences, KV caches."""
    if isinstance(x, torch.Tensor):
        return [(path, x)]
    if isinstance(x, dict):  # also transformers ModelOutput (an OrderedDict)
        return [leaf for k, v in x.items() for leaf in tensor_leaves(v, f"{path}.{k}")]
    if isinstance(x, (list, tuple)):
        return [leaf for i, v in enumerate(x) for leaf in tensor_leaves(v, f"{path}[{i}]")]
    layers = getattr(x, "layers", None)  # transformers Cache: per-layer keys and values
    if layers is not None:
        return [leaf for i, layer in enumerate(layers)
                for name in ("keys", "values") for leaf in tensor_leaves(getattr(layer, name, None),
                                                                         f"{path}.layers[{i}].{name}")]
    return []


def assert_outputs_close(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Same output structure (types included) and every tensor leaf equal within tolerance."""
    assert type(got) is type(expected), f"output type {type(got).__name__}, expected {type(expected).__name__}"
    g, e = tensor_leaves(got), tensor_leaves(expected)
    assert [p for p, _ in g] == [p for p, _ in e], "output structure differs"
    assert e, "no tensors to compare"
    for (path, a), (_, b) in zip(g, e):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, p=path: f"{p}: {m}")
