"""router_service/core stays pure: no sockets, no event loop, no clock reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[3] / "router_service" / "core"
FORBIDDEN_MODULES = {"zmq", "asyncio", "uvloop", "socket", "time", "datetime", "threading"}


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path.name} imports {name}"
        assert not isinstance(node, ast.Await | ast.AsyncFunctionDef | ast.AsyncWith), (
            f"{path.name}:{getattr(node, 'lineno', '?')} is asynchronous"
        )


def test_the_check_sees_the_core() -> None:
    assert {p.name for p in CORE.glob("*.py")} >= {"router.py", "table.py", "workers.py"}
