"""The mypyc build's import guard (scripts/mypyc_guard.py): compiled modules never shadow an
edited source.

The guard is exercised on a build directory laid out as ``scripts/mypyc_build.py`` lays it out,
with a real extension module standing in for a compiled one (the stdlib's ``_bisect``, which the
guard itself does not import), so no test
pays for a C compile; ``make compile`` followed by the core tests covers the real build.
"""

from __future__ import annotations

import _bisect
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _build(tmp: Path, python: str | None = None) -> tuple[Path, Path]:
    """A build dir with one "compiled" module ``fake_pkg.hot`` whose source is ``src/hot.py``."""
    src = tmp / "src"
    src.mkdir()
    (src / "hot.py").write_text("VALUE = 'interpreted'\n")
    out = tmp / "build"
    (out / "fake_pkg").mkdir(parents=True)
    ext = Path(_bisect.__file__)
    shutil.copyfile(ext, out / "fake_pkg" / ext.name)
    manifest = {
        "root": str(src),
        "python": python or sys.version,
        "modules": {
            "_bisect": {
                "source": "hot.py",
                "sha256": hashlib.sha256((src / "hot.py").read_bytes()).hexdigest(),
                "extension": f"fake_pkg/{ext.name}",
            }
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(ROOT / "scripts" / "mypyc_guard.py", out / "_credit_router_mypyc.py")
    return src, out


def _guard(out: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "guard_under_test", out / "_credit_router_mypyc.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fresh_build_maps_each_module_to_its_extension(tmp_path: Path) -> None:
    _, out = _build(tmp_path)
    modules, why = _guard(out)._check()
    assert why is None
    assert modules == {"_bisect": str(out / "fake_pkg" / Path(_bisect.__file__).name)}


def test_an_edited_source_disables_the_whole_build_and_names_the_file(tmp_path: Path) -> None:
    src, out = _build(tmp_path)
    (src / "hot.py").write_text("VALUE = 'edited'\n")
    modules, why = _guard(out)._check()
    assert modules == {}
    assert why == "hot.py changed since `make compile`"


def test_a_missing_source_or_another_python_disables_the_build(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    src, out = _build(tmp_path / "a")
    (src / "hot.py").unlink()
    assert _guard(out)._check() == ({}, "hot.py is missing")
    (tmp_path / "b").mkdir()
    _, out = _build(tmp_path / "b", python="2.7.18 (elsewhere)")
    modules, why = _guard(out)._check()
    assert modules == {}
    assert why is not None
    assert "built for Python '2.7.18 (elsewhere)'" in why


def _run_with_guard(
    out: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter that installs the guard the way the .pth does, then imports _bisect."""
    code = (
        f"import sys; sys.path.insert(0, {str(out)!r}); "
        "import _credit_router_mypyc as g; g.install(); "
        "import _bisect; print(_bisect.__file__)"
    )
    return subprocess.run(
        # -S: no site-packages, so only the guard under test runs (not a real build's .pth).
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_install_loads_the_extension_only_while_fresh(tmp_path: Path) -> None:
    src, out = _build(tmp_path)
    fresh = _run_with_guard(out)
    assert fresh.stdout.strip() == str(out / "fake_pkg" / Path(_bisect.__file__).name)
    assert fresh.stderr == ""
    skipped = _run_with_guard(out, {"CREDIT_ROUTER_INTERPRETED": "1"})
    assert skipped.stdout.strip() == _bisect.__file__
    (src / "hot.py").write_text("VALUE = 'edited'\n")
    stale = _run_with_guard(out)
    assert stale.stdout.strip() == _bisect.__file__  # the import system was left alone
    assert stale.stderr.count("\n") == 1
    assert "compiled modules not used: hot.py changed since `make compile`" in stale.stderr
