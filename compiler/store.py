"""The artifact cache: generated source, built libraries, tuned parameters, one directory per key.

Layout under the root (`FXCC_CACHE_DIR`, else `~/.cache/fxcc`; created 0700):

    entries/<key>/manifest.json   {"format", "key", "created", "files": {name: {sha256, size}}, "meta", "checksum"}
    entries/<key>/<name>          the raw files (lib.so, source.py, ...)
    tmp/                          entries being written, and evicted ones being deleted
    tuning.db                     the default Optuna storage (fxcc.autotune.tune)

Everything cached is named by `cache_key`; what a key depends on besides its own parts (library versions,
the target machine) comes from `library_versions` and `target_id`, both here.

An entry is written in a temporary directory and renamed into place, so readers see a whole entry or
none; when two writers race, the first rename wins and the second returns the winner's entry. Readers
check every file's size and sha256 and the manifest's own checksum: a damaged entry is evicted with a
warning and reads as a miss, so the caller rebuilds it. Nothing is pickled. The last use of an entry is
the mtime of its manifest; `prune` evicts least recently used entries first.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .options import settings

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
DEFAULT_MAX_BYTES = 4 << 30
STALE_TMP_S = 3600.0  # a temporary directory this old belongs to a writer that died
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CHUNK = 1 << 20


def cache_key(kind: str, *, target: str | None = None, **parts: str) -> str:
    """The key of everything fxcc caches (sha256 hex, first 24 digits): over the kind of thing (so two kinds
    never share a key), its named parts, the library versions it was made with, and, for what depends on the
    machine (generated code, timings), `target`'s id (`target_id`: device model, CPU threads)."""
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
    """Versions of what generated code depends on, e.g. "python=3.11;torch=2.13.0+cpu;tvm=0.27.0;fxcc=0.1.0".

    Read from installed package metadata, so neither TVM nor Triton is imported.
    """
    out = [f"python={sys.version_info.major}.{sys.version_info.minor}"]
    for label, dist in (("torch", "torch"), ("tvm", "apache-tvm"), ("triton", "triton"), ("fxcc", "fxcc")):
        try:
            out.append(f"{label}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ";".join(out)


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def target_id(target: str) -> str:
    """What a kernel's code and choice depend on besides its IR: the device and, on CPU, the threads."""
    if target == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.machine()}:{_cpu_name()}:threads={torch.get_num_threads()}"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's contents as bytes (copied to the CPU and made contiguous when needed): what hashes read."""
    data = t.detach().reshape(-1)
    if data.device.type != "cpu":
        data = data.cpu()
    return data.contiguous().view(torch.uint8).numpy().data


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing; a directory created here is private to the user (0700)."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask
    return path


@dataclass
class Entry:
    """One cache entry: its files by name (paths inside `dir`), meta as stored, bytes on disk, last use."""

    key: str
    dir: Path
    meta: dict
    files: dict[str, Path]
    size: int
    last_used: float


