"""Generated TVM kernels on torch's OpenMP threads instead of TVM's own thread pool (CPU).

A TVM kernel runs its parallel loop through a function pointer its library holds
(`__TVMBackendParallelLaunch`), which TVM's runtime points at its own thread pool when it loads the
library. Torch's ops, MKL and oneDNN run on OpenMP's threads. Two pools on two cores fight: after a
torch op, OpenMP's workers spin for a while, and a TVM kernel starting then shares a core with them;
TVM's workers sleep between kernels and are woken for each. fxcc points each loaded kernel library at
a small launcher that runs the parallel loop on OpenMP's threads, the ones torch's ops use, with
torch's thread count (read at each launch, so `torch.set_num_threads` applies): one pool for the model.

The launcher is C, built once per machine with the system C compiler (`cc -fopenmp`) and kept in the
artifact cache, loaded only from a verified entry (fxcc.store). It names `libgomp.so.1`, which torch has loaded already, so it joins torch's OpenMP
runtime rather than starting another. Without a C compiler, or if the build fails, kernels stay on
TVM's pool (logged once); `FXCC_TVM_POOL=tvm` keeps them there by choice.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fxcc.options import settings
from fxcc.store import cache_key, default_cache

log = logging.getLogger(__name__)

SOURCE = r"""
#include <omp.h>
#include <stdint.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

/* TVMBackendParallelLaunch on OpenMP: task i of n on OpenMP thread i; each task computes its own
   share of the loop from (task_id, num_task). n is what torch's own parallel loops use: the calling
   thread's OpenMP thread count, which torch.set_num_threads sets. */
int fxcc_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = omp_get_max_threads();
  if (num_task > 0 && num_task < n) n = num_task;
  if (n <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata);
  }
  int failed = 0;
  #pragma omp parallel num_threads(n) reduction(|: failed)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    failed |= flambda(omp_get_thread_num(), &env, cdata) != 0;
  }
  return failed ? -1 : 0;
}
"""


def enabled() -> bool:
    """Whether TVM kernels run on torch's OpenMP threads (the launcher built and loaded)."""
    return launcher() is not None


@functools.cache
def launcher() -> ctypes.CDLL | None:
    """The loaded launcher library, built on first use and cached; None when it cannot be had."""
    if settings().tvm_pool == "tvm":
        return None
    try:
        lib = _built()
    except Exception as e:  # no C compiler, no OpenMP: TVM's pool still works
        log.info("TVM kernels run on TVM's own thread pool (the OpenMP launcher is unavailable: %s)", e)
        return None
    return lib


def attach(path: str) -> bool:
    """Point the kernel library at `path` (already loaded by TVM) to the OpenMP launcher; False if it has
    no parallel loop or the launcher is unavailable."""
    lib = launcher()
    if lib is None:
        return False
    try:
        slot = ctypes.c_void_p.in_dll(ctypes.CDLL(path), "__TVMBackendParallelLaunch")
    except ValueError:  # no parallel loop in this kernel
        return False
    slot.value = ctypes.cast(lib.fxcc_parallel_launch, ctypes.c_void_p).value
    return True


def _built() -> ctypes.CDLL:
    """The launcher's shared library, loaded: from a verified artifact cache entry, or compiled now (and stored
    there). Its key names the compiler that builds it and a value derived from this cache's own secret, so
    nobody can predict it to plant a library there (and a library under it must carry the cache's signature)."""
    cache = default_cache()
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    key = cache_key("tvm-omp-launcher", source=hashlib.sha256(SOURCE.encode()).hexdigest(),
                    machine=os.uname().machine, compiler=_compiler_id(cc), install=cache.salt("tvm-omp-launcher"))
    entry = cache.get(key)
    if entry is not None and "launcher.so" in entry.files:
        return ctypes.CDLL(str(entry.files["launcher.so"]))
    with tempfile.TemporaryDirectory(prefix="fxcc-omp-") as d:  # private (0700): loaded from here when not cached
        src, out = Path(d, "launcher.c"), Path(d, "launcher.so")
        src.write_text(SOURCE)
        p = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-fopenmp", str(src), "-o", str(out)],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"{cc} failed: {p.stderr.strip()[:300]}")
        entry = cache.put(key, {"launcher.so": out.read_bytes()}, {"kind": "tvm-omp-launcher"})
        return ctypes.CDLL(str(entry.files["launcher.so"] if entry is not None else out))


@functools.cache
def _compiler_id(cc: str) -> str:
    """The C compiler's path and version line: another compiler builds another library."""
    try:
        p = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return f"{os.path.realpath(cc)}:{p.stdout.splitlines()[0] if p.stdout else p.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{os.path.realpath(cc)}:{type(e).__name__}"
