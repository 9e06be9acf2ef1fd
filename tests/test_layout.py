"""The layout shows the architecture (issue 14): no import cycles between the project's modules, the
core holds only what several methods or the adapters use, and each method's own code lives in its
package. Read from the source with ast, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", "bench", "docs", "workflows", "prompts", ".venv", "build"}
ADAPTERS = ("nodes.", "pipelines.", "cli", "demo", "evaluation.", "__init__", "__main__")


def project_modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts) or "__init__"] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (function-level imports count too)."""
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ditq."):
            target = node.module.removeprefix("ditq.")
        else:
            continue
        for alias in node.names:  # a submodule imported by name, else a name defined in ``target``
            sub = f"{target}.{alias.name}" if target else alias.name
            found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}
    return found


PACKAGES = {name for name, path in project_modules().items() if path.name == "__init__.py"}


def lazy_api_modules() -> set[str]:
    """Modules behind the lazy public API (``_LAZY`` in the root ``__init__``): imported on first use."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "_LAZY")
    return {v.value for v in table.values}


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    g = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    g["__init__"] |= lazy_api_modules()
    return g


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def method_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["quant_core", "methods"] and len(parts) > 2:
        return parts[2]
    return None


def test_core_modules_serve_two_methods_or_an_adapter():
    g = graph()
    core = [m for m in g if m.startswith("quant_core.") and m.count(".") == 1 and m not in PACKAGES]
    assert {"quant_core.config", "quant_core.quantizers", "quant_core.layers", "quant_core.calibration",
            "quant_core.quantize", "quant_core.serialization", "quant_core.models"} <= set(core)
    for module in core:
        users = {u for u, deps in g.items() if module in deps}
        methods = {method_of(u) for u in users} - {None}
        adapters = {u for u in users if u.startswith(ADAPTERS)}
        assert len(methods) >= 2 or adapters, f"{module} is used only by {sorted(users)}"


def test_method_private_modules_live_in_their_method_package():
    g = graph()
    for module, deps in g.items():
        owner = method_of(module)
        for dep in deps:
            dep_owner = method_of(dep)
            if dep_owner and dep.count(".") > 2:  # another method's private module
                assert owner == dep_owner, f"{module} reaches into {dep}, private to {dep_owner}"
    building_blocks = [m for m in g if m.startswith("quant_core.passes.")]
    assert building_blocks, "shared passes sit in quant_core/passes"
    for block in building_blocks:
        assert any(method_of(u) for u, deps in g.items() if block in deps), f"no method uses {block}"


def test_core_never_imports_the_adapters_or_evaluation():
    for module, deps in graph().items():
        if module.startswith(("quant_core", "kernels")):
            bad = {d for d in deps if d.startswith(("nodes", "pipelines", "evaluation", "cli", "demo"))}
            assert not bad, f"{module} imports {sorted(bad)}: data flows from the core to the adapters"