class ArtifactCache:
    """A directory of entries keyed by `cache_key`; safe for many processes at once."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        self.root = Path(settings().cache_dir if root is None else root).expanduser()
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"fxcc: cache max_bytes must be a number of bytes >= 0, got {max_bytes!r}")

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------------------------ reading

    def get(self, key: str) -> Entry | None:
        """The entry for `key` after checking every checksum, or None (missing, or damaged: then evicted)."""
        d = self._dir(key)
        for _ in range(3):
            try:
                ino = d.stat().st_ino
            except FileNotFoundError:
                return None
            manifest, problem = _check(key, d)
            if problem is None:
                return self._entry(key, d, manifest, touch=True)
            if not _same_dir(d, ino):  # evicted or replaced by another process meanwhile: look again
                continue
            warnings.warn(f"fxcc: artifact cache entry {key} ({d}) is damaged: {problem}; "
                          "it was evicted and will be rebuilt", stacklevel=2)
            self._evict(key, ino)
            return None
        return None

    def entries(self) -> list[Entry]:
        """Every entry whose manifest reads (checksums of files are not checked: see `verify`), newest first."""
        out = []
        for key, d in self._dirs():
            manifest = _read_manifest(key, d)[0]
            if manifest is not None:
                entry = self._entry(key, d, manifest, touch=False)
                if entry is not None:
                    out.append(entry)
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def verify(self, evict: bool = False) -> list[tuple[str, str]]:
        """Check every entry fully; (key, problem) for each damaged one, which `evict=True` also removes."""
        problems = []
        for key, d in self._dirs():
            try:
                ino = d.stat().st_ino
            except FileNotFoundError:
                continue
            problem = _check(key, d)[1]
            if problem is not None and _same_dir(d, ino):
                problems.append((key, problem))
                if evict:
                    self._evict(key, ino)
        return problems

    # ------------------------------------------------------------------------------------ writing

    def put(self, key: str, files: dict[str, bytes], meta: dict) -> Entry:
        """Store an entry atomically; when a valid entry for `key` exists already (a concurrent writer won),
        that one is kept and returned."""
        d = self._dir(key)
        for name, data in files.items():
            _check_name(name)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"fxcc: cache entry {key}: file {name!r} must be bytes, got {type(data).__name__}")
        try:
            meta = json.loads(json.dumps(meta))  # what a reader will get back (tuples become lists)
        except (TypeError, ValueError) as e:
            raise TypeError(f"fxcc: cache entry {key}: meta must be JSON-serialisable ({e})") from None
        private_dir(self.root)
        private_dir(self.root / "entries")
        tmp = Path(tempfile.mkdtemp(prefix=f"put-{key}-", dir=private_dir(self.root / "tmp")))
        try:
            listing = {}
            for name, data in files.items():
                data = bytes(data)
                # no fsync: an entry torn by a power loss fails its checksums and is rebuilt
                (tmp / name).write_bytes(data)
                listing[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            manifest = {"format": FORMAT, "key": key, "created": time.time(), "files": listing, "meta": meta}
            manifest["checksum"] = _manifest_checksum(manifest)
            text = json.dumps(manifest, indent=1, sort_keys=True).encode()
            (tmp / MANIFEST).write_bytes(text)
            for _ in range(3):
                try:
                    os.rename(tmp, d)
                except OSError as e:  # the key exists: keep a valid entry, replace a damaged one
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    existing = self.get(key)
                    if existing is not None:
                        return existing
                    continue
                tmp = None
                break
            else:
                raise OSError(f"fxcc: could not store cache entry {key} in {d}: the directory keeps being "
                              "replaced by other processes; check what else writes to the cache")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        size = len(text) + sum(f["size"] for f in listing.values())
        entry = Entry(key, d, meta, {name: d / name for name in listing}, size, time.time())
        if self.max_bytes:
            self.prune(self.max_bytes, keep=key)
        return entry

    def remove(self, key: str) -> bool:
        """Evict one entry; False when there was none."""
        d = self._dir(key)
        try:
            ino = d.stat().st_ino
        except FileNotFoundError:
            return False
        return self._evict(key, ino)

    def prune(self, max_bytes: int, keep: str | None = None) -> list[str]:
        """Evict entries, least recently used first, until the cache holds at most `max_bytes`.

        Unreadable entries go first; temporary directories left by dead writers are removed too. Returns the
        evicted keys. `keep` is never evicted (the entry just written).
        """
        self._sweep_tmp()
        sized = []
        for key, d in self._dirs():
            manifest, problem = _read_manifest(key, d)
            if manifest is None:
                sized.append((float("-inf"), key, d, _du(d)))
                continue
            entry = self._entry(key, d, manifest, touch=False)
            if entry is not None:
                sized.append((entry.last_used, key, d, entry.size))
        total = sum(s[3] for s in sized)
        removed = []
        for _, key, d, size in sorted(sized, key=lambda s: (s[0], s[1])):
            if total <= max_bytes:
                break
            if key == keep:
                continue
            try:
                ino = d.stat().st_ino
            except FileNotFoundError:
                continue
            if self._evict(key, ino):
                removed.append(key)
            total -= size
        if removed:
            log.info("artifact cache %s: evicted %d least recently used entries", self.root, len(removed))
        return removed

    def clear(self) -> int:
        """Evict every entry (the tuning storage next to them is kept); returns how many were evicted."""
        n = 0
        for key, d in self._dirs():
            try:
                ino = d.stat().st_ino
            except FileNotFoundError:
                continue
            n += self._evict(key, ino)
        self._sweep_tmp(0.0)
        return n

    def size(self) -> int:
        """Bytes held by readable entries."""
        return sum(e.size for e in self.entries())

    # ------------------------------------------------------------------------------------ helpers

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
            if touch:
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

    def _evict(self, key: str, ino: int) -> bool:
        """Rename the entry out of the way (readers then see a miss), then delete it.

        `ino` is the entry directory as it was examined: if another process replaced it meanwhile, the new
        entry is put back rather than deleted.
        """
        d = self._dir(key)
        try:
            trash = private_dir(self.root / "tmp") / f"evict-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(d, trash)
        except FileNotFoundError:
            return False
        except OSError as e:  # e.g. a read-only cache: the entry stays a miss for every reader
            log.warning("cannot evict artifact cache entry %s (%s); remove %s by hand", key, e, d)
            return False
        if trash.stat().st_ino != ino:
            try:
                os.rename(trash, d)
                return False
            except OSError:
                pass
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _sweep_tmp(self, older_than_s: float = STALE_TMP_S) -> None:
        tmp = self.root / "tmp"
        try:
            names = os.listdir(tmp)
        except FileNotFoundError:
            return
        now = time.time()
        for n in names:
            p = tmp / n
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass


_default: dict[Path, ArtifactCache] = {}


def default_cache() -> ArtifactCache:
    """The process's cache at `FXCC_CACHE_DIR` (read now), else `~/.cache/fxcc`."""
    root = Path(settings().cache_dir).expanduser()
    if root not in _default:
        _default[root] = ArtifactCache(root)
    return _default[root]


# ---------------------------------------------------------------------------------------- checks


def _check_name(name: str) -> None:
    bad = (not isinstance(name, str) or not name or name in (".", "..", MANIFEST) or name.startswith(".")
           or "/" in name or "\\" in name or "\0" in name or (os.altsep and os.altsep in name))
    if bad:
        raise ValueError(f"fxcc: bad file name {name!r} for a cache entry: use a plain name like 'lib.so' "
                         f"(no path separators, no leading dot, not {MANIFEST!r})")


def _manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_manifest(key: str, d: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when it parses, has this format, this key and its checksum; else (None, problem)."""
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
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, f"{MANIFEST} has an unknown format (written by another fxcc version?)"
    if m.get("checksum") != _manifest_checksum(m):
        return None, f"{MANIFEST} fails its checksum"
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


def _check(key: str, d: Path) -> tuple[dict | None, str | None]:
    """The manifest, then every file's size and sha256."""
    m, problem = _read_manifest(key, d)
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


def _hash(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _same_dir(d: Path, ino: int) -> bool:
    try:
        return d.stat().st_ino == ino
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
