"""Data flows one way: the components (data, losses, log-probs, scoring, evaluation, annotation) never
import a training module, a command or the demo."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"
COMPONENTS = ["data", "multimodal", "losses", "scoring", "evaluate", "annotate", "logprobs.py", "generate.py",
              "loading.py"]
UPPER = ("preftune.train", "preftune.commands", "preftune.demo", "preftune.cli")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def component_files():
    for entry in COMPONENTS:
        path = PACKAGE / entry
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


@pytest.mark.parametrize("path", list(component_files()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_components_do_not_import_upper_layers(path):
    upward = sorted(name for name in imported_modules(path) if name.startswith(UPPER))
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "config").glob("*.py")), ids=lambda p: p.name)
def test_settings_import_nothing_but_errors(path):
    """Configs are checked before any model (or torch) is loaded: they depend on nothing else of preftune."""
    own = sorted(name for name in imported_modules(path) if name.startswith("preftune.")
                 and not name.startswith(("preftune.config", "preftune.errors")))
    assert not own, f"config/{path.name} imports {own}"


def test_the_check_sees_relative_imports(tmp_path):
    assert "preftune.runtime.loop" in imported_modules(PACKAGE / "recipes" / "ppo.py")
