"""The Optuna study wrapper: storages, study creation, quiet trials and a progress line, for every search.

Per-kernel tuning (fxcc.autotune.tune), the plan search (fxcc.plan_search) and the mixed-precision search
(fxcc.autotune.mixed_precision) create their studies here. Studies persist in an Optuna storage: by
default `tuning.db` (SQLite) in the artifact cache directory; any Optuna RDB URL (PostgreSQL for a
cluster) or `journal:PATH` lets several processes or machines share one study (same study name).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from fxcc.store import default_cache


def optuna_module() -> Any:
    """Optuna, imported on first use (an optional dependency), or an ImportError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ImportError("fxcc: tuning needs Optuna: pip install 'fxcc[tune]' (or pip install optuna)") from None
    return optuna


def create_study(*, sampler: Any, name: str | None = None, storage: str | None = None,
                 directions: Sequence[str] = ("minimize",), persist: bool = True) -> Any:
    """An Optuna study. With `persist` (the default) it lives in `storage` (`open_storage`) under `name`,
    joined when it exists (several workers share it); without, in memory for this search only."""
    optuna = optuna_module()
    return optuna.create_study(storage=open_storage(storage) if persist else None, sampler=sampler,
                               study_name=name, directions=list(directions), load_if_exists=persist)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna's own line per trial off while a search runs (its progress is `Progress`'s job)."""
    optuna = optuna_module()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


_storages: dict[str, Any] = {}


def open_storage(storage: str | None = None) -> Any:
    """An Optuna storage: None -> `sqlite:///<cache root>/tuning.db`; an RDB URL; or `journal:PATH`.

    Storages are opened once per process and URL.
    """
    optuna = optuna_module()
    if storage is None:
        path = default_cache().private_path("tuning.db")
        if path is None:  # no usable cache (warned once): studies live in memory for this process
            return _storages.setdefault("memory", optuna.storages.InMemoryStorage())
        storage = f"sqlite:///{path}"
    if not isinstance(storage, str) or not (storage.startswith("journal:") or "://" in storage):
        raise ValueError(f"fxcc: tuning storage {storage!r} is neither an Optuna RDB URL (sqlite:///PATH, "
                         "postgresql+psycopg2://USER:PASSWORD@HOST/DB, ...) nor journal:PATH")
    if storage in _storages:
        return _storages[storage]
    try:
        if storage.startswith("journal:"):
            path = storage[len("journal:"):]
            if not path:
                raise ValueError("journal: needs a file path, e.g. journal:/shared/fxcc-tuning.log")
            opened = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        else:
            # SQLite: wait for a lock held by another process instead of failing at once
            kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
            opened = _rdb_storage(optuna, storage, kwargs)
            if storage.startswith("sqlite"):
                _serialize_sqlite(opened.engine)
    except Exception as e:
        raise ValueError(f"fxcc: cannot open tuning storage {redact(storage)}: {type(e).__name__}: {e}") from e
    _storages[storage] = opened
    return opened


def _rdb_storage(optuna: Any, url: str, kwargs: dict | None) -> Any:
    """RDBStorage; retried when another process creating the same new database won the race for its tables."""
    attempt = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:
            attempt += 1
            if attempt == 5 or not any(m in str(e) for m in ("already exists", "UNIQUE constraint failed")):
                raise
            time.sleep(0.2 * attempt)


def _serialize_sqlite(engine: Any) -> None:
    """Make each SQLite transaction take the database's write lock at its start (BEGIN IMMEDIATE).

    Optuna claims a queued trial by reading that it is WAITING and then writing RUNNING, in one transaction that
    asks for a row lock; SQLite has none, and its driver runs the read outside any transaction. Two workers then
    both claim the same queued trial (the search's baseline, enqueued for every worker), and the second to finish
    it fails ("Cannot tell a COMPLETE trial"). With the lock taken first, the read and the write are one step;
    a worker waits for another's transaction (the 60 s busy timeout) instead.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN (deferred, before writes only) is off

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made while the storage was set up predate the hooks


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


class Progress:
    """One line on stderr: tqdm when installed, else a plain line redrawn in place (on a terminal only)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.n = total, label, 0
        self.bar: Any = None
        self.plain = False
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.plain = sys.stderr.isatty()
        else:
            self.bar = tqdm(total=total, desc=label, unit="trial", file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, best_ms: float | None) -> None:
        self.n += 1
        note = "no valid candidate yet" if best_ms is None else f"best {best_ms:.4g} ms"
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(1)
        elif self.plain:
            sys.stderr.write(f"\r{self.label} {self.n}/{self.total} {note}\033[K")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        """What the current step is doing (a long trial shows it is alive)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text[:80], refresh=True)
        elif self.plain:
            sys.stderr.write(f"\r{self.label} {self.n}/{self.total} {text[:80]}\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain and self.n:
            sys.stderr.write("\n")
