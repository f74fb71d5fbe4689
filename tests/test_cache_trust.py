"""The artifact cache cannot be made to run foreign code: entries are signed with a per-user key, graph entries
are checked against a schema, libraries load only from verified entries, and unsafe directories are refused.

Each probe plants what an attacker who can write the cache would plant, and checks that the marker file the
planted code would create does not exist afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import store
from fxcc.codegen import tvm_omp
from fxcc.store import MANIFEST, ArtifactCache, cache_key

FILES = {"lib.so": b"\x7fELF" + bytes(range(256)), "source.py": b"pass\n"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.1), nn.Linear(16, 4)).eval()


def _compile(model: nn.Module, x: torch.Tensor):
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    return cm, cm(x)


def _graph_entry(cache_dir):
    (entry,) = [e for e in ArtifactCache(cache_dir).entries() if e.meta.get("kind") == "graph"]
    return entry, json.loads(entry.files["graph.json"].read_bytes())


def _rewrite(cache_dir, entry, doc, sign: str) -> None:
    """Replace graph.json the way an attacker would: re-signed with the cache's own key ("key": one who stole
    it), or with the file checksums fixed and the manifest summed without a key ("checksum")."""
    data = json.dumps(doc).encode()
    if sign == "key":
        cache = ArtifactCache(cache_dir)
        files = {n: p.read_bytes() for n, p in entry.files.items()}
        cache.remove(entry.key)
        cache.put(entry.key, {**files, "graph.json": data}, entry.meta)
        return
    (entry.dir / "graph.json").write_bytes(data)
    m = json.loads((entry.dir / MANIFEST).read_bytes())
    m["files"]["graph.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    body = {k: v for k, v in m.items() if k != "mac"}
    m["mac"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (entry.dir / MANIFEST).write_text(json.dumps(m))


def _first(doc: dict, op: str) -> dict:
    return next(n for n in doc["graph"] if n["op"] == op)


INJECTIONS = {
    "placeholder": lambda d, m: _first(d, "placeholder").update(target=f"x=__import__('pathlib').Path({str(m)!r}).touch()"),
    "node name": lambda d, m: _first(d, "placeholder").update(name=f"x=__import__('pathlib').Path({str(m)!r}).touch()"),
    "op target": lambda d, m: _first(d, "call_function").update(target="op:builtins::exec"),
    "dtype": lambda d, m: _first(d, "call_function").update(args={"t": [{"dtype": "load"}]}),
}


@pytest.mark.parametrize("how", list(INJECTIONS))
@pytest.mark.parametrize("sign", ["key", "checksum"])
def test_a_graph_entry_with_injected_code_is_refused_and_runs_nothing(cache_dir, tmp_path, how, sign):
    model, x = _mlp(), torch.randn(2, 8)
    _compile(model, x)
    entry, doc = _graph_entry(cache_dir)
    marker = tmp_path / "MARKER"
    INJECTIONS[how](doc, marker)
    _rewrite(cache_dir, entry, doc, sign)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm, out = _compile(model, x)
    assert not marker.exists()
    assert "graph cache" not in cm.variants[-1].captured.method  # captured again
    torch.testing.assert_close(out, model(x))
    if sign == "checksum":  # without the key the entry fails its signature, whatever it holds
        assert any("fails its signature check" in str(w.message) for w in caught)


def test_the_schema_accepts_what_fxcc_writes_and_names_what_it_refuses(cache_dir, caplog):
    model, x = _mlp(), torch.randn(2, 8)
    _compile(model, x)
    cm, _ = _compile(model, x)
    assert "graph cache" in cm.variants[-1].captured.method
    entry, doc = _graph_entry(cache_dir)
    _first(doc, "placeholder")["target"] = "not an identifier"
    _rewrite(cache_dir, entry, doc, "key")
    with caplog.at_level("WARNING", logger="fxcc"):
        _compile(model, x)
    assert "placeholder 'not an identifier' is not a plain identifier" in caplog.text
    assert "graph cache" in _compile(model, x)[0].variants[-1].captured.method  # stored again, sound


class _Masked(nn.Module):
    """`&` on masks exports as aten::__and__.Tensor: an op whose name is a dunder (as in BERT's attention mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * ((x > 0) & (x < 1))


def test_ops_named_by_dunders_load_from_the_graph_cache(cache_dir, caplog):
    model, x = _Masked(), torch.rand(2, 8) * 2
    _compile(model, x)
    with caplog.at_level("WARNING", logger="fxcc"):
        cm, out = _compile(model, x)
    assert "did not load" not in caplog.text
    assert "graph cache" in cm.variants[-1].captured.method
    torch.testing.assert_close(out, model(x))


def _library(tmp_path, marker) -> bytes:
    """A shared library whose constructor creates `marker`: what loading it would run."""
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\nint fxcc_parallel_launch(void) '
                   '{ return 0; }\n')
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(tmp_path / "evil.so")], check=True)
    return (tmp_path / "evil.so").read_bytes()


