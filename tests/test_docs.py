"""Every fenced example in README.md and docs/ is checked (issue 13: examples that did not
parse when copied), and no file of the repository points at a document outside it.

By the fence's info string:

* ``sh``/``bash``/``console``: ``bash -n`` accepts the shell (``console``: the ``$ `` lines),
  and every ``credit-router …`` command line parses with the real argument parsers
  (``credit_router.__main__.build_parser``, and the worker's own for ``credit-router worker``).
* ``json`` parses; ``jsonl``: every line parses on its own (a file of one object per line);
  ``toml``, ``yaml`` parse; ``python`` compiles; ``nft``: braces balance.
* ``hex``: decoded by ``tests/protocol/test_golden.py``; ``text``: an illustration (a
  diagram, a synopsis, a report's output), not meant to be run.

A fence without an info string fails: say what it is.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPEN = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[^`]*)$")
SHELL = {"sh", "bash", "shell", "console"}
KNOWN = SHELL | {"json", "jsonl", "toml", "yaml", "python", "nft", "hex", "text"}


def fences(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line, language, body)`` of every fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, ticks = match["indent"], match["ticks"]
        language = match["info"].strip().split(" ")[0]
        close = re.compile(rf"^ *{ticks}\s*$")
        body = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j].removeprefix(indent))
            j += 1
        yield i + 1, language, "\n".join(body) + "\n"
        i = j + 1


EXAMPLES = [
    pytest.param(path, line, language, body, id=f"{path.name}:{line}")
    for path in DOCS
    for line, language, body in fences(path)
]


def test_every_document_has_examples() -> None:
    assert len(EXAMPLES) > 40
    assert {p.name for p in DOCS} >= {"README.md", "DEPLOY.md", "ROUTING.md", "WORKLOADS.md"}


def shell_commands(body: str, console: bool) -> str:
    """The shell text of a block (for ``console``: the ``$ `` lines without the prompt)."""
    if not console:
        return body
    return "\n".join(line[2:] for line in body.splitlines() if line.startswith("$ ")) + "\n"


def command_lines(script: str) -> Iterator[list[str]]:
    """Each simple command of a script, as words (continuations joined, comments dropped)."""
    joined = script.replace("\\\n", " ")
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in lexer:
            if token in {";", "&&", "||", "|", "(", ")", "&", ">", ">>", "<"}:
                if words:
                    yield words
                words = []
            else:
                words.append(token)
        if words:
            yield words


def credit_router_argv(words: list[str]) -> list[str] | None:
    """The arguments of a ``credit-router`` invocation (past any ``VAR=value``), else None."""
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        words = words[1:]
    if words and Path(words[0]).name == "credit-router":
        return words[1:]
    return None


def parse_command(argv: list[str]) -> None:
    """Parse like ``credit-router`` would; fail with argparse's message if it would not."""
    from credit_router.__main__ import build_parser
    from worker_agent.__main__ import build_parser as worker_parser

    rest = [a for a in argv if a != "--debug"]
    code: object = 0
    try:
        if rest[:1] == ["worker"]:
            worker_parser().parse_args(rest[1:])
        else:
            build_parser().parse_args(rest)
    except SystemExit as exc:  # --help and --version exit 0, usage errors 2
        code = exc.code
    assert code == 0, f"credit-router {shlex.join(argv)}: does not parse"


def check_shell(where: str, body: str, console: bool) -> None:
    """``bash -n`` on the script; every ``credit-router`` command line through the parsers."""
    script = shell_commands(body, console=console)
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True)
    assert done.returncode == 0, f"{where}: {done.stderr}"
    for words in command_lines(script):
        argv = credit_router_argv(words)
        if argv is not None:
            parse_command(argv)


def check_jsonl(where: str, body: str) -> None:
    for number, text in enumerate(body.splitlines(), 1):
        if text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                pytest.fail(f"{where}: line {number} of the example is not JSON: {exc}")


