"""The artifact cache under faults: an unusable directory costs caching, with one warning, never the compile;
a read-only one is read, not written; dead writers' temporary directories are swept and counted."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import cli, store
from fxcc.store import ArtifactCache, cache_key
from test_cache_trust import _owner_only

FILES = {"lib.so": b"\x7fELF" + bytes(range(256)), "source.py": b"pass\n"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    store._default.clear()
    store._warned.clear()
    yield tmp_path / "cache"
    store._default.clear()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def _compile_counting_warnings(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}")
        out = cm(x)
    torch.testing.assert_close(out, model(x))
    return cm, [str(w.message) for w in caught if "artifact cache" in str(w.message)]


def _unusable(cache_dir, how: str, monkeypatch) -> None:
    if how == "a file":
        cache_dir.write_text("not a directory")
    else:
        _owner_only(monkeypatch)
        cache_dir.mkdir(mode=0o700)
        cache_dir.chmod(0o000)


@pytest.mark.parametrize("how", ["a file", "mode 000"])
def test_an_unusable_cache_dir_costs_caching_with_one_warning_never_the_compile(cache_dir, monkeypatch, capsys,
                                                                                how):
    _unusable(cache_dir, how, monkeypatch)
    try:
        model, x = _model(), torch.randn(2, 8)
        cm, msgs = _compile_counting_warnings(model, x)
        assert len(msgs) == 1 and "compiling without the artifact cache" in msgs[0], msgs
        assert ("is a file" if how == "a file" else "cannot read") in msgs[0]
        cm2, msgs = _compile_counting_warnings(model, x)  # once per process
        assert msgs == [] and "graph cache" not in cm2.variants[-1].captured.method
        for action in (["verify"], ["verify", "--evict"], ["ls"], ["prune", "--max-size", "1M"]):
            assert cli.main(["cache", *action]) == 1
            err = capsys.readouterr().err
            assert str(cache_dir) in err and "Traceback" not in err
    finally:
        if cache_dir.is_dir():
            cache_dir.chmod(0o700)


def test_a_read_only_cache_is_read_not_written_and_verify_evict_says_what_it_could_not_evict(cache_dir, monkeypatch,
                                                                                          capsys):
    model, x = _model(), torch.randn(2, 8)
    _compile_counting_warnings(model, x)  # a warm cache
    bad = cache_key("kernel", ir="damaged")
    ArtifactCache(cache_dir).put(bad, FILES, {}).files["lib.so"].write_bytes(b"flipped")
    _owner_only(monkeypatch)
    for d in (cache_dir / "entries", cache_dir):
        d.chmod(0o500)
    store._default.clear()
    try:
        cm, msgs = _compile_counting_warnings(model, x)
        assert len(msgs) == 1 and "read-only" in msgs[0], msgs
        assert "graph cache" in cm.variants[-1].captured.method  # what is there is used
        assert cli.main(["cache", "verify", "--evict"]) == 1
        out = capsys.readouterr().out
        assert (f"{bad}: file lib.so has 7 bytes, the manifest says 260 (truncated?) (NOT evicted: the cache is "
                "read-only)") in out
        assert "could not be evicted" in out and (cache_dir / "entries" / bad).exists()
    finally:
        for d in (cache_dir, cache_dir / "entries"):
            d.chmod(0o700)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_dirs_of_dead_writers_are_swept_at_once_and_counted(cache_dir, capsys):
    cache = ArtifactCache(cache_dir)
    cache.put(cache_key("kernel", ir="a"), FILES, {})
    host = store._host()
    dead = cache_dir / "tmp" / f"put-{host}-{_dead_pid()}-x1"
    alive = cache_dir / "tmp" / f"put-{host}-{os.getpid()}-x2"
    for d in (dead, alive):
        d.mkdir()
        (d / "lib.so").write_bytes(b"\0" * (1 << 20))
    assert cli.main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 temporary directories of writers that died (1.0 MiB)" in out
    assert "1 writes in progress (1.0 MiB)" in out
    assert not dead.exists() and alive.exists()
    assert cache.size() >= (1 << 20)  # a write in progress counts towards the size
    dead.mkdir()
    ArtifactCache(cache_dir).problem()  # a new process's first use sweeps at once
    assert not dead.exists()