def _plant(cache_dir, key: str, files: dict[str, bytes], secret: bytes) -> None:
    """An entry written by someone holding `secret` (not the cache's own key)."""
    d = cache_dir / "entries" / key
    d.mkdir(parents=True, mode=0o700)
    listing = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        listing[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    forger = ArtifactCache(cache_dir)
    forger._secret = secret
    m = {"format": store.FORMAT, "key": key, "created": 0.0, "files": listing, "meta": {"kind": "tvm-omp-launcher"}}
    m["mac"] = forger._mac(m)
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_planted_launcher_library_is_never_loaded(cache_dir, tmp_path):
    marker = tmp_path / "MARKER"
    evil = _library(tmp_path, marker)
    ArtifactCache(cache_dir).put(cache_key("x", part="y"), {"a": b"b"}, {})  # the cache and its key exist
    source = hashlib.sha256(tvm_omp.SOURCE.encode()).hexdigest()
    # the key the launcher had before (its source and the machine: the same on every x86_64 install) ...
    _plant(cache_dir, cache_key("tvm-omp-launcher", source=source, machine=os.uname().machine),
           {"launcher.so": evil}, secret=b"\0" * 32)
    # ... and the key it has now, if an attacker could compute it, signed without the cache's key
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    now = cache_key("tvm-omp-launcher", source=source, machine=os.uname().machine,
                    compiler=tvm_omp._compiler_id(cc), install=store.default_cache().salt("tvm-omp-launcher"))
    _plant(cache_dir, now, {"launcher.so": evil}, secret=b"\1" * 32)
    with pytest.warns(UserWarning, match="fails its signature check"):
        lib = tvm_omp._built()
    assert not marker.exists()
    assert hasattr(lib, "fxcc_parallel_launch")  # built anew from fxcc's source, and signed now
    assert ArtifactCache(cache_dir).get(now) is not None
    assert store.default_cache().salt("tvm-omp-launcher") != ArtifactCache(tmp_path / "other").salt("tvm-omp-launcher")


def _owner_only(monkeypatch) -> None:
    """Root passes every permission check; emulate the checks an ordinary user meets (owner bits)."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *a, **kw):
        try:
            bits = os.stat(path).st_mode >> 6
        except OSError:
            return real(path, mode, *a, **kw)
        return all(not (mode & m) or bits & m for m in (os.R_OK, os.W_OK, os.X_OK))
    monkeypatch.setattr(os, "access", access)


def _not_mine(path, monkeypatch) -> None:
    """Make `path` belong to another user (as root: chown; else: fxcc is told it is someone else)."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "foreign-owned", "entries world-writable"])
def test_an_unsafe_cache_directory_is_refused_saying_how_to_fix_it(cache_dir, tmp_path, monkeypatch, how):
    model, x = _mlp(), torch.randn(2, 8)
    _compile(model, x)  # a warm cache: a graph entry an attacker could replace
    marker = tmp_path / "MARKER"
    entry, doc = _graph_entry(cache_dir)
    INJECTIONS["placeholder"](doc, marker)
    _rewrite(cache_dir, entry, doc, "key")
    if how == "foreign-owned":
        _not_mine(cache_dir, monkeypatch)
        fix = "chown"
    else:
        path = cache_dir / "entries" if how.startswith("entries") else cache_dir
        path.chmod(0o777 if "world" in how else 0o770)
        fix = "chmod go-w"
    store._warned.clear()
    store._default.clear()  # the process checks a cache's directories once, when it first uses it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm, out = _compile(model, x)
    msgs = [str(w.message) for w in caught if "artifact cache" in str(w.message)]
    assert len(msgs) == 1 and fix in msgs[0] and "compiling without the artifact cache" in msgs[0], msgs
    assert not marker.exists() and "graph cache" not in cm.variants[-1].captured.method
    torch.testing.assert_close(out, model(x))


def test_the_key_must_be_private(cache_dir):
    cache = ArtifactCache(cache_dir)
    cache.put(cache_key("k", part="a"), FILES, {})
    (cache_dir / "key").chmod(0o644)
    with pytest.warns(UserWarning, match=r"key .* is readable or writable by others .*chmod 600"):
        assert ArtifactCache(cache_dir).get(cache_key("k", part="a")) is None


def test_files_and_directories_are_private_whatever_the_umask(cache_dir):
    old = os.umask(0)
    try:
        e = ArtifactCache(cache_dir).put(cache_key("k", part="a"), FILES, {})
    finally:
        os.umask(old)
    for d in (cache_dir, cache_dir / "entries", cache_dir / "tmp", e.dir):
        assert d.stat().st_mode & 0o777 == 0o700, d
    for f in (*e.dir.iterdir(), cache_dir / "key"):
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_a_shared_team_cache_is_used_with_its_key_and_ignored_without(tmp_path, monkeypatch):
    team, mine = tmp_path / "team", tmp_path / "mine"
    monkeypatch.setenv("FXCC_CACHE_DIR", str(team))
    model, x = _mlp(), torch.randn(2, 8)
    _compile(model, x)  # the team's build
    team_key = tmp_path / "team.key"
    team_key.write_bytes((team / "key").read_bytes())
    team_key.chmod(0o600)
    monkeypatch.setenv("FXCC_CACHE_DIR", str(mine))
    monkeypatch.setenv("FXCC_CACHE_SHARED", str(team))
    monkeypatch.setenv("FXCC_CACHE_TRUST", str(team_key))
    cm, out = _compile(model, x)
    assert "graph cache" in cm.variants[-1].captured.method  # from the team's cache ...
    torch.testing.assert_close(out, model(x))
    copied = ArtifactCache(mine).entries()  # ... copied into mine, signed with my key
    assert copied and all(ArtifactCache(mine).get(e.key) for e in copied)
    assert (mine / "key").read_bytes() != team_key.read_bytes()
    team_key.write_text("0" * 64 + "\n")  # a key that did not sign the team's entries: nothing of it is used
    shutil.rmtree(mine)
    store._default.clear()
    cm, out = _compile(model, x)
    assert "graph cache" not in cm.variants[-1].captured.method
    torch.testing.assert_close(out, model(x))
