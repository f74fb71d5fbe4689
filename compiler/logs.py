"""Log topics, as torch's TORCH_LOGS: `FXCC_LOGS=recompiles,+passes` shows what fxcc does, by topic, on stderr.

Every module logs through `logging.getLogger(__name__)` (under "fxcc"); a topic names the modules that tell
one story. A topic alone logs at INFO, `+topic` at DEBUG, `-topic` only errors. A few stories cut across
modules and have a logger of their own (`topic_logger("recompiles")`: why a compiled module compiled again).
Without FXCC_LOGS fxcc leaves logging to the application (warnings still reach the root logger).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

# topic -> the loggers it switches (a logger covers its children: "fxcc.codegen" is every backend)
TOPICS: dict[str, tuple[str, ...]] = {
    "recompiles": ("fxcc.recompiles",),
    "passes": ("fxcc.pipeline", "fxcc.passes"),
    "kernels": ("fxcc.autotune.select", "fxcc.autotune.pools", "fxcc.codegen"),
    "tuning": ("fxcc.autotune.tune", "fxcc.autotune.study", "fxcc.autotune.search", "fxcc.autotune.mixed_precision",
               "fxcc.autotune.tp_plan", "fxcc.plan_search"),
    "graph_cache": ("fxcc.graph_cache",),
    "cache": ("fxcc.store",),
    "capture": ("fxcc.capture",),
    "dycl": ("fxcc.dycl", "fxcc.dycl_analysis", "fxcc.dycl_rewrite"),
    "runtime": ("fxcc.runtime", "fxcc.api"),
    "all": ("fxcc",),
}
LEVELS = {"+": logging.DEBUG, "-": logging.ERROR, "": logging.INFO}
FORMAT = "[fxcc %(levelname)s] %(name)s: %(message)s"


@contextlib.contextmanager
def held_back(name: str, level: int) -> Iterator[None]:
    """Logger `name` shows only records at `level` or above while the block runs (a library's expected
    warnings, or tracebacks fxcc reports in its own words)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def dropped(name: str, prefix: str) -> Iterator[None]:
    """Logger `name` drops the records whose message (its format string) starts with `prefix` while the block
    runs; its other records, at whatever level it logs, pass as before."""
    logger = logging.getLogger(name)

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextlib.contextmanager
def partial_graph_unprinted() -> Iterator[None]:
    """torch.export prints the graph it traced so far to stderr where a trace fails on a data-dependent value (a
    branch on a tensor's value, a symbolic float whose value the program needs), before raising: the failures fxcc
    handles itself (a DyCL split, the float a constant) and tells in its own words. The block's stderr is held and
    written out after it, without that graph."""
    held, graph = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(held):
            yield
    except Exception as e:
        graph = getattr(e, "partial_fx_graph", None)
        raise
    finally:
        text = held.getvalue()
        if isinstance(graph, str) and graph:
            text = text.replace(f"{graph}\n", "")
        sys.stderr.write(text)


def topic_logger(topic: str) -> logging.Logger:
    """The logger of a cross-module topic (its name is in TOPICS)."""
    if topic not in TOPICS or len(TOPICS[topic]) != 1:
        raise ValueError(f"no topic logger {topic!r}; topics with one: "
                         f"{', '.join(t for t, names in TOPICS.items() if len(names) == 1)}")
    return logging.getLogger(TOPICS[topic][0])


def parse(spec: str, variable: str = "FXCC_LOGS") -> tuple[tuple[str, int], ...]:
    """`recompiles,+passes,-tuning` -> ((topic, level), ...); an unknown topic is an error listing the valid ones."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        sign = item[0] if item[0] in "+-" else ""
        name = item[len(sign):]
        if name not in TOPICS:
            raise ValueError(f"{variable}={spec!r}: unknown log topic {name!r}; topics: {', '.join(TOPICS)} "
                             "(prefix + for debug detail, - for errors only)")
        out.append((name, LEVELS[sign]))
    return tuple(out)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (tests and tools replace it)."""

    stream = property(lambda self: sys.stderr, lambda self, _value: None)


_handler: logging.Handler | None = None
_applied: tuple[tuple[str, int], ...] = ()


def configure(topics: tuple[tuple[str, int], ...]) -> None:
    """Apply parsed topics: one stderr handler on the "fxcc" logger (not propagated, so nothing prints twice)
    and each topic's loggers at their level; other fxcc loggers show warnings. No topics: undo it all."""
    global _handler, _applied
    if topics == _applied:
        return
    root = logging.getLogger("fxcc")
    for name, _ in _applied:
        for logger in TOPICS[name]:
            logging.getLogger(logger).setLevel(logging.NOTSET)
    if _handler is not None:
        root.removeHandler(_handler)
        root.propagate, _handler = True, None
        root.setLevel(logging.NOTSET)
    _applied = topics
    if not topics:
        return
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(_handler)
    root.propagate = False
    root.setLevel(logging.WARNING)
    for name, level in topics:
        for logger in TOPICS[name]:
            logging.getLogger(logger).setLevel(level)


_from_env: tuple[tuple[str, int], ...] = ()


def follow_env(topics: tuple[tuple[str, int], ...]) -> None:
    """Apply FXCC_LOGS's topics when they changed since last read (`fxcc.compile` calls this), leaving what a
    program configured itself (the CLI's per-command topics) while the variable stays as it was."""
    global _from_env
    if topics != _from_env:
        _from_env = topics
        configure(topics)
