"""The apps depend one way: monitoring imports integrations, never the reverse (docs/reference.md)."""

import ast
from pathlib import Path

INTEGRATIONS = Path(__file__).resolve().parents[2] / "integrations"


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_integrations_never_imports_monitoring():
    offenders = sorted(f"{path.relative_to(INTEGRATIONS.parent)}: {module}"
                       for path in INTEGRATIONS.rglob("*.py") for module in imported_modules(path)
                       if module == "monitoring" or module.startswith("monitoring."))
    assert offenders == []


def test_the_engine_imports_neither_the_orm_models_nor_the_apps():
    engine = INTEGRATIONS / "resilience"
    offenders = sorted(f"{path.name}: {module}" for path in engine.rglob("*.py") for module in imported_modules(path)
                       if module.startswith(("monitoring", "integrations.models", "integrations.dlq",
                                             "django.db.models")))
    assert offenders == []


ROOT = INTEGRATIONS.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_imports(path: Path, known: set[str]) -> set[str]:
    """The product modules ``path`` imports, at the top or inside a function (both make a cycle)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycles_between_the_product_modules():
    paths = [path for app in ("integrations", "monitoring") for path in (ROOT / app).rglob("*.py")
             if "migrations" not in path.parts]
    known = {module_name(path) for path in paths}
    # a package's __init__ is imported by its submodules anyway: an edge to a parent package is no cycle
    graph = {module_name(path): {name for name in product_imports(path, known)
                                 if not module_name(path).startswith(name + ".") and name != module_name(path)}
             for path in paths}
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "\n".join(cycles)
