"""The arrows point one way: ``credit_common`` and ``protocol`` at the bottom, the daemon
(``router_service``) and the agent (``worker_agent``) side by side above them, the load
generator (``loadgen``) above both, and the command (``credit_router``) on top.

Checked on the source with ``ast``, including imports inside functions (a lazy import is still
an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each package may import of the project's own packages.
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "credit_common": {"protocol"},
    "router_service": {"protocol", "credit_common"},
    "worker_agent": {"protocol", "credit_common"},
    "loadgen": {"protocol", "credit_common", "router_service", "worker_agent"},
    "credit_router": {"protocol", "credit_common", "router_service", "worker_agent", "loadgen"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_below_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    for path in files:
        ours = _imports(path) & set(ALLOWED)
        wrong = ours - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
