"""Meta-tests on the plugin contract: every hook is documented and every hook has a test."""

from __future__ import annotations

from pathlib import Path

from gateway import hook_reference

ROOT = Path(__file__).resolve().parents[1]


def test_hook_reference_page_matches_the_hookspecs():
    page = (ROOT / "docs" / "hooks.md").read_text()
    assert page == hook_reference.render(), "docs/hooks.md is stale: run `gateway plugins --hook-reference > docs/hooks.md`"


def test_every_hook_has_a_docstring_with_its_contract():
    for name in hook_reference.hook_names():
        from gateway import hookspecs

        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc or "Return" in doc, f"{name} does not say when it is called or what it returns"


def test_every_hook_has_a_test():
    sources = {
        path: path.read_text()
        for path in (ROOT / "tests").rglob("test_*.py")
        if path.name != "test_hook_contract.py"
    }
    missing = [name for name in hook_reference.hook_names() if not any(name in text for text in sources.values())]
    assert not missing, f"hooks without a test: {missing}"
