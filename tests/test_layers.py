"""The layer table of docs/ARCHITECTURE.md, enforced over every module of the package: each module belongs to one
layer and imports (at module level or inside a function) only from the layers its own may use; no import cycle
inside ``preftune/``; no file over 400 lines and no recipe over 250."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"

# layer -> (its modules, as dotted prefixes under preftune), the layers it may import besides itself
LAYERS = {
    "settings": (["errors", "config"], []),
    "components": (["data", "losses", "loading", "wrappers", "gguf_import", "gguf_metadata", "realmodel", "toy",
                    "speed", "models", "logprobs", "generate", "engines", "multimodal", "export_gguf", "monitors",
                    "diversity"],
                   ["settings"]),
    "scoring": (["scoring"], ["settings", "components"]),
    "modality": (["modality"], ["settings", "components", "scoring"]),
    "runtime": (["runtime"], ["settings", "components", "scoring", "modality"]),
    "recipes": (["recipes"], ["settings", "components", "scoring", "modality", "runtime"]),
    "evaluation and annotation": (["evaluate", "annotate"], ["settings", "components", "scoring"]),
    "pipelines": (["iterate"], ["settings", "components", "scoring", "modality", "runtime", "recipes",
                                "evaluation and annotation"]),
    "front ends": (["cli", "commands", "demo", "__init__"], ["settings", "components", "scoring", "modality",
                                                            "runtime", "recipes", "evaluation and annotation",
                                                            "pipelines"]),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "migrations" not in p.parts}


def imported_modules(path: Path) -> set[str]:
    """The preftune modules ``path`` imports anywhere in it (relative imports resolved; ``from package import
    module`` counts the module; the importing module's own ancestor packages are not counted)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            submodules = {f"{module}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {module})
            if submodules and len(submodules) < len(node.names):
                found.add(module)
    resolved = set()
    for name in found:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != own and not own.startswith(name + "."):
            resolved.add(name)
    return resolved


def layer_of(module: str) -> str:
    rest = module.removeprefix("preftune").lstrip(".") or "__init__"
    for layer, (prefixes, _) in LAYERS.items():
        if any(rest == p or rest.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer of the table: add it to LAYERS and to docs/ARCHITECTURE.md")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports_only_from_the_layers_it_may_use(module):
    layer = layer_of(module)
    allowed = {layer, *LAYERS[layer][1]}
    wrong = sorted(f"{name} ({layer_of(name)})" for name in imported_modules(MODULES[module])
                   if layer_of(name) not in allowed)
    assert not wrong, f"{module} ({layer}) imports {wrong}"


def test_no_import_cycle_inside_the_package():
    graph = {m: imported_modules(p) for m, p in MODULES.items()}
    state: dict[str, int] = {}     # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path):
    text = path.read_text()
    recipe = path.parent.name == "recipes" and "\ndef train_" in text     # a recipe defines its train_* function
    lines = len(text.splitlines())
    limit = 250 if recipe else 400
    assert lines <= limit, f"{path.relative_to(PACKAGE)} has {lines} lines (limit {limit})"


@pytest.mark.parametrize("path", sorted((PACKAGE / "config").glob("*.py")), ids=lambda p: p.name)
def test_settings_import_nothing_but_errors_and_no_torch(path):
    """Configs are checked before any model (or torch) is loaded."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    assert "torch" not in names
    own = sorted(n for n in imported_modules(path) if not n.startswith(("preftune.config", "preftune.errors")))
    assert not own, f"config/{path.name} imports {own}"


def test_the_check_sees_relative_and_function_level_imports():
    assert "preftune.runtime.loop" in imported_modules(PACKAGE / "recipes" / "ppo.py")
    assert "preftune.iterate.people" in imported_modules(PACKAGE / "iterate" / "rounds.py")   # inside a function
    assert layer_of("preftune.recipes.dpo") == "recipes" and layer_of("preftune") == "front ends"
