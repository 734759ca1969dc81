"""Meta-tests on the plugin contract: every hook is documented and every hook has a test."""

from __future__ import annotations

import ast
from pathlib import Path

from gateway import hook_reference, hookspecs

ROOT = Path(__file__).resolve().parents[1]


def test_hook_reference_page_matches_the_hookspecs():
    page = (ROOT / "docs" / "hooks.md").read_text()
    assert page == hook_reference.render(), "docs/hooks.md is stale: run `gateway plugins --hook-reference > docs/hooks.md`"


def test_every_hook_has_a_docstring_with_its_contract():
    for name in hook_reference.hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc or "Return" in doc, f"{name} does not say when it is called or what it returns"


def _implemented_hooks(path: Path) -> set[str]:
    """Hooks a module of the test suite implements with ``@hookimpl`` (module functions or methods)."""
    tree = ast.parse(path.read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]

    def is_hookimpl(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
            isinstance(target, ast.Attribute) and target.attr == "hookimpl"
        )

    return {f.name for f in functions if f.name.startswith("gateway_") and any(map(is_hookimpl, f.decorator_list))}


def test_every_hook_has_a_test_plugin_implementing_it():
    """A hook counts as tested when a test module registers an implementation of it, so the test sees it called."""
    # Test modules and the helpers they share (e.g. tests/psa_world.py's recording plugin).
    modules = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "plugins_contrib").glob("*/tests/*.py")]
    implemented: set[str] = set()
    for path in modules:
        implemented |= _implemented_hooks(path)
    missing = [name for name in hook_reference.hook_names() if name not in implemented]
    assert not missing, f"hooks that no test implements (and so no test sees called): {missing}"
