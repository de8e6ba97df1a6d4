"""The folder rules import-linter cannot see: no ``_private`` name is imported across a folder boundary.

(Which folder may import which, and the absence of import cycles, are import-linter contracts in
pyproject.toml, run by ``make lint`` and CI.)
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "initsearch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _folder(module: str) -> str:
    """The stage a module belongs to: ``initsearch.search`` for ``initsearch.search.trial``; the commands and
    ``errors`` at the top are each their own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imported_names(tree: ast.AST, importer: str, is_package: bool) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from X import name`` of initsearch, inside functions too."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            module = ".".join([*base, node.module] if node.module else base)
        else:
            module = node.module or ""
        if module == "initsearch" or module.startswith("initsearch."):
            found += [(module, alias.name, node.lineno) for alias in node.names]
    return found


def test_no_private_name_crosses_a_folder():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, name, line in _imported_names(tree, importer, path.name == "__init__.py"):
            private = name.startswith("_") and not name.startswith("__")
            if private and _folder(module) != _folder(importer):
                crossings.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} from {module}")
    assert crossings == []


def test_the_check_sees_a_private_crossing():
    """The walker above finds relative and function-level imports (so the test can fail)."""
    code = "def f():\n    from initsearch.search.trial import _hidden\n    from ..proxy import _other\n"
    names = _imported_names(ast.parse(code), "initsearch.search.study", is_package=False)
    assert ("initsearch.search.trial", "_hidden", 2) in names
    assert ("initsearch.proxy", "_other", 3) in names
    assert _folder("initsearch.search.trial") != _folder("initsearch.proxy.train")
