"""Imports point one way: base <- passes, codegen <- autotune <- top (DESIGN.md's layer table).

Every module of the four folders is parsed with `ast` (nothing is imported) and mapped to its layer; a
module-level import of a higher layer fails, and so does a function-local import of an fxcc module of
another package or layer (an import hidden in a function to dodge a cycle), except in the one registry
file. Imports of optional third-party libraries inside functions (tvm, triton, optuna, ...) are fine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"compiler": "fxcc", "passes": "fxcc.passes", "codegen": "fxcc.codegen", "autotune": "fxcc.autotune"}
BASE = {"fxcc.ir", "fxcc.dialects", "fxcc.gather", "fxcc.rewrite", "fxcc.pipeline", "fxcc.options", "fxcc.store",
        "fxcc.quality", "fxcc.measure", "fxcc.watch", "fxcc.logs", "fxcc.rng"}
RANK = {"base": 0, "passes": 1, "codegen": 1, "autotune": 2, "top": 3}
# what each layer may import besides itself
ALLOWED = {"base": {"base"}, "passes": {"base"}, "codegen": {"base"}, "autotune": {"base", "passes", "codegen"},
           "top": {"base", "passes", "codegen", "autotune"}}
REGISTRY = "fxcc.pipeline"  # the name -> "module:Class" table of passes: the one file that may name upward


def modules() -> dict[str, Path]:
    """Every fxcc module name -> its file; a package is named by its __init__.py."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


MODULES = modules()


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    for pkg in ("fxcc.passes", "fxcc.codegen", "fxcc.autotune"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg.split(".")[1]
    return "top"  # fxcc itself (its lazy names are the top layer's) and the rest of compiler/


def package(module: str) -> str:
    """The folder a module lives in, by import name: fxcc (compiler/), fxcc.passes, fxcc.codegen, fxcc.autotune."""
    path = MODULES.get(module)
    return module if path is not None and path.stem == "__init__" else module.rpartition(".")[0] or module


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The fxcc modules an import statement in `module` loads ([] for other libraries)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "fxcc" or a.name.startswith("fxcc.")]
    base = node.module or ""
    if node.level:
        pkg = module if MODULES[module].stem == "__init__" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    if base != "fxcc" and not base.startswith("fxcc."):
        return []
    # `from fxcc import ir` loads the module fxcc.ir; `from fxcc.codegen import Built` the package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported fxcc module, line, inside a function) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((m, child.lineno, local) for m in resolve(module, child))
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, False)
    return out


def violations() -> list[str]:
    bad = []
    for module, path in MODULES.items():
        here = layer(module)
        where = path.relative_to(ROOT)
        for target, line, local in imports(module):
            there = layer(target)
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{where}:{line}: {module} ({here}) imports {target} ({there}): an upward import")
            elif local and module != REGISTRY and (there != here or package(target) != package(module)):
                bad.append(f"{where}:{line}: {module} imports {target} inside a function: import it at the top "
                           "(a cycle is answered by moving the shared piece down)")
    return bad


def test_every_import_points_down():
    bad = violations()
    assert not bad, "imports that break the layers:\n" + "\n".join(bad)


def test_package_init_imports_only_the_base():
    """`import fxcc` (which every fxcc import runs first) loads base modules only; the rest is lazy."""
    init = [(t, line) for t, line, local in imports("fxcc") if not local]
    upward = [f"compiler/__init__.py:{line}: {t}" for t, line in init if layer(t) != "base"]
    assert not upward, upward


def test_checker_sees_a_violation(tmp_path):
    """The checker itself: an upward and a hidden import in a made-up pass are both reported."""
    fake = ROOT / "passes" / "_layers_probe.py"
    fake.write_text("from fxcc.autotune import tune\n\ndef f():\n    from fxcc import ir\n")
    try:
        MODULES["fxcc.passes._layers_probe"] = fake
        bad = [b for b in violations() if "_layers_probe" in b]
    finally:
        MODULES.pop("fxcc.passes._layers_probe")
        fake.unlink()
    assert len(bad) == 2 and "passes/_layers_probe.py:1" in bad[0] and "upward" in bad[0]
    assert "passes/_layers_probe.py:4" in bad[1] and "inside a function" in bad[1]


@pytest.mark.parametrize("stmt", ["from fxcc.pipeline import Pass", "import fxcc"])
def test_base_import_loads_no_runtime_backend_or_autotune(stmt):
    """What DESIGN.md promises a pass author: the base alone, no runtime, no backend, no autotune."""
    code = f"import sys; {stmt}; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('fxcc'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    above = [m for m in loaded if m != "fxcc" and layer(m) != "base"]
    assert not above, above
    assert {"fxcc", "fxcc.pipeline"} <= set(loaded) or stmt == "import fxcc"