@pytest.mark.parametrize(("path", "line", "language", "body"), EXAMPLES)
def test_fenced_example(
    path: Path, line: int, language: str, body: str, capsys: pytest.CaptureFixture[str]
) -> None:
    where = f"{path.relative_to(ROOT)}:{line}"
    assert language in KNOWN, f"{where}: fence without a known language ({language!r})"
    if language in SHELL:
        check_shell(where, body, console=language == "console")
        capsys.readouterr()
    elif language == "json":
        json.loads(body)
    elif language == "jsonl":
        check_jsonl(where, body)
    elif language == "toml":
        tomllib.loads(body)
    elif language == "yaml":
        list(yaml.safe_load_all(body))
    elif language == "python":
        compile(body, where, "exec")
    elif language == "nft":
        assert body.count("{") == body.count("}"), where


def test_a_bad_command_line_in_a_doc_would_fail() -> None:
    """The checker itself: a flag the parser does not know is caught."""
    (argv,) = [credit_router_argv(w) for w in command_lines("credit-router serve --no-such-flag\n")]
    assert argv is not None
    with pytest.raises(AssertionError, match="does not parse"):
        parse_command(argv)


# ------------------------------------------------------------------------- self-contained

OUTSIDE = re.compile(
    r"\.\./shared|shared/(?:design|reference)|aiperf-credit-router\.md|peer-routers\.md"
    r"|ecosystem\.md|zmq-throughput-limits\.md|STYLE\.md|STYLE R\d|(?<![A-Z_])routing\.md"
)
PENDING: dict[str, str] = {}
"""Files another change rewrites (the peer-links work on the service): the text to go."""


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [name for name in done.stdout.split() if (ROOT / name).is_file()]


def test_no_file_refers_to_a_document_outside_the_repository() -> None:
    """Issue 13: the routing contract and the reference on AIPerf lived outside the
    repository; docs/ROUTING.md and docs/AIPERF.md now hold them."""
    found = []
    for name in tracked_files():
        if name == "tests/test_docs.py":
            continue
        try:
            text = (ROOT / name).read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = OUTSIDE.search(line)
            if match and not (name in PENDING and PENDING[name] in line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == []
    for name, text in PENDING.items():
        assert text in (ROOT / name).read_text(), f"{name} is fixed: drop it from PENDING"


def test_every_markdown_link_to_a_document_resolves() -> None:
    """``FOO.md`` named in a document is a file of docs/ (or the root's README.md)."""
    names = {p.name for p in DOCS}
    for path in DOCS:
        for match in re.finditer(r"`(?:docs/)?([A-Z][A-Z_]*\.md)`", path.read_text()):
            assert match.group(1) in names, f"{path.name}: {match.group(1)} is not in docs/"


# ----------------------------------------------------------------------------- DEPLOY.md


def shell_examples(path: Path) -> str:
    return "\n".join(body for _, language, body in fences(path) if language in SHELL)


def test_deploy_md_creates_keys_before_it_enables_anything() -> None:
    """Issue 13: followed as written, DEPLOY.md started a plaintext, unauthenticated router on
    0.0.0.0: "edit it first" came after ``enable --now``, and the example ran insecure."""
    text = shell_examples(ROOT / "docs" / "DEPLOY.md")
    first_key = text.index("credit-router keys generate")
    first_check = text.index("credit-router config show")
    first_start = text.index("enable --now")
    assert first_key < first_check < first_start
    assert text.index("create secret generic") < text.index("kubectl apply")


def test_no_example_runs_plaintext_off_loopback() -> None:
    for path in DOCS:
        for line, language, body in fences(path):
            if language in SHELL:
                assert "--insecure" not in body, f"{path.name}:{line}"
                assert "INSECURE" not in body, f"{path.name}:{line}"
    for env in (ROOT / "deploy").rglob("*.env.example"):
        assert "INSECURE" not in env.read_text(), env


def test_key_paths_agree_across_readme_deploy_and_units() -> None:
    """Issue 13: README.md and DEPLOY.md used different key directories."""
    where = re.compile(r"/etc/credit-router/(keys|allowed|workers\.d)\b")
    sources = [
        ROOT / "README.md",
        ROOT / "docs" / "DEPLOY.md",
        *(ROOT / "deploy" / "systemd").iterdir(),
        *(ROOT / "deploy" / "k8s").iterdir(),
    ]
    used = {m.group(1) for path in sources for m in where.finditer(path.read_text())}
    assert used == {"keys", "allowed"}
