"""The package's dependency rule, checked over every import statement of ``paperlib`` (module level and inside
functions):

- the foundation (``core``: quantization plumbing, training loop, run records, presets, claims...; ``data``;
  ``models``; the Levene analysis) never imports a paper's method, an experiment driver or the command line;
- a method imports the foundation and itself, never another paper's method or an experiment;
- no import cycles between modules.

The package is being reorganised into these layers. ``KNOWN`` lists the edges that still break the rule today: the
test fails on any new one, and on a listed one that is gone (delete it from the list), so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "paperlib"

CORE = {
    "paperlib.quant", "paperlib.quant.core", "paperlib.quant.config", "paperlib.quant.uniform", "paperlib.quant.lsq",
    "paperlib.quant.native", "paperlib.native", "paperlib.train", "paperlib.compiled", "paperlib.distributed",
    "paperlib.metrics", "paperlib.atomic", "paperlib.runs", "paperlib.paths", "paperlib.presets", "paperlib.device",
    "paperlib.stats", "paperlib.claims", "paperlib.batchnorm", "paperlib.callback", "paperlib.pretrain",
    "paperlib.reproduce", "paperlib.figures", "paperlib.figures.per_class",
}
LEVENE = {"paperlib.levene", "paperlib.levene_io"}
METHODS = {
    "climbq": {"paperlib.climbq", "paperlib.climbq_hooks"},
    "lifequant": {"paperlib.lifequant.quant", "paperlib.lifequant.prox", "paperlib.lifequant.ball",
                  "paperlib.lifequant.splits", "paperlib.lifequant.metrics"},
    "dgms": {"paperlib.dgms", "paperlib.dgms_native"},
    "cbp": {"paperlib.cbp"},
}
CLI = {"paperlib.__main__", "paperlib.train_cli"}

#: edges that break the rule today (importer, imported): each is a piece of the reorganisation still to do
KNOWN: set[tuple[str, str]] = set()
#: import cycles today, each as the sorted tuple of its modules
KNOWN_CYCLES = {
    ("paperlib.figures", "paperlib.runs"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The paperlib modules ``name`` imports anywhere in its source (resolved to the module, not the attribute)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str:
    if name.startswith("paperlib.data"):
        return "data"
    if name.startswith("paperlib.models"):
        return "models"
    if name in CORE:
        return "core"
    if name in LEVENE:
        return "levene"
    for paper, mods in METHODS.items():
        if name in mods:
            return f"method:{paper}"
    if name in CLI:
        return "cli"
    if name == "paperlib":
        return "root"
    return "experiment"


FOUNDATION = {"core", "data", "models", "levene"}


def _breaks_rule(a: str, b: str) -> bool:
    la, lb = _layer(a), _layer(b)
    if la in FOUNDATION:
        return lb not in FOUNDATION
    if la.startswith("method:"):
        return not (lb in FOUNDATION or lb == la)
    return False


def test_every_module_is_in_a_layer() -> None:
    assert {"core", "data", "models", "levene", "cli", "experiment"} <= {_layer(m) for m in MODULES}
    assert all(m in MODULES for m in CORE | LEVENE | CLI | set().union(*METHODS.values())), "a listed module is gone"


def test_the_foundation_and_the_methods_import_nothing_above_them() -> None:
    broken = {(a, b) for a, deps in GRAPH.items() for b in deps if _breaks_rule(a, b)}
    new = broken - KNOWN
    assert not new, f"imports that break the layer rule (module docstring): {sorted(new)}"
    gone = KNOWN - broken
    assert not gone, f"fixed, delete from KNOWN: {sorted(gone)}"


def _cycles() -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[tuple[str, ...]] = set()
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(tuple(sorted(comp)))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_new_import_cycles() -> None:
    cycles = _cycles()
    assert not cycles - KNOWN_CYCLES, f"new import cycles: {sorted(cycles - KNOWN_CYCLES)}"
    assert not KNOWN_CYCLES - cycles, f"fixed, delete from KNOWN_CYCLES: {sorted(KNOWN_CYCLES - cycles)}"


def test_the_rule_catches_a_bad_import() -> None:
    """The checker itself: a foundation module importing a method, and a method importing another paper's."""
    assert _breaks_rule("paperlib.train", "paperlib.cbp")
    assert _breaks_rule("paperlib.cbp", "paperlib.dgms")
    assert _breaks_rule("paperlib.models.resnet_cifar", "paperlib.climbq_experiment")
    assert not _breaks_rule("paperlib.climbq", "paperlib.levene")
    assert not _breaks_rule("paperlib.climbq_experiment", "paperlib.cbp")
    assert "paperlib.batchnorm" in GRAPH["paperlib.dgms"] and "paperlib.dgms" not in GRAPH["paperlib.cbp"]
