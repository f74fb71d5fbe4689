"""The artifact cache: generated source, built libraries, tuned parameters, one directory per key.

Layout under the root (`FXCC_CACHE_DIR`, else `~/.cache/fxcc`):

    key                           the per-user secret that signs every entry (created 0600)
    entries/<key>/manifest.json   {"format", "key", "created", "files": {name: {sha256, size}}, "meta", "mac"}
    entries/<key>/<name>          the raw files (lib.so, source.py, ...)
    tmp/                          entries being written (put-<host>-<pid>-...), evicted ones being deleted
    tuning.db                     the default Optuna storage (fxcc.autotune.study)

Everything cached is named by `cache_key`; what a key depends on besides its own parts (library versions,
fxcc's own source, the target machine) comes from `library_versions` and `target_id`, both here.

Entries are data that fxcc loads and runs (built libraries, graphs), so whoever can write them can run code
as you. Hence: the root and every directory in it must be yours and writable by nobody else (else the cache
is refused with a message saying how to fix it); files are written 0600 whatever the umask; every manifest
carries an HMAC-SHA256 under the secret, checked with every file's sha256 on every read. An entry that
fails is evicted with a warning and reads as a miss, so the caller rebuilds it. Nothing is pickled.

An entry is written in a temporary directory and renamed into place, so readers see a whole entry or none;
when two writers race, the first rename wins (unless `supersedes` says the newer one is better). The last
use of an entry is the mtime of its manifest; `prune` evicts least recently used entries first.

A cache that cannot be used (the root is a file, unreadable, not yours, writable by others) turns caching
off with one warning; a read-only one is read but not written. A shared team cache (`FXCC_CACHE_SHARED`,
signed with the key named by `FXCC_CACHE_TRUST`) is searched after your own, never written; an entry found
there is checked and copied into your cache, and used from there.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .options import settings

log = logging.getLogger(__name__)

FORMAT = 2  # 2: manifests are signed (mac) instead of checksummed
MANIFEST = "manifest.json"
KEY_FILE = "key"
DEFAULT_MAX_BYTES = 4 << 30
STALE_TMP_S = 3600.0  # a temporary directory this old belongs to a writer that died (other hosts' writers)
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CHUNK = 1 << 20


def cache_key(kind: str, *, target: str | None = None, **parts: str) -> str:
    """The key of everything fxcc caches (sha256 hex, first 24 digits): over the kind of thing (so two kinds
    never share a key), its named parts, the library versions it was made with, and, for what depends on the
    machine (generated code, timings), `target`'s id (`target_id`: device model, CPU features, threads)."""
    for name, value in parts.items():
        if not isinstance(value, str):
            raise TypeError(f"cache_key: part {name!r} must be a str, got {type(value).__name__}")
    fixed = {"kind": kind, "versions": library_versions()}
    if target is not None:
        fixed["target"] = target_id(target)
    clash = set(fixed) & set(parts)
    if clash:
        raise TypeError(f"cache_key: part {clash.pop()!r} is set by cache_key itself")
    text = json.dumps(sorted({**parts, **fixed}.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@cache
def library_versions() -> str:
    """Versions of what generated code depends on, e.g. "python=3.11;torch=2.13.0+cpu;tvm=0.27.0;fxcc=0.1.0+3fa2...".

    Read from installed package metadata, so neither TVM nor Triton is imported. fxcc's version carries a hash
    of its own source files: an editable install changes its code generators without changing its version.
    """
    out = [f"python={sys.version_info.major}.{sys.version_info.minor}"]
    for label, dist in (("torch", "torch"), ("tvm", "apache-tvm"), ("triton", "triton"), ("fxcc", "fxcc")):
        try:
            out.append(f"{label}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ";".join(out) + f"+{fxcc_source_digest()[:16]}"


@cache
def fxcc_files() -> tuple[str, ...]:
    """fxcc's own source files (its four folders), found without importing the packages."""
    dirs = {os.path.dirname(spec.origin) for m in ("fxcc", "fxcc.passes", "fxcc.codegen", "fxcc.autotune")
            if (spec := importlib.util.find_spec(m)) is not None and spec.origin}
    return tuple(os.path.join(d, f) for d in sorted(dirs) for f in sorted(os.listdir(d)) if f.endswith(".py"))


@cache
def fxcc_source_digest() -> str:
    """sha256 over fxcc's own source files (names and contents), once per process."""
    h = hashlib.sha256()
    for path in fxcc_files():
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


@functools.cache
def _cpu() -> str:
    """The CPU's model name and a hash of its feature flags: a VM may hide features (AVX-512) of its model."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features"))), [])
    return f"{name}:{hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:12]}"


# environment variables of the libraries kernels call that change which instructions they use (and so their
# timings, the choices made from them, and sometimes their rounding). Not TVM_NUM_THREADS: fxcc sets it from
# torch's thread count (in the id already) when it imports TVM, so it would change the id within one process.
LIBRARY_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA",
               "NVIDIA_TF32_OVERRIDE")


def target_id(target: str) -> str:
    """What a kernel's code and choice depend on besides its IR: the device and, on CPU, its features and the
    threads; torch's fp32 matmul precision; the library environment variables that are set."""
    env = ",".join(f"{k}={os.environ[k]}" for k in LIBRARY_ENV if k in os.environ)
    common = f"fp32={torch.get_float32_matmul_precision()}" + (f":{env}" if env else "")
    if target == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}:{common}"
    return f"cpu:{platform.machine()}:{_cpu()}:threads={torch.get_num_threads()}:{common}"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's contents as bytes (copied to the CPU and made contiguous when needed): what hashes read."""
    data = t.detach().reshape(-1)
    if data.device.type != "cpu":
        data = data.cpu()
    return data.contiguous().view(torch.uint8).numpy().data


class CacheError(OSError):
    """The artifact cache cannot be used (`fxcc cache` reports it; a compile goes on without caching)."""


@dataclass
class Entry:
    """One cache entry: its files by name (paths inside `dir`), meta as stored, bytes on disk, last use."""

    key: str
    dir: Path
    meta: dict
    files: dict[str, Path]
    size: int
    last_used: float


@dataclass
class Problem:
    """A damaged or refused entry found by `verify`: what is wrong, and whether it was evicted (or why not)."""

    key: str
    problem: str
    evicted: bool = False
    not_evicted: str = ""  # why eviction failed (a read-only cache), when it was asked for


@dataclass
class Swept:
    """Temporary directories removed by a sweep (their writers died) and what is still being written."""

    removed: int = 0
    removed_bytes: int = 0
    in_progress: int = 0
    in_progress_bytes: int = 0


_warned: set[tuple[str, str]] = set()


def _warn_once(root: Path, text: str) -> None:
    if (str(root), text) not in _warned:
        _warned.add((str(root), text))
        warnings.warn(f"fxcc: {text}", stacklevel=4)


# `put` rescans the whole cache (to evict past max_bytes) at most this often unless this process's own writes
# take it past the limit: a scan reads every entry's manifest, and a compile stores one entry per kernel, so
# scanning on every put made compiles slow down with the cache's size (minutes with a zoo-sized cache)
PRUNE_RESCAN_S = 30.0


class ArtifactCache:
    """A directory of signed entries keyed by `cache_key`; safe for many processes at once.

    `trust`: the key file that signs a cache that is not yours (a shared team cache, read only); by default
    the cache is yours and its key is `<root>/key`, created on first use.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None, *,
                 trust: str | os.PathLike | None = None) -> None:
        self.root = Path(settings().cache_dir if root is None else root).expanduser()
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"fxcc: cache max_bytes must be a number of bytes >= 0, got {max_bytes!r}")
        self.trust = None if trust is None else Path(trust).expanduser()
        self.shared: ArtifactCache | None = None  # a team cache searched after this one (default_cache sets it)
        self._secret: bytes | None = None
        self._problem: str | None = None  # why the cache cannot be used at all
        self.writable = self.trust is None
        self._opened = False
        self.removed = Swept()  # temporary directories of dead writers this process removed (`sweep`)
        # the cache's size as of the last scan (`prune`) plus what this process stored since, and when that
        # scan was: `put` scans again only past the limit or after PRUNE_RESCAN_S (other processes write too)
        self._estimate: tuple[int, float] | None = None

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------------------------ opening

    def problem(self) -> str | None:
        """Why this cache cannot be used (None when it can): checks the root, its directories and its key once."""
        if not self._opened:
            self._opened = True
            try:
                self._open()
            except CacheError as e:
                self._problem = str(e)
        return self._problem

    def _usable(self) -> bool:
        """True when the cache can be read; otherwise caching is off, with one warning per process."""
        problem = self.problem()
        if problem is not None:
            _warn_once(self.root, f"{problem}; compiling without the artifact cache")
            return False
        return True

    def _open(self) -> None:
        if self.trust is not None:  # a shared cache: read only, entries signed with the named key
            self._secret = _read_key(self.trust, mine=False)
            _check_dir(self.root, owner=None, what="shared artifact cache", follow=True)
            return
        root = self.root
        try:
            if not root.exists():
                root.mkdir(parents=True, exist_ok=True)
                root.chmod(0o700)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise CacheError(f"cannot create the artifact cache {root} ({e.strerror}); set FXCC_CACHE_DIR to a "
                             "directory you can write") from None
        _check_dir(root, owner=os.getuid(), what="artifact cache", follow=True)
        self.writable = os.access(root, os.W_OK | os.X_OK)
        for sub in ("entries", "tmp"):
            d = root / sub
            if not d.exists() and self.writable:
                _mkdir_private(d)
            if d.exists():
                _check_dir(d, owner=os.getuid(), what="artifact cache directory", follow=False)
        key = root / KEY_FILE
        if not key.exists() and self.writable:
            _create_key(key)
        self._secret = _read_key(key, mine=True)
        if not self.writable:
            _warn_once(root, f"the artifact cache {root} is read-only: entries are used but nothing new is stored "
                             f"(chmod u+w {root}, or set FXCC_CACHE_DIR to a directory you can write)")
        else:
            self.sweep()

    def private_path(self, name: str) -> Path | None:
        """A file of this cache's own next to its entries (tuning.db), created 0600; None when the cache is
        unusable or read-only (the caller keeps its data in memory)."""
        _check_name(name)
        if not self._usable() or not self.writable:
            return None
        path = self.root / name
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            os.chmod(path, 0o600)
        except OSError as e:
            _warn_once(self.root, f"cannot create {path} ({e.strerror}); it is kept in memory")
            return None
        return path

    def salt(self, label: str) -> str:
        """A value only this cache's owner can compute (an HMAC of `label` under its secret), for keys that
        must not be predictable: "" when the cache is unusable (then nothing is stored under the key anyway)."""
        if self.problem() is not None or self._secret is None:
            return ""
        return hmac.new(self._secret, label.encode(), hashlib.sha256).hexdigest()[:16]

    # ------------------------------------------------------------------------------------ reading

    def get(self, key: str) -> Entry | None:
        """The entry for `key` after checking its signature and every checksum, or None (missing, or damaged:
        then evicted). On a miss, a shared cache is asked and what it holds is copied into this one."""
        d = self._dir(key)
        if not self._usable():
            return None
        for _ in range(3):
            try:
                ino = d.lstat().st_ino
            except FileNotFoundError:
                return self._from_shared(key)
            manifest, problem = self._check(key, d)
            if problem is None:
                return self._entry(key, d, manifest, touch=True)
            if not _same_dir(d, ino):  # evicted or replaced by another process meanwhile: look again
                continue
            if problem == _OLD_FORMAT:
                log.info("artifact cache entry %s was written by an older fxcc; rebuilding it", key)
            else:
                warnings.warn(f"fxcc: artifact cache entry {key} ({d}) is damaged: {problem}; "
                              "it was evicted and will be rebuilt", stacklevel=2)
            self._evict(key, ino)
            return None
        return None

    def _from_shared(self, key: str) -> Entry | None:
        """A miss here: the shared cache's entry, read once and checked in memory, copied into this cache."""
        shared = self.shared
        if shared is None or not self.writable or shared.problem() is not None:
            return None
        got = shared.read_verified(key)
        if got is None:
            return None
        log.info("artifact cache entry %s copied from the shared cache %s", key, shared.root)
        return self.put(key, *got)

    def read_verified(self, key: str) -> tuple[dict[str, bytes], dict] | None:
        """An entry's files and meta, each file read once and checked against the signed manifest in memory
        (nothing is re-read from a directory others may write); None when missing or failing a check."""
        d = self._dir(key)
        if not self._usable():
            return None
        manifest, problem = self._read_manifest(key, d)
        if manifest is None:
            if problem != f"{MANIFEST} is missing":
                log.warning("artifact cache %s: entry %s is refused: %s", self.root, key, problem)
            return None
        files = {}
        for name, want in manifest["files"].items():
            try:
                data = (d / name).read_bytes()
            except OSError:
                return None
            if len(data) != want.get("size") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
                log.warning("artifact cache %s: entry %s is refused: file %s fails its check", self.root, key, name)
                return None
            files[name] = data
        return files, manifest["meta"]

    def entries(self) -> list[Entry]:
        """Every entry whose manifest reads (checksums of files are not checked: see `verify`), newest first."""
        self._require()
        out = []
        for key, d in self._dirs():
            manifest = self._read_manifest(key, d)[0]
            if manifest is not None:
                entry = self._entry(key, d, manifest, touch=False)
                if entry is not None:
                    out.append(entry)
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def verify(self, evict: bool = False) -> list[Problem]:
        """Check every entry fully (signature, files); a Problem for each damaged one, which `evict=True` also
        removes (a Problem then says whether it could)."""
        self._require()
        problems = []
        for key, d in self._dirs():
            try:
                ino = d.lstat().st_ino
            except FileNotFoundError:
                continue
            problem = self._check(key, d)[1]
            if problem is not None and _same_dir(d, ino):
                p = Problem(key, problem)
                if evict:
                    why = self._evict(key, ino)
                    p.evicted, p.not_evicted = why is None, why or ""
                problems.append(p)
        return problems

    # ------------------------------------------------------------------------------------ writing

    def put(self, key: str, files: dict[str, bytes], meta: dict,
            supersedes: Callable[[dict], bool] | None = None) -> Entry | None:
        """Store an entry atomically, signed; None when the cache cannot store (unusable or read-only: warned
        once). When a valid entry for `key` exists already (a concurrent writer won), that one is kept and
        returned, unless `supersedes(its meta)` says the new one is better (a tuned choice over an untuned one)."""
        d = self._dir(key)
        for name, data in files.items():
            _check_name(name)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"fxcc: cache entry {key}: file {name!r} must be bytes, got {type(data).__name__}")
        try:
            meta = json.loads(json.dumps(meta))  # what a reader will get back (tuples become lists)
        except (TypeError, ValueError) as e:
            raise TypeError(f"fxcc: cache entry {key}: meta must be JSON-serialisable ({e})") from None
        if not self._usable() or not self.writable:
            return None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"put-{_writer_id()}-", dir=self.root / "tmp"))
        except OSError as e:
            _warn_once(self.root, f"cannot write to the artifact cache {self.root} ({e.strerror}); nothing is "
                                  "stored (check its permissions and free space, or set FXCC_CACHE_DIR)")
            return None
        try:
            listing = {}
            for name, data in files.items():
                data = bytes(data)
                # no fsync: an entry torn by a power loss fails its checksums and is rebuilt
                _write_private(tmp / name, data)
                listing[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            manifest = {"format": FORMAT, "key": key, "created": time.time(), "files": listing, "meta": meta}
            manifest["mac"] = self._mac(manifest)
            text = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _write_private(tmp / MANIFEST, text)
            for _ in range(3):
                try:
                    os.rename(tmp, d)
                except OSError as e:  # the key exists: keep a valid entry, replace a damaged or a weaker one
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    existing = self.get(key)
                    if existing is None:
                        continue
                    if supersedes is None or not supersedes(existing.meta):
                        return existing
                    try:
                        if self._evict(key, d.lstat().st_ino) is not None:
                            return existing  # it cannot be replaced (another process holds it)
                    except FileNotFoundError:
                        pass
                    continue
                tmp = None
                break
            else:
                raise OSError(f"fxcc: could not store cache entry {key} in {d}: the directory keeps being "
                              "replaced by other processes; check what else writes to the cache")
        except OSError as e:
            _warn_once(self.root, f"cannot write to the artifact cache {self.root} ({e}); nothing is stored")
            return None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        size = len(text) + sum(f["size"] for f in listing.values())
        entry = Entry(key, d, meta, {name: d / name for name in listing}, size, time.time())
        if self.max_bytes:
            total, scanned = self._estimate or (0, float("-inf"))
            total += size
            self._estimate = (total, scanned)
            if total > self.max_bytes or time.monotonic() - scanned > PRUNE_RESCAN_S:
                self.prune(self.max_bytes, keep=key)
        return entry

    def remove(self, key: str) -> bool:
        """Evict one entry; False when there was none."""
        d = self._dir(key)
        self._require()
        try:
            ino = d.lstat().st_ino
        except FileNotFoundError:
            return False
        return self._evict(key, ino) is None

    def prune(self, max_bytes: int, keep: str | None = None) -> list[str]:
        """Evict entries, least recently used first, until the cache (writes in progress included) holds at
        most `max_bytes`. Unreadable entries go first; temporary directories of dead writers are removed at
        once. Returns the evicted keys. `keep` is never evicted (the entry just written)."""
        self._require()
        swept = self.sweep()
        sized = []
        for key, d in self._dirs():
            manifest, problem = self._read_manifest(key, d)
            if manifest is None:
                sized.append((float("-inf"), key, d, _du(d)))
                continue
            entry = self._entry(key, d, manifest, touch=False)
            if entry is not None:
                sized.append((entry.last_used, key, d, entry.size))
        total = sum(s[3] for s in sized) + swept.in_progress_bytes
        removed = []
        scanned = time.monotonic()
        for _, key, d, size in sorted(sized, key=lambda s: (s[0], s[1])):
            if total <= max_bytes:
                break
            if key == keep:
                continue
            try:
                ino = d.lstat().st_ino
            except FileNotFoundError:
                continue
            if self._evict(key, ino) is None:
                removed.append(key)
            total -= size
        self._estimate = (total, scanned)
        if removed:
            log.info("artifact cache %s: evicted %d least recently used entries", self.root, len(removed))
        return removed

    def clear(self) -> int:
        """Evict every entry (the tuning storage next to them is kept); returns how many were evicted."""
        self._require()
        n = 0
        for key, d in self._dirs():
            try:
                ino = d.lstat().st_ino
            except FileNotFoundError:
                continue
            n += self._evict(key, ino) is None
        self.sweep(0.0)
        return n

    def size(self) -> int:
        """Bytes held by readable entries and by writes in progress."""
        return sum(e.size for e in self.entries()) + self.sweep().in_progress_bytes

    def sweep(self, older_than_s: float = STALE_TMP_S) -> Swept:
        """Remove temporary directories whose writer died (this host: its PID is gone; others: older than
        `older_than_s`) and count those still being written. The first use of a cache in a process sweeps;
        `removed` adds up what every sweep removed."""
        out = Swept()
        tmp = self.root / "tmp"
        try:
            names = os.listdir(tmp)
        except OSError:
            return out
        now, host = time.time(), _host()
        for n in names:
            p = tmp / n
            size = _du(p)
            m = re.match(r"(?:put|evict)-([0-9a-f]{8})-(\d+)-", n)
            try:
                if m and m[1] == host:
                    dead = not _alive(int(m[2]))
                else:
                    dead = now - p.lstat().st_mtime >= older_than_s
            except FileNotFoundError:
                continue
            if dead and self.writable:
                shutil.rmtree(p, ignore_errors=True)
                out.removed, out.removed_bytes = out.removed + 1, out.removed_bytes + size
            else:
                out.in_progress, out.in_progress_bytes = out.in_progress + 1, out.in_progress_bytes + size
        if out.removed:
            log.info("artifact cache %s: removed %d temporary directories of writers that died (%d bytes)",
                     self.root, out.removed, out.removed_bytes)
            self.removed.removed += out.removed
            self.removed.removed_bytes += out.removed_bytes
        return out

    # ------------------------------------------------------------------------------------ helpers

    def _require(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise CacheError(problem)

    def _mac(self, manifest: dict) -> str:
        body = {k: v for k, v in manifest.items() if k != "mac"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()

    def _dir(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"fxcc: bad artifact cache key {key!r}: use letters, digits, '-' and '_' "
                             "(at most 128), e.g. a cache_key(...) result")
        return self.root / "entries" / key

    def _dirs(self) -> list[tuple[str, Path]]:
        try:
            names = sorted(os.listdir(self.root / "entries"))
        except FileNotFoundError:
            return []
        return [(n, self.root / "entries" / n) for n in names if _KEY.fullmatch(n)]

    def _entry(self, key: str, d: Path, manifest: dict, touch: bool) -> Entry | None:
        m = d / MANIFEST
        try:
            if touch and self.writable:
                try:
                    os.utime(m)
                except PermissionError:  # a read-only cache: usable, without LRU order
                    pass
            st = m.stat()
        except FileNotFoundError:  # evicted meanwhile
            return None
        files = {name: d / name for name in manifest["files"]}
        size = st.st_size + sum(int(f["size"]) for f in manifest["files"].values())
        return Entry(key, d, manifest["meta"], files, size, st.st_mtime)

    def _evict(self, key: str, ino: int) -> str | None:
        """Rename the entry out of the way (readers then see a miss), then delete it; None when evicted, else
        why not. `ino` is the entry directory as it was examined: if another process replaced it meanwhile,
        the new entry is put back rather than deleted."""
        d = self._dir(key)
        why = "the cache is read-only" if not self.writable else None
        if why is None:
            try:
                trash = self.root / "tmp" / f"evict-{_writer_id()}-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(d, trash)
            except FileNotFoundError:
                return "it is gone"
            except OSError as e:  # e.g. a read-only file system: the entry stays a miss for every reader
                why = e.strerror or str(e)
        if why is not None:
            log.warning("cannot evict artifact cache entry %s (%s); remove %s by hand", key, why, d)
            return why
        if trash.lstat().st_ino != ino:
            try:
                os.rename(trash, d)
                return "another process replaced it"
            except OSError:
                pass
        shutil.rmtree(trash, ignore_errors=True)
        return None

    def _read_manifest(self, key: str, d: Path) -> tuple[dict | None, str | None]:
        """(manifest, None) when it parses, is signed with this cache's key and names this key; else
        (None, problem)."""
        try:
            _check_dir(d, owner=os.getuid() if self.trust is None else None, what="artifact cache entry",
                       follow=False)
        except CacheError as e:
            return None, str(e)
        try:
            raw = (d / MANIFEST).read_bytes()
        except FileNotFoundError:
            return None, f"{MANIFEST} is missing"
        except OSError as e:
            return None, f"{MANIFEST} cannot be read ({e.strerror})"
        try:
            m = json.loads(raw)
        except ValueError:
            return None, f"{MANIFEST} is not valid JSON (truncated?)"
        if not isinstance(m, dict) or not isinstance(m.get("format"), int):
            return None, f"{MANIFEST} has no format"
        if m["format"] != FORMAT:
            return None, _OLD_FORMAT
        mac = m.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(m)):
            return None, (f"{MANIFEST} fails its signature check (it was not written with this cache's key "
                          f"{self.trust or self.root / KEY_FILE}, or was changed since)")
        if m.get("key") != key:
            return None, f"{MANIFEST} belongs to key {m.get('key')!r}"
        files = m.get("files")
        if not isinstance(files, dict) or not isinstance(m.get("meta"), dict):
            return None, f"{MANIFEST} lacks its file list or meta"
        for name in files:
            try:
                _check_name(name)
            except ValueError:
                return None, f"{MANIFEST} names a bad file {name!r}"
        return m, None

    def _check(self, key: str, d: Path) -> tuple[dict | None, str | None]:
        """The manifest, then every file's size and sha256."""
        m, problem = self._read_manifest(key, d)
        if problem is not None:
            return None, problem
        for name, want in m["files"].items():
            try:
                size, digest = _hash(d / name)
            except FileNotFoundError:
                return None, f"file {name} is missing"
            except OSError as e:
                return None, f"file {name} cannot be read ({e.strerror})"
            if size != want.get("size"):
                cut = " (truncated?)" if isinstance(want.get("size"), int) and size < want["size"] else ""
                return None, f"file {name} has {size} bytes, the manifest says {want.get('size')}{cut}"
            if digest != want.get("sha256"):
                return None, f"file {name} fails its sha256 check"
        return m, None


_OLD_FORMAT = "written by another fxcc version (unknown format)"
_default: dict[tuple, ArtifactCache] = {}


def default_cache() -> ArtifactCache:
    """The process's cache at `FXCC_CACHE_DIR` (read now), else `~/.cache/fxcc`; with a shared team cache
    behind it when FXCC_CACHE_SHARED and FXCC_CACHE_TRUST are both set."""
    s = settings()
    spec = (Path(s.cache_dir).expanduser(), s.cache_shared, s.cache_trust)
    if spec not in _default:
        own = _default[spec] = ArtifactCache(spec[0])
        if s.cache_shared and s.cache_trust:
            own.shared = ArtifactCache(s.cache_shared, trust=s.cache_trust)
        elif s.cache_shared or s.cache_trust:
            _warn_once(spec[0], "FXCC_CACHE_SHARED (a team cache) and FXCC_CACHE_TRUST (the key that signed it) "
                                "go together; the shared cache is not used")
    return _default[spec]


# ---------------------------------------------------------------------------------------- checks


def _check_dir(path: Path, owner: int | None, what: str, follow: bool) -> None:
    """Raise CacheError unless `path` is a directory (not a link, unless `follow`), owned by `owner` (any when
    None), that nobody else can write: whoever can write it can make fxcc load their code."""
    try:
        st = path.stat() if follow else path.lstat()
    except FileNotFoundError:
        raise CacheError(f"the {what} {path} does not exist") from None
    except OSError as e:
        raise CacheError(f"cannot read the {what} {path} ({e.strerror}): chmod 700 {path}, or set "
                         "FXCC_CACHE_DIR to a directory of yours") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        raise CacheError(f"the {what} {path} is {kind}, not a directory: point FXCC_CACHE_DIR at a directory "
                         "(or remove it)")
    if owner is not None and st.st_uid != owner:
        raise CacheError(f"the {what} {path} belongs to user {st.st_uid}, not to you ({owner}): whoever owns it "
                         f"can make fxcc run their code. Use a directory of your own (FXCC_CACHE_DIR), or "
                         f"`chown -R {owner} {path}` if it should be yours")
    writable = st.st_mode & (0o022 if owner is not None else 0o002)
    if writable:
        who = "others" if st.st_mode & 0o002 else "its group"
        raise CacheError(f"the {what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): whoever "
                         f"can write it can make fxcc run their code. `chmod go-w {path}` (or chmod 700), or set "
                         "FXCC_CACHE_DIR to a directory of yours")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CacheError(f"cannot read the {what} {path} (mode {stat.S_IMODE(st.st_mode):04o}): chmod u+rx "
                         f"{path}, or set FXCC_CACHE_DIR to a directory of yours")


def _create_key(path: Path) -> None:
    """Write a new 256-bit secret, 0600; another process creating it at the same time wins."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise CacheError(f"cannot create the artifact cache key {path} ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    finally:
        os.close(fd)


def _read_key(path: Path, mine: bool) -> bytes:
    """The secret in `path`. Your own cache's key must be yours and readable by you only; a trusted team key
    must not be writable by anyone but its owner."""
    for _ in range(50):  # a key being created by another process right now: wait for its contents
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            hint = "run one compile with a writable cache to create it" if mine else "set FXCC_CACHE_TRUST to it"
            raise CacheError(f"the artifact cache key {path} is missing ({hint})") from None
        except OSError as e:
            raise CacheError(f"cannot read the artifact cache key {path} ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            text = os.read(fd, 4096).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if mine and (st.st_uid != os.getuid() or st.st_mode & 0o077):
            raise CacheError(f"the artifact cache key {path} is readable or writable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}): anyone who reads it can sign "
                             f"entries. `chmod 600 {path}` (and clear the cache), or set FXCC_CACHE_DIR")
        if not mine and st.st_mode & 0o022:
            raise CacheError(f"the trusted key {path} (FXCC_CACHE_TRUST) is writable by others: chmod go-w {path}")
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return bytes.fromhex(text)
        time.sleep(0.02)
    raise CacheError(f"the artifact cache key {path} is malformed: remove it (and clear the cache) to start anew")


def _mkdir_private(path: Path) -> None:
    try:
        path.mkdir(mode=0o700)
        path.chmod(0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheError(f"cannot create {path} ({e.strerror}); set FXCC_CACHE_DIR to a directory you can "
                         "write") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write a new file readable and writable by the owner only (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    bad = (not isinstance(name, str) or not name or name in (".", "..", MANIFEST, KEY_FILE) or name.startswith(".")
           or "/" in name or "\\" in name or "\0" in name or (os.altsep and os.altsep in name))
    if bad:
        raise ValueError(f"fxcc: bad file name {name!r} for a cache entry: use a plain name like 'lib.so' "
                         f"(no path separators, no leading dot, not {MANIFEST!r} or {KEY_FILE!r})")


@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _writer_id() -> str:
    """`<host>-<pid>`: a temporary directory's name tells `sweep` whether its writer is still alive."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _hash(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _same_dir(d: Path, ino: int) -> bool:
    try:
        return d.lstat().st_ino == ino
    except FileNotFoundError:
        return False


def _du(d: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(d):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total
