"""The artifact cache: atomic entries, checksums, damaged entries evicted with a warning, LRU pruning."""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import pytest
from fxcc import store
from fxcc.store import MANIFEST, ArtifactCache, cache_key, default_cache, library_versions

FILES = {"lib.so": b"\x7fELF" + bytes(range(256)) * 8, "source.py": b"def kernel(): pass\n"}
META = {"backend": "tvm", "params": {"block": 64}, "ms": 0.25}


@pytest.fixture
def cache(tmp_path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache")


def key(name: str) -> str:
    return cache_key("kernel", ir=name, backend="tvm")


def test_the_key_is_stable_and_covers_every_part(monkeypatch):
    k = cache_key("kernel", ir="a", backend="tvm")
    assert k == cache_key("kernel", backend="tvm", ir="a") and len(k) == 24
    assert k != cache_key("graph", ir="a", backend="tvm")  # two kinds of thing never share a key
    assert k != cache_key("kernel", target="cpu", ir="a", backend="tvm")  # the machine, where it matters
    assert cache_key("kernel", ir="ab", backend="") != cache_key("kernel", ir="a", backend="b")
    monkeypatch.setattr(store, "library_versions", lambda: "torch=0.0")
    assert k != cache_key("kernel", ir="a", backend="tvm")  # other libraries: another key
    with pytest.raises(TypeError, match="part 'ir' must be a str"):
        cache_key("kernel", ir=1)
    with pytest.raises(TypeError, match="'versions' is set by cache_key"):
        cache_key("kernel", versions="v")


def test_library_versions_name_what_is_installed():
    v = library_versions()
    assert "torch=" in v and "fxcc=" in v


def test_put_then_get_gives_back_files_and_meta(cache):
    k = key("a")
    put = cache.put(k, FILES, META)
    got = cache.get(k)
    assert got is not None and got.meta == META == put.meta
    assert {n: p.read_bytes() for n, p in got.files.items()} == FILES
    assert got.size > sum(len(b) for b in FILES.values())
    for d in (cache.root, cache.root / "entries", got.dir):
        assert d.stat().st_mode & 0o777 == 0o700, d
    manifest = json.loads((got.dir / MANIFEST).read_text())
    assert manifest["format"] == 2 and len(manifest["files"]["lib.so"]["sha256"]) == 64 and len(manifest["mac"]) == 64
    for f in (*got.dir.iterdir(), cache.root / "key"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert cache.get(key("missing")) is None


@pytest.mark.parametrize("name", ["../lib.so", "a/b.so", "", ".hidden", MANIFEST])
def test_file_names_must_be_plain(cache, name):
    with pytest.raises(ValueError, match="bad file name"):
        cache.put(key("a"), {name: b"x"}, {})


def test_bad_keys_and_meta_are_rejected(cache):
    with pytest.raises(ValueError, match="bad artifact cache key"):
        cache.get("../../etc")
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        cache.put(key("a"), {}, {"fn": print})


def _writer(root: str, keys: list[str], who: str, barrier) -> None:
    c = ArtifactCache(root)
    barrier.wait()
    for k in keys:
        e = c.put(k, {"lib.so": who.encode() * 4096, "source.py": who.encode()}, {"writer": who})
        assert e.files["lib.so"].read_bytes()[:1] == e.meta["writer"].encode()


def test_two_processes_writing_the_same_entries_leave_one_valid_entry_each(cache):
    keys = [key(str(i)) for i in range(40)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(cache.root), keys, who, barrier)) for who in "AB"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert cache.verify() == []
    assert sorted(os.listdir(cache.root / "entries")) == sorted(keys)
    assert os.listdir(cache.root / "tmp") == []
    for k in keys:
        e = cache.get(k)
        who = e.meta["writer"].encode()
        assert e.files["lib.so"].read_bytes() == who * 4096 and e.files["source.py"].read_bytes() == who


def _damage(entry, how: str) -> None:
    lib = entry.files["lib.so"]
    if how == "truncated":
        lib.write_bytes(lib.read_bytes()[:100])
    elif how == "flipped":
        data = bytearray(lib.read_bytes())
        data[50] ^= 1
        lib.write_bytes(bytes(data))
    elif how == "missing":
        lib.unlink()
    elif how == "manifest-truncated":
        m = entry.dir / MANIFEST
        m.write_bytes(m.read_bytes()[:40])
    elif how == "manifest-edited":
        m = entry.dir / MANIFEST
        m.write_text(m.read_text().replace('"block": 64', '"block": 32'))


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing", "manifest-truncated", "manifest-edited"])
def test_a_damaged_entry_is_evicted_with_a_warning_and_rebuilt(cache, how):
    k = key("a")
    _damage(cache.put(k, FILES, META), how)
    with pytest.warns(UserWarning, match=f"artifact cache entry {k} .* is damaged"):
        assert cache.get(k) is None
    assert not (cache.root / "entries" / k).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get(k) is None  # now simply a miss
        cache.put(k, FILES, META)
        assert cache.get(k).meta == META


def test_put_over_a_damaged_entry_replaces_it(cache):
    k = key("a")
    _damage(cache.put(k, FILES, {"old": True}), "truncated")
    with pytest.warns(UserWarning, match="damaged"):
        e = cache.put(k, FILES, META)
    assert e.meta == META and cache.get(k).meta == META


def test_put_keeps_an_existing_valid_entry(cache):
    k = key("a")
    cache.put(k, FILES, {"first": True})
    assert cache.put(k, FILES, {"second": True}).meta == {"first": True}


def test_verify_reports_damage_and_can_evict(cache):
    good, bad = key("good"), key("bad")
    cache.put(good, FILES, META)
    _damage(cache.put(bad, FILES, META), "flipped")
    assert cache.verify() == [store.Problem(bad, "file lib.so fails its sha256 check")]
    assert (cache.root / "entries" / bad).exists()
    assert cache.verify(evict=True) == [store.Problem(bad, "file lib.so fails its sha256 check", evicted=True)]
    assert cache.verify() == [] and [e.key for e in cache.entries()] == [good]


def _age(cache, k: str, t: float) -> None:
    os.utime(cache.root / "entries" / k / MANIFEST, (t, t))


def test_prune_evicts_least_recently_used_first(cache):
    ks = [key(n) for n in "abcd"]
    for i, k in enumerate(ks):
        cache.put(k, FILES, META)
        _age(cache, k, 1000.0 + i)  # a written first ... d written last
    cache.get(ks[0])  # a is now the most recently used
    size = {e.key: e.size for e in cache.entries()}
    removed = cache.prune(size[ks[0]] + size[ks[3]])
    assert removed == [ks[1], ks[2]]
    assert {e.key for e in cache.entries()} == {ks[0], ks[3]}
    assert cache.prune(size[ks[0]] + size[ks[3]]) == []


def test_a_size_cap_prunes_on_put_but_keeps_the_new_entry(tmp_path):
    cache = ArtifactCache(tmp_path / "c", max_bytes=1)
    cache.put(key("a"), FILES, META)
    cache.put(key("b"), FILES, META)
    assert [e.key for e in cache.entries()] == [key("b")]


def test_puts_under_the_cap_do_not_rescan_the_cache(tmp_path, monkeypatch):
    """A scan reads every entry; one per put made a compile's time grow with the cache (the zoo's timeouts)."""
    cache = ArtifactCache(tmp_path / "c", max_bytes=10**9)
    scans = []
    prune = cache.prune
    monkeypatch.setattr(cache, "prune", lambda *a, **k: scans.append(1) or prune(*a, **k))
    for n in "abcdef":
        cache.put(key(n), FILES, META)
    assert len(scans) == 1 and len(cache.entries()) == 6
    cache.max_bytes = 1  # this process's own writes past the cap scan at once
    cache.put(key("g"), FILES, META)
    assert len(scans) == 2 and [e.key for e in cache.entries()] == [key("g")]


def test_clear_removes_every_entry(cache):
    for n in "abc":
        cache.put(key(n), FILES, META)
    assert cache.clear() == 3
    assert cache.entries() == [] and cache.get(key("a")) is None


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "one"))
    one = default_cache()
    assert one.root == tmp_path / "one" and default_cache() is one
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "two"))
    assert default_cache().root == tmp_path / "two"
    monkeypatch.delenv("FXCC_CACHE_DIR")
    assert default_cache().root == ArtifactCache().root and str(ArtifactCache().root).endswith(".cache/fxcc")
