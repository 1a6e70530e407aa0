"""The package's layers, as README's Layout describes them: no import circles, and data flows one way.

Every import counts, deferred ones inside functions and ``TYPE_CHECKING`` ones included: a circle through a
type hint is still a circle for the next reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"moss_agent": ROOT / "moss_agent", "moss_agent.tools": ROOT / "tools", "moss_agent.chains": ROOT / "chains"}

# Each layer may import itself and the layers listed for it (settings is plain data, open to all).
ALLOWED = {
    "protocol": set(),
    "checkpoints": {"protocol"},
    "engines": {"protocol", "checkpoints"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = file
    return found


def _imports(name: str, file: Path, known: set[str]) -> set[str]:
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # ``from pkg import module`` imports the module; ``from module import name`` the module itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, set(modules)) for name, file in modules.items()}


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_layers_import_only_the_layers_before_them(graph: dict[str, set[str]]) -> None:
    wrong = []
    for name, targets in graph.items():
        layer = name.split(".")[1] if name.count(".") >= 1 else ""
        if layer not in ALLOWED:
            continue
        for target in targets:
            other = target.split(".")[1] if target.count(".") >= 1 else ""
            if other not in (layer, "settings", *ALLOWED[layer]):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_protocol_layer_is_plain_strings() -> None:
    for file in (ROOT / "moss_agent" / "protocol").glob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "transformers", "langchain_core", "langchain", "pydantic"}, file.name


def test_library_files_stay_short() -> None:
    long = {
        str(file.relative_to(ROOT)): n
        for folder in SOURCES.values()
        for file in folder.rglob("*.py")
        if (n := len(file.read_text(encoding="utf-8").splitlines())) > 450
    }
    assert not long, f"split these by role (at most 450 lines each): {long}"
