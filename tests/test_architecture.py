"""The layer rule of ARCHITECTURE.md, checked on the import graph: a lower layer never imports a higher one,
capabilities never import each other, and the engine (search/) knows no model, scorer or capability."""

import ast
from pathlib import Path

from conftest import ROOT

# lower number = lower layer; a module may import its own package and anything in a strictly lower layer
LAYERS = {"__init__": 0, "errors": 0, "preemption": 0,
          "io": 1, "mesh": 1, "distributed": 1,
          "data": 2,
          "models": 3,
          "optim": 4,
          "scorers": 5, "evals": 5,
          "search": 6,
          "scan": 7, "redteam": 7, "circuits": 7, "fragility": 7, "anomaly": 7,
          "zoo": 8,
          "demo": 9,
          "cli": 10,
          "__main__": 11}
ENGINE_MAY_IMPORT = {"errors", "preemption", "mesh", "distributed", "io", "data", "search"}   # the engine: no model, scorer, optimiser or capability


def component(module: str) -> str:
    """`jaxrisk.scan.run` -> `scan`; `jaxrisk.errors` -> `errors`; `jaxrisk` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """Every jaxrisk module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "jaxrisk")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxrisk":
            found.add(node.module)
    return found


def layer_violations(package: Path) -> list[str]:
    """'importer -> imported (why)' for every import that breaks the layer rule."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        importer = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = component(importer)
        if here not in LAYERS:
            problems.append(f"{importer}: not in any layer (add it to ARCHITECTURE.md and this test)")
            continue
        for imported in sorted(imports_of(path)):
            there = component(imported)
            if there == here:
                continue
            if there not in LAYERS:
                problems.append(f"{importer} -> {imported} (unknown layer)")
            elif LAYERS[there] >= LAYERS[here]:
                problems.append(f"{importer} -> {imported} (layer {LAYERS[here]} imports layer {LAYERS[there]})")
            elif here == "search" and there not in ENGINE_MAY_IMPORT:
                problems.append(f"{importer} -> {imported} (the engine knows no {there})")
    return problems


def test_imports_point_down_the_layers():
    assert layer_violations(ROOT / "jaxrisk") == []


def test_the_check_catches_an_upward_import(tmp_path):
    package = tmp_path / "jaxrisk"
    (package / "models").mkdir(parents=True)
    (package / "search").mkdir()
    (package / "models" / "lm.py").write_text("def f():\n    from jaxrisk.scan.run import run\n")
    (package / "search" / "engine.py").write_text("import jaxrisk.models.lm\n")
    (package / "io.py").write_text("from jaxrisk.errors import InputError\n")
    assert layer_violations(package) == [
        "jaxrisk.models.lm -> jaxrisk.scan.run (layer 3 imports layer 7)",
        "jaxrisk.search.engine -> jaxrisk.models.lm (the engine knows no models)",
    ]
