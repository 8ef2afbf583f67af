"""The shape of the package, read from its source: the import graph of lora_ckpt's modules has no
cycle (function-local imports count; only ``if TYPE_CHECKING:`` blocks do not), no module takes a
``_private`` name from another, and no module is over 450 lines."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_ckpt"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = ("lora_ckpt", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (never executed)."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def imports(name: str) -> tuple[set[str], list[tuple[str, str]], dict[str, str]]:
    """(lora_ckpt modules ``name`` imports, (module, name) pairs taken with ``from``, local alias -> module)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if is_package(name) else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    names: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lora_ckpt":
                    targets.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lora_ckpt":
                continue
            targets.add(mod)
            for a in node.names:
                if f"{mod}.{a.name}" in MODULES:  # from . import errors: a submodule
                    targets.add(f"{mod}.{a.name}")
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
                else:
                    names.append((mod, a.name))
    # importing a.b.c runs a/__init__ and a/b/__init__ first (the packages ``name`` itself lies in are
    # already running: a package's __init__ importing its own submodules is no cycle)
    own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    for t in list(targets):
        parts = t.split(".")
        targets.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in own)
    unknown = {t for t in targets if t not in MODULES}
    assert not unknown, f"{name} imports {unknown}, which do not exist"
    targets.discard(name)
    return targets, names, aliases


GRAPH = {name: imports(name)[0] for name in MODULES}


def test_import_graph_is_acyclic():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_graph_sees_function_local_imports():
    """The check above cannot pass vacuously: known edges, top-level and function-local, are in it."""
    assert "lora_ckpt.io.header" in GRAPH["lora_ckpt.io.tensors"]
    assert "lora_ckpt.hub.client" in GRAPH["lora_ckpt.conversion"]
    assert "lora_ckpt.conversion" in GRAPH["lora_ckpt.cli"]  # function-local (torch)
    assert "lora_ckpt.hub" in GRAPH["lora_ckpt.conversion"]  # the parent package runs first


def test_layout_registry_never_imports_the_hub():
    layouts = [n for n in GRAPH if n == "lora_ckpt.layouts" or n.startswith("lora_ckpt.layouts.")]
    assert layouts
    for name in layouts:
        assert not any(d == "lora_ckpt.hub" or d.startswith("lora_ckpt.hub.") for d in GRAPH[name]), name


def private_uses() -> list[str]:
    found = []
    for name, path in MODULES.items():
        _, names, aliases = imports(name)
        found += [f"{name}: from {mod} import {n}" for mod, n in names
                  if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def test_no_private_name_crosses_modules():
    assert private_uses() == []


def test_no_module_over_450_lines():
    sizes = {name: len(p.read_text(encoding="utf-8").splitlines()) for name, p in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
