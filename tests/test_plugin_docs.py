"""docs/plugins.md stays in step with the contract: every hook, no invented ones, examples that run."""

from __future__ import annotations

import re
from pathlib import Path

from gateway import hook_reference
from gateway.cli import build_parser
from gateway.testing.contract import AdapterContract, PsaAdapterContract, RmmAdapterContract

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "plugins.md").read_text()


def test_the_hook_summary_names_every_hook_and_only_real_ones():
    table = [line for line in PAGE.splitlines() if line.startswith("| `gateway_")]
    named = [re.match(r"\| `(gateway_\w+)\(", line).group(1) for line in table]
    assert named == hook_reference.hook_names(), "docs/plugins.md's hook table differs from gateway/hookspecs.py"
    mentioned = set(re.findall(r"\b(gateway_[a-z_]+)\(", PAGE))
    assert mentioned <= set(hook_reference.hook_names()), f"docs name hooks that do not exist: {mentioned}"
    assert "](hooks.md)" in PAGE


def test_every_python_example_compiles():
    blocks = re.findall(r"```python\n(.*?)```", PAGE, flags=re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        compile(block.replace("    ...\n", "    pass\n"), "docs/plugins.md", "exec")


def test_the_commands_the_walk_through_uses_exist():
    parser = build_parser()
    args = parser.parse_args(["plugin", "new", "mytool", "--kind", "psa", "--dir", "/tmp/x"])
    assert (args.name, args.kind) == ("mytool", "psa")
    assert parser.parse_args(["plugins", "--hook-reference"]).hook_reference


def test_the_kit_settings_the_page_documents_exist():
    for attribute in ("kind", "credentials", "options", "simulator_options", "refreshes_tokens"):
        assert hasattr(AdapterContract, attribute) and f"{attribute} =" in PAGE
    assert hasattr(PsaAdapterContract, "push_path") and "push_path =" in PAGE
    for method in ("expected_company_ids", "bill_companies", "make_bill"):
        assert hasattr(PsaAdapterContract, method) and method in PAGE
    for method in ("expected_organization_ids", "expected_device_ids"):
        assert hasattr(RmmAdapterContract, method) and method in PAGE
