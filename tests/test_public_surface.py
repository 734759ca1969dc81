"""What plugin authors are shown imports only the public surface, and the public surface imports.

The public surface is ``gateway`` (its ``__all__``), ``gateway.testing`` (the contract kit:
``gateway.testing.contract`` and ``gateway.testing.proxy``) and ``gateway.simulators`` (its
``__all__``). The scaffold's templates, the contrib plugins and the examples in
docs/plugins.md are what plugin authors copy, so any other ``gateway.`` import there fails
here, naming the file and the line.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
import gateway.simulators

ROOT = Path(__file__).resolve().parents[1]
#: Modules a plugin may import from, and the names it may take from each (None: any).
PUBLIC: dict[str, frozenset[str] | None] = {
    "gateway": frozenset(gateway.__all__),
    "gateway.simulators": frozenset(gateway.simulators.__all__),
    "gateway.testing": None,
    "gateway.testing.contract": None,
    "gateway.testing.proxy": None,
}
IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(?P<module>gateway\b(?:\.\w+)*)[ \t]+import[ \t]+(?P<names>\([^)]*\)|[^\n]*)"
    r"|import[ \t]+(?P<modules>[^\n#]*\bgateway\b[^\n#]*))",
    re.MULTILINE,
)


def internal_imports(text: str) -> list[tuple[int, str]]:
    """(line, what) for every import in ``text`` of a module or name outside the public surface."""
    found = []
    for match in IMPORT.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match["module"] is not None:
            module, allowed = match["module"], PUBLIC.get(match["module"], frozenset())
            names = re.sub(r"#[^\n]*", "", match["names"]).strip("() \t\n")
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                if name and (module not in PUBLIC or (allowed is not None and name not in allowed)):
                    found.append((line, f"from {module} import {name}"))
        else:
            for module in (m.split(" as ")[0].strip() for m in match["modules"].split(",")):
                if re.fullmatch(r"gateway(\.\w+)*", module) and module not in PUBLIC:
                    found.append((line, f"import {module}"))
    return found


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line, code) of every ```python block."""
    return [
        (markdown.count("\n", 0, m.start(1)), m[1])
        for m in re.finditer(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    ]


def sources() -> list[tuple[Path, int, str]]:
    """(file, line offset, text) of everything plugin authors are shown."""
    found = [(path, 0, path.read_text()) for path in sorted((ROOT / "gateway/scaffold/templates").rglob("*.tmpl"))]
    found += [(path, 0, path.read_text()) for path in sorted((ROOT / "plugins_contrib").rglob("*.py"))]
    page = ROOT / "docs/plugins.md"
    found += [(page, offset, code) for offset, code in python_blocks(page.read_text())]
    return found


def test_the_scanner_finds_internal_imports_and_passes_public_ones():
    text = (
        "from gateway import AdapterSpec, hookimpl\n"
        "from gateway.simulators import Faults\n"
        "from gateway.testing.contract import PsaAdapterContract\n"
        "import gateway\nimport gateway_syncro\n"
        "from gateway.core.settings import ConnectionSettings\n"
        "from gateway import (\n    Connector,\n    hookspecs,  # a module, not in __all__\n)\n"
        "    import gateway.sync.http as http\n"
        "from gateway.simulators.faults import Faults\n"
    )
    assert internal_imports(text) == [
        (6, "from gateway.core.settings import ConnectionSettings"),
        (7, "from gateway import hookspecs"),
        (11, "import gateway.sync.http"),
        (12, "from gateway.simulators.faults import Faults"),
    ]
    assert python_blocks("x\n```python\nimport gateway.core\n```\n") == [(2, "import gateway.core\n")]


def test_templates_contrib_plugins_and_the_plugin_page_import_only_the_public_surface():
    files = sources()
    assert {path.suffix for path, _, _ in files} == {".tmpl", ".py", ".md"}
    bad = [
        f"{path.relative_to(ROOT)}:{offset + line}: {what}"
        for path, offset, text in files
        for line, what in internal_imports(text)
    ]
    assert not bad, "internal gateway imports where plugin authors look:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", [gateway, gateway.simulators], ids=lambda m: m.__name__)
def test_every_public_name_imports_and_the_list_is_sorted(module):
    assert module.__all__ == sorted(set(module.__all__))
    for name in module.__all__:
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import {name}", namespace)
        assert namespace[name] is getattr(module, name)


def test_the_kit_modules_import():
    for name in ("gateway.testing", "gateway.testing.contract", "gateway.testing.proxy"):
        importlib.import_module(name)


def test_import_gateway_leaves_out_the_database_models_alembic_and_the_web_app():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, gateway; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    left_out = ("sqlalchemy", "alembic", "gateway.core.models", "gateway.web", "gateway.app", "gateway.daemon")
    heavy = [m for m in loaded if any(m == out or m.startswith(out + ".") for out in left_out)]
    assert heavy == []
