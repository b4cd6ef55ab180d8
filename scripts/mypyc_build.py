"""``make compile``: build the router's hot modules with mypyc into ``build/mypyc`` (optional).

The sources are never shadowed blindly. The build writes, next to the extension modules,

* ``manifest.json``: each compiled module's source path and SHA-256, and the Python it was
  built for;
* ``_credit_router_mypyc.py`` (a copy of ``scripts/mypyc_guard.py``): at interpreter start it
  hashes the sources again and puts the compiled modules in front of them **only if every one
  is unchanged** (one group: compiled modules call each other's native code directly, so a
  half-fresh group is not safe). Otherwise it prints one line naming the edited file and the
  interpreter runs the sources as if nothing had been compiled;
* ``.venv/.../credit_router_mypyc.pth``, which imports the guard (``make uncompile`` removes
  it and the build directory) — written only after a small closed loop of ``bench core`` ran on
  the compiled modules, so a build that compiles but misbehaves is never enabled.

``CREDIT_ROUTER_INTERPRETED=1`` skips the compiled modules for one process.

Usage (the Makefile passes setuptools in): ``python scripts/mypyc_build.py SITE_PACKAGES``, the
site-packages directory of the environment that should use the build (``.venv``'s).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "mypyc"
TMP = ROOT / "build" / "mypyc-tmp"

#: The per-credit path: the routing core and the service's peer links.
SOURCES = [
    "router_service/core/invariants.py",
    "router_service/core/router.py",
    "router_service/core/table.py",
    "router_service/core/workers.py",
    "router_service/links.py",
]


def _module(source: str) -> str:
    return source.removesuffix(".py").replace("/", ".")


_SMOKE = f"""
import sys
sys.path.insert(0, {str(OUT)!r})
import _credit_router_mypyc as guard
guard.install()
assert guard.active, guard.ignored
from loadgen.bench import core
import router_service.core.router as router
assert not router.__file__.endswith(".py"), router.__file__
for kind in ("single_turn", "sticky_5_turn"):
    for batch in (1, 64):
        core._closed_loop(core._core(8, 1000), core._credits(kind, 5000, 256), 256, batch)
"""


def _smoke() -> str | None:
    """Run a small closed loop on the compiled modules in a child; the failure's last line."""
    out = subprocess.run(
        [sys.executable, "-c", _SMOKE], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if out.returncode == 0:
        return None
    return (out.stderr.strip().splitlines() or ["no output"])[-1]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: mypyc_build.py SITE_PACKAGES (an existing directory)", file=sys.stderr)
        return 2
    from mypyc.build import mypycify
    from setuptools import setup

    shutil.rmtree(OUT, ignore_errors=True)
    shutil.rmtree(TMP, ignore_errors=True)
    hashes = {s: hashlib.sha256((ROOT / s).read_bytes()).hexdigest() for s in SOURCES}
    extensions = mypycify(
        [str(ROOT / s) for s in SOURCES], opt_level="3", target_dir=str(TMP / "c")
    )
    setup(
        name="credit-router-mypyc",
        ext_modules=extensions,
        packages=[],
        py_modules=[],
        script_args=["build_ext", "--build-lib", str(OUT), "--build-temp", str(TMP), "--quiet"],
    )
    modules = {}
    for source in SOURCES:
        name = _module(source)
        built = sorted(OUT.joinpath(*name.split(".")[:-1]).glob(name.split(".")[-1] + ".*.so"))
        if len(built) != 1:
            print(f"mypyc build: no extension module for {source} in {OUT}", file=sys.stderr)
            return 1
        modules[name] = {
            "source": source,
            "sha256": hashes[source],
            "extension": str(built[0].relative_to(OUT)),
        }
    (OUT / "manifest.json").write_text(
        json.dumps({"root": str(ROOT), "python": sys.version, "modules": modules}, indent=1)
    )
    shutil.copyfile(ROOT / "scripts" / "mypyc_guard.py", OUT / "_credit_router_mypyc.py")
    failure = _smoke()
    if failure is not None:
        print(f"mypyc build: not enabled, the compiled core fails a closed loop: {failure}")
        return 1
    pth = Path(argv[0]) / "credit_router_mypyc.pth"
    pth.write_text(f"{OUT}\nimport _credit_router_mypyc; _credit_router_mypyc.install()\n")
    print(f"mypyc build: {len(modules)} modules in {OUT}; enabled by {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
