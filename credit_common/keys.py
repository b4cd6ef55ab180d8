"""CurveZMQ key files (pyzmq's certificate format): generate, and load public or secret keys.

``NAME.key`` holds the public key, ``NAME.key_secret`` both. Shared by the router, the worker
agent and the CLI; errors are ``KeyError_`` with a message naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import zmq.auth

__all__ = ["KeyError_", "generate", "load_public", "load_secret"]


class KeyError_(Exception):
    """A key file is missing or malformed; the message names the file and the fix."""


_FIX = "create key pairs with `credit-router keys generate DIR NAME` (docs/DEPLOY.md)"


def _problem(path: Path, exc: Exception) -> str:
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    try:
        path.open("rb").close()
    except PermissionError:
        return "permission denied (is it readable by this service's user?)"
    return str(exc)


def generate(directory: Path, names: Iterable[str]) -> list[Path]:
    """Write a key pair per name into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(str(directory), name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read key pair {path}: {_problem(path, exc)}; {_FIX}") from None
    if secret is None:
        raise KeyError_(f"{path} holds no secret key; give the NAME.key_secret file, not NAME.key")
    return public, secret


def load_public(path: Path) -> bytes:
    """The Z85 public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read public key {path}: {_problem(path, exc)}; {_FIX}") from None
    return public
