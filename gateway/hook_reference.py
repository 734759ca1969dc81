"""Renders the hook reference (docs/hooks.md) from the hookspecs, so the page cannot drift from the contract."""

from __future__ import annotations

import inspect

from gateway import hookspecs


def hook_names() -> list[str]:
    """Every hook of the contract, in the order the contract file declares them."""
    return [
        name
        for name, value in vars(hookspecs).items()
        if name.startswith("gateway_") and callable(value) and hasattr(value, "gateway_spec")
    ]


def render() -> str:
    lines = [
        "# Hook reference",
        "",
        "Generated from `gateway/hookspecs.py` by `gateway plugins --hook-reference`; "
        "a test fails when this page and the contract differ.",
        "",
        inspect.cleandoc(hookspecs.__doc__ or ""),
        "",
    ]
    for name in hook_names():
        function = getattr(hookspecs, name)
        signature = inspect.signature(function)
        lines += [f"## `{name}`", "", "```python", f"def {name}{signature}", "```", ""]
        lines += [inspect.cleandoc(function.__doc__ or "(undocumented)"), ""]
    return "\n".join(lines).rstrip() + "\n"
