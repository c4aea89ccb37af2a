"""The package's imports run one way (the layer list is in quantpredict/__init__.py's docstring).

Every ``import`` in quantpredict, at module level or inside a function (a lazy import is still a dependency), is an
edge between two modules. The test fails on an edge from a lower layer to a higher one, on the pairs of modules
that must not know each other, and on any import cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "quantpredict"

#: Lowest first. Top-level modules and sub-packages alike; a module may import its own layer or any below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version", "threads", "files", "lazy"),
    ("schema", "memory", "claims", "style"),  # torch-free utilities, no quantpredict imports but errors
    ("formats", "arch", "data", "lmhead"),
    ("recipe", "mixes"),  # the Recipe and llama.cpp's named mixes: formats + arch, no torch at import
    ("gguf_names", "imatrix"),  # llama.cpp's tensor names of a model, its importance-matrix files and computation
    ("quantize", "evaluate", "runtime"),  # runtime: a runtime's activation rounding, as quantize.act hooks
    ("features", "models", "qat", "attention", "safetensors_stream"),  # safetensors_stream: models.checks' header
    ("runs", "export", "checkpoint_rtn"),  # export: a model as a GGUF file (models, quantize.plan, formats.ggml);
    # checkpoint_rtn: data-free RTN from a checkpoint's files (models.checks, quantize.rtn, mixes), no model built
    ("predict",),
    ("report",),
    ("studies",),  # the seed studies: they use everything below, and only the CLI uses them
    ("cli", "__main__"),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
#: ``(a, b)``: ``a`` must not import ``b``. The activation hooks are below the model quantizer (which installs
#: them), and the QAT trainer and the run-store naming of QAT runs know nothing of each other.
NOT_IMPORTING = (("quantpredict.quantize.act", "quantpredict.quantize.model"),
                 ("quantpredict.qat.finetune", "quantpredict.qat.runs"),
                 ("quantpredict.qat.runs", "quantpredict.qat.finetune"),
                 ("quantpredict.report", "quantpredict.cli"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_edges() -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` for every quantpredict-internal import, lazy ones included.
    ``from pkg import sub`` counts as an edge to ``pkg.sub`` alone (``quantpredict/__init__.py`` is lazy)."""
    edges: dict[str, dict[str, int]] = {}
    for mod, path in MODULES.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        out = edges.setdefault(mod, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                if t == "quantpredict" or not t.startswith("quantpredict."):
                    continue
                t = _resolve(t)
                if t != mod:
                    out.setdefault(t, node.lineno)
    return edges


def unit(module: str) -> str:
    """The layer unit of a module: its sub-package, or the top-level module itself."""
    return module.split(".")[1]


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in MODULES if m != "quantpredict"} - set(LAYER))
    assert not missing, f"place these in LAYERS: {missing}"


def test_no_import_points_up():
    bad = [f"{m}:{line} imports {t} ({unit(m)} is below {unit(t)})"
           for m, targets in import_edges().items() if m != "quantpredict"
           for t, line in targets.items() if LAYER[unit(t)] > LAYER[unit(m)]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("a,b", NOT_IMPORTING)
def test_modules_kept_apart(a, b):
    bad = [f"{m}:{line} imports {t}" for m, targets in import_edges().items() if m == a or m.startswith(a + ".")
           for t, line in targets.items() if t == b or t.startswith(b + ".")]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_studies():
    """The seed studies are a wing above the library: outside ``quantpredict.studies`` itself, only ``quantpredict.cli``
    imports it (not the top-level package's lazy names, not ``__main__``, not ``report``)."""
    bad = [f"{m}:{line} imports {t}" for m, targets in import_edges().items()
           if not (m + ".").startswith(("quantpredict.cli.", "quantpredict.studies."))
           for t, line in targets.items() if (t + ".").startswith("quantpredict.studies.")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    edges = import_edges()
    # Tarjan's strongly connected components; any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_lazy_and_relative_imports():
    edges = import_edges()
    assert "quantpredict.errors" in edges["quantpredict.recipe"]  # module level
    assert any(t.startswith("quantpredict.predict") for t in edges["quantpredict.cli.predict"])  # inside functions


def test_library_functions_leave_the_thread_count_alone():
    """Only the CLI (its --threads flags) and quantpredict.threads set torch's process-wide thread count."""
    bad = [f"{m}: {line.strip()}" for m, path in MODULES.items()
           if not m.startswith("quantpredict.cli") and m != "quantpredict.threads"
           for line in path.read_text().splitlines() if "set_num_threads(" in line]
    assert not bad, "\n".join(bad)


def test_torch_threads_restores_the_count():
    import threading

    import torch

    from quantpredict.threads import torch_threads

    before = torch.get_num_threads()
    seen = []

    def work(n):
        with torch_threads(n):
            seen.append((n, torch.get_num_threads()))

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == [(1, 1), (2, 2), (3, 3)]  # each block ran under its own count
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_building_the_cli_parser_imports_neither_torch_nor_transformers():
    """Every command builds the whole parser first: a register() that imports torch or transformers (3.5 s here)
    makes `quantpredict --help`, `formats` and every error message wait for it. Defaults come from torch-free
    modules (the Recipe, the settings dataclasses' field defaults). Nor pandas and scikit-learn: the predict package
    imports them, and reading one default from it cost 0.4 s of a quiet `--help`'s 0.5 s (1.8 s at load 4)."""
    import subprocess
    import sys

    code = ("import sys; from quantpredict.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
