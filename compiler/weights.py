"""Weights loaded by the compile: `fxcc.compile(model_on_meta, state_dict=...)` (fxcc.runtime).

The model is built on the meta device (`with torch.device("meta"): model = Model(config)`) and its weights come
from a state dict or a safetensors file. Capture sees stand-ins of the right shape, dtype and device that hold
no values (`stand_in`); each one is read from the checkpoint when a pass first asks for its values
(fxcc.ir.fetch_attr, whole) or only where this rank's shard lies (fxcc.ir.fetch_rows, tp-shard), so a rank of a
tensor-parallel compile materialises its shards, the replicated norms and embeddings, and nothing else. The
graph then holds each weight once, in the form its kernels read (merged, quantized, sharded); the model stays
on the meta device and holds none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from . import ir


class Checkpoint:
    """Where the weights of a meta-device model are read from: a state dict (name -> tensor) or the path of a
    safetensors file, read a slice at a time (`get_slice`)."""

    def __init__(self, state: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        self.path = os.fspath(state) if isinstance(state, (str, os.PathLike)) else None
        self.state = None if self.path is not None else state
        if self.path is not None:
            from safetensors import safe_open

            if not self.path.endswith(".safetensors"):
                raise ValueError(f"fxcc.compile(state_dict={self.path!r}): a checkpoint path must be a .safetensors "
                                 "file (or pass a state dict: name -> tensor)")
            with safe_open(self.path, framework="pt") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        elif isinstance(state, Mapping):
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        else:
            raise TypeError(f"fxcc.compile(state_dict=...) takes a mapping of names to tensors or the path of a "
                            f".safetensors file, not {type(state).__name__}")
        self.released = False

    def __repr__(self) -> str:
        return f"Checkpoint({self.path or f'state dict of {len(self.shapes)} tensors'})"

    def callers(self) -> set[int]:
        """The addresses of the storages of a state dict's tensors (the caller's: the graph may hold them as they
        are, and the caller may still write them); none for a file."""
        if self.state is None:
            return set()
        return {t.untyped_storage().data_ptr() for t in self.state.values() if isinstance(t, torch.Tensor)}

    def release(self) -> None:
        """Forget a state dict once the compile has read what it needs: its tensors are the caller's to keep or
        drop (a file is read again at a recompile)."""
        if self.path is None:
            self.state, self.released = None, True

    def _check_open(self, name: str) -> None:
        if self.released:
            raise RuntimeError(f"fxcc: recompiling needs weight {name!r} again, and the state dict passed to "
                               "fxcc.compile(state_dict=...) was let go after the first compile (so the compiled "
                               "module does not keep every original weight alive). Pass the path of a .safetensors "
                               "file instead (read again, a slice at a time), or call with the shapes of the first "
                               "call (or mark dims dynamic before it: CompileOptions(dynamic=True)).")

    def full(self, name: str) -> torch.Tensor:
        self._check_open(name)
        if self.path is not None:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                t = f.get_tensor(name)
            # safetensors hands a tensor out 32 bytes past a 64-byte boundary; TVM's kernels read aligned memory,
            # so they would copy it (at every call, or a copy kept beside it): moved once into torch's (aligned)
            # memory instead, the copy replaces the original
            return t if torch._C._data_address(t) % 64 == 0 else t.clone()
        return self.state[name].detach()

    def rows(self, name: str, dim: int, spans: list[tuple[int, int]]) -> torch.Tensor:
        """The pieces (start, length) of tensor `name` along `dim`, concatenated: only they are read."""
        self._check_open(name)
        if self.path is None:
            t = self.state[name].detach()
            return torch.cat([t.narrow(dim, s, n) for s, n in spans], dim).contiguous()
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            sl = f.get_slice(name)
            lead = (slice(None),) * dim
            return torch.cat([sl[lead + (slice(s, s + n),)] for s, n in spans], dim).contiguous()

    def check(self, module: nn.Module, what: str) -> None:
        """Every meta tensor of `module` is in the checkpoint with its shape, and every checkpoint name is one of
        the module's tensors (torch's `load_state_dict(strict=True)`)."""
        tensors = _named_tensors(module)
        meta = {n: t for n, t in tensors.items() if t.is_meta}
        if not meta:
            raise ValueError(f"fxcc.compile({what}, state_dict=...): the model has no tensor on the meta device; "
                             "build it there (`with torch.device('meta'): model = ...`) so that only what the "
                             "compiled graph needs is materialised, or load the weights yourself and leave out "
                             "state_dict")
        missing = sorted(set(meta) - set(self.shapes))
        unexpected = sorted(set(self.shapes) - set(tensors))
        wrong = [f"{n}: checkpoint {list(self.shapes[n])}, model {list(t.shape)}" for n, t in meta.items()
                 if n in self.shapes and self.shapes[n] != tuple(t.shape)]
        if missing or unexpected or wrong:
            raise ValueError(f"fxcc.compile({what}, state_dict={self!r}) does not fit the model: "
                             + "; ".join(s for s in (f"missing {missing[:8]}" if missing else "",
                                                     f"unexpected {unexpected[:8]}" if unexpected else "",
                                                     f"shapes differ: {wrong[:4]}" if wrong else "") if s)
                             + ". A non-persistent buffer (rotary inv_freq) is not in state_dict(): build it on "
                               "the CPU, or add it to the dict under its name.")


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


@contextlib.contextmanager
def stand_in(module: nn.Module, checkpoint: Checkpoint, device: torch.device) -> Iterator[None]:
    """While capture runs, every meta tensor of `module` is a stand-in on `device` (pages never touched: no
    memory is used) marked with where its values are (fxcc.ir.pending); afterwards the meta tensors are back."""
    saved: list[tuple[dict, str, Any]] = []
    stubs: dict[int, torch.Tensor] = {}  # one stand-in per meta tensor (tied weights stay tied)
    for path, mod in module.named_modules(remove_duplicate=False):
        for table in (mod._parameters, mod._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                full = f"{path}.{name}" if path else name
                stub = stubs.get(id(t))
                if stub is None:
                    stub = ir.pending(torch.empty(t.shape, dtype=t.dtype, device=device), checkpoint, full)
                    if isinstance(t, nn.Parameter):
                        stub = ir.pending(nn.Parameter(stub, requires_grad=t.requires_grad), checkpoint, full)
                    stubs[id(t)] = stub
                saved.append((table, name, t))
                table[name] = stub
    try:
        yield
    finally:
        for table, name, t in saved:
            table[name] = t
