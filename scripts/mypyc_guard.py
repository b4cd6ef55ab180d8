"""Import guard for the mypyc build (copied into ``build/mypyc`` by ``scripts/mypyc_build.py``).

Run from a ``.pth`` file at interpreter start. Puts the compiled router modules in front of
their sources only when every compiled module's source still has the SHA-256 recorded at build
time and the interpreter is the one they were built for; otherwise prints one line saying why
and leaves the import system alone, so an edited source is always what runs.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent

#: Set by ``install()``: module name -> extension path, or the reason the build is not used.
active: dict[str, str] = {}
ignored: str | None = None


def _check() -> tuple[dict[str, str], str | None]:
    try:
        manifest: dict[str, Any] = json.loads((HERE / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return {}, f"no readable manifest ({exc})"
    if manifest.get("python") != sys.version:
        return {}, f"built for Python {manifest.get('python')!r}, this is {sys.version!r}"
    root = Path(manifest["root"])
    modules: dict[str, str] = {}
    for name, info in manifest["modules"].items():
        source = root / info["source"]
        try:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            return {}, f"{info['source']} is missing"
        if digest != info["sha256"]:
            return {}, f"{info['source']} changed since `make compile`"
        modules[name] = str(HERE / info["extension"])
    return modules, None


class _Finder:
    """A meta-path finder that answers only for the compiled modules."""

    def __init__(self, modules: dict[str, str]) -> None:
        self.modules = modules

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        extension = self.modules.get(name)
        if extension is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(name, extension)
        return importlib.util.spec_from_file_location(name, extension, loader=loader)


def install() -> None:
    global ignored
    if os.environ.get("CREDIT_ROUTER_INTERPRETED", "") not in ("", "0"):
        ignored = "CREDIT_ROUTER_INTERPRETED is set"
        return
    modules, ignored = _check()
    if ignored is not None:
        print(f"credit-router: compiled modules not used: {ignored}; running the sources "
              "(`make compile` rebuilds, `make uncompile` removes)", file=sys.stderr)  # fmt: skip
        return
    active.update(modules)
    sys.meta_path.insert(0, _Finder(modules))
